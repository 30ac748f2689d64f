"""Every registry is one :class:`~quasistatic.registry.Registry`: bad names and options name the
accepted ones, a taken name needs ``replace=True``; processes declare their parameters and the
command line runs a newly registered one by name with ``--param``; the process contract does not
import the linear algebra."""

import ast
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from quasistatic import Controls
from quasistatic.cli import main
from quasistatic.continuation.correctors import CORRECTORS, make_corrector, register_corrector
from quasistatic.data.registry import DATASETS, register_dataset
from quasistatic.errors import InputError
from quasistatic.integrators import INTEGRATORS, make_integrator, register_integrator
from quasistatic.linalg.krylov import SOLVERS, register_solver
from quasistatic.linalg.operators import OPERATORS
from quasistatic.linalg.preconditioners import PRECONDITIONERS, register_preconditioner
from quasistatic.models.base import ARCHITECTURES, register_architecture
from quasistatic.processes import PROCESSES, Parameter, Process, make_process, register_process
from quasistatic.registry import Registry
from quasistatic.experiments.reproduce import FIGURES
from quasistatic.experiments.transfer import TRANSFER_PROCESSES, make_transfer_process
from small_problem import register_small_dataset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

START = Controls(1.0, 4.0)
SMALL = register_small_dataset()
PACKAGE = Path(__file__).resolve().parents[1] / "quasistatic"


@dataclass(frozen=True)
class Case:
    registry: Registry
    register: object  # the public register_* function, or the registry's own register
    name: str  # a built-in entry
    inputs: int  # the positional inputs its factory takes before the options
    options: frozenset  # the keyword options it accepts


CASES = {
    "dataset": Case(DATASETS, register_dataset, "digits", 1, frozenset({"download", "seed", "val_fraction"})),
    "architecture": Case(ARCHITECTURES, register_architecture, "mlp", 1, frozenset()),
    "integrator": Case(INTEGRATORS, register_integrator, "dopri5", 0, frozenset({"rtol", "atol"})),
    "corrector": Case(CORRECTORS, register_corrector, "newton", 0,
                      frozenset({"grad_tol", "drift_tol", "max_iter", "initial_damping", "max_damping", "contraction",
                                 "border", "forcing", "damp_cut_steps", "early_rejection"})),
    "solver": Case(SOLVERS, register_solver, "cg", 2,
                   frozenset({"tol", "max_iter", "x0", "preconditioner", "check_every"})),
    "preconditioner": Case(PRECONDITIONERS, register_preconditioner, "dense", 3,
                           frozenset({"floor", "max_size", "operator"})),
    "process": Case(PROCESSES, register_process, "iso-classification", 1, frozenset({"lam_end", "alpha"})),
    "operator": Case(OPERATORS, OPERATORS.register, "hessian", 4, frozenset()),
    "transfer method": Case(TRANSFER_PROCESSES, TRANSFER_PROCESSES.register, "geodesic", 1, frozenset({"slope"})),
    "figure": Case(FIGURES, FIGURES.register, "fig2", 1, frozenset({"lam", "lam_end", "gammas"})),
}


def test_the_cases_cover_every_registry(restored_registries):
    """Every Registry held by a module of the package is in CASES (and restored by the fixture)."""
    import importlib
    import pkgutil

    import quasistatic

    found = set()
    for module in pkgutil.walk_packages(quasistatic.__path__, "quasistatic."):
        if not module.name.endswith("__main__"):
            found |= {id(value) for value in vars(importlib.import_module(module.name)).values()
                      if isinstance(value, Registry)}
    assert found == {id(case.registry) for case in CASES.values()} == {id(registry) for registry in restored_registries}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_an_unknown_name_lists_the_registered_ones(case):
    for lookup in (case.registry.get, case.registry.make):
        with pytest.raises(InputError, match=f"{case.registry.kind} must be one of .*, got 'no-such-name'") as error:
            lookup("no-such-name")
        assert all(name in str(error.value) for name in case.registry.available())


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_an_unknown_option_lists_the_accepted_ones(case):
    assert set(case.registry.options(case.name, bound=case.inputs)) == case.options
    inputs = [None] * case.inputs  # never used: the options are checked before the factory is called
    expected = f"options of {case.registry.kind} '{case.name}' must be .*, got 'bogus'"
    with pytest.raises(InputError, match=expected) as error:
        case.registry.make(case.name, *inputs, bogus=1)
    message = str(error.value)
    assert all(option in message for option in case.options)
    assert case.options or "it takes no options" in message


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_taken_name_needs_replace(case, restored_registries):
    original = case.registry.get(case.name)
    with pytest.raises(InputError, match=rf"{case.registry.kind} name must be new \(taken: .*{case.name}.*\), "
                                         f"got '{case.name}'; pass replace=True"):
        case.register(case.name, original)

    def replacement(*args, **kwargs):
        return original(*args, **kwargs)

    case.register(case.name, replacement, replace=True)
    assert case.registry.get(case.name) is replacement


def test_restoring_undoes_registrations_and_replacements():
    registry = Registry("thing")
    registry.register("a", int)
    with registry.restoring():
        registry.register("a", float, replace=True)
        registry.register("b", str)
        assert registry.make("a", "2") == 2.0 and registry.available() == ["a", "b"]
    assert registry.available() == ["a"] and registry.get("a") is int


@pytest.mark.parametrize("make, args", [
    (make_integrator, ("rk4",)),
    (make_corrector, ("newton",)),
    (make_process, ("free", START)),
    (make_transfer_process, ("iso-c", START)),
])
def test_the_public_factories_refuse_an_unknown_option(make, args):
    with pytest.raises(InputError, match=f"options of .* '{args[0]}' must be .*, got 'bogus'"):
        make(*args, bogus=1.0)


@pytest.mark.parametrize("registry", [PROCESSES, TRANSFER_PROCESSES], ids=["process", "transfer method"])
def test_every_builtin_process_declares_its_parameters_as_its_constructor_takes_them(registry):
    import inspect

    for name in registry.available():
        declared = registry.get(name).parameters
        assert declared is not None, name
        signature = inspect.signature(registry.get(name)).parameters
        assert [p.name for p in declared] == registry.options(name, bound=1), name
        for parameter in declared:
            assert parameter.default == signature[parameter.name].default, (name, parameter.name)
            assert parameter.type is float and parameter.help, (name, parameter.name)


def test_a_declaration_must_name_the_factory_s_options():
    class Typo(Process):
        parameters = (Parameter("lam_ned", float),)

        def __init__(self, start, lam_end=1.0):
            super().__init__(start)

        def control_velocity(self, s, controls, sensitivities):
            return 0.0, 0.0, 0.0

    with pytest.raises(InputError, match=r"declared parameters of process 'typo' must be keyword options of its "
                                         r"factory \(among \{lam_end, start\}\), got \['lam_ned'\]"):
        Registry("process").register("typo", Typo)


def test_options_are_parsed_with_their_declared_or_signature_types():
    assert PROCESSES.parse_options("free", {"lam_rate": "0.5"}) == {"lam_rate": 0.5}
    parsed = CORRECTORS.parse_options("newton", {"max_iter": "5", "border": "solve", "contraction": "0.5"})
    assert parsed == {"max_iter": 5, "border": "solve", "contraction": 0.5} and type(parsed["max_iter"]) is int
    with pytest.raises(InputError, match="option max_iter of corrector 'newton' must be an int, got '5.5'"):
        CORRECTORS.parse_options("newton", {"max_iter": "5.5"})
    with pytest.raises(InputError, match=r"options of process 'free' must be among \{gamma_rate, lam_rate\}, got 'k'"):
        PROCESSES.parse_options("free", {"k": "1"})
    flag = Parameter("flag", bool)
    assert (flag.parse("True"), flag.parse("false")) == (True, False)
    with pytest.raises(InputError, match="option flag must be true or false, got 'yes'"):
        flag.parse("yes")


# --- the command line --------------------------------------------------------------------------------

BASE = ["--dataset", SMALL, "--hidden", "", "--latent-dim", "1", "--samples", "2", "--sigma", "1e-2",
        "--lam", "1", "--gamma", "4", "--epochs", "30", "--batch-size", "4", "--no-progress",
        "--grad-tol", "1e-9", "--drift-tol", "1e-10", "--tangent-tol", "1e-12"]
PLUGIN = "registry_test_plugin"
PLUGIN_SOURCE = '''
import quasistatic as qs
from quasistatic.processes import Parameter


class LambdaDrift(qs.Process):
    """lambda moves at ``speed`` per unit s, gamma stays."""

    parameters = (Parameter("speed", float, 0.1, "the rate of lambda"),)

    def __init__(self, start, speed=0.1):
        super().__init__(start)
        self.speed = speed

    def control_velocity(self, s, controls, sensitivities):
        return self.speed, 0.0, 0.0

    def describe(self):
        return {**super().describe(), "speed": self.speed}


qs.register_process("lambda-drift", LambdaDrift)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch, restored_registries):
    """A module, importable as PLUGIN, that registers the process "lambda-drift" with one declared
    parameter (the registry and sys.modules restored afterwards)."""
    (tmp_path / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield PLUGIN
    sys.modules.pop(PLUGIN, None)


def test_a_newly_registered_process_runs_from_the_command_line_by_name(plugin, tmp_path, capsys):
    out = tmp_path / "drift"
    assert main(["--import", plugin, "process", "--process", "lambda-drift", "--param", "speed=0.05", "--steps", "2",
                 *BASE, "--out", str(out)]) == 0
    with (out / "trajectory.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert (float(rows[-1]["s"]), float(rows[-1]["lam"])) == pytest.approx((1.0, 1.05))  # λ̇ = speed
    assert {float(row["gamma"]) for row in rows} == {4.0}
    assert json.loads((out / "config.json").read_text())["record"]["process"] == {
        "process": "LambdaDrift", "start": START.to_dict(), "speed": 0.05}
    assert "lambda-drift (engine, hermite/newton): 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["process", "--process", "free", "--param", "speed=1"],
     "options of process 'free' must be among {gamma_rate, lam_rate}, got 'speed'"),
    (["process", "--process", "free", "--param", "lam_rate=fast"],
     "option lam_rate of process 'free' must be a float, got 'fast'"),
    (["process", "--process", "free", "--param", "lam_rate"], "--param must be NAME=VALUE, got 'lam_rate'"),
    (["process", "--process", "free", "--param", "lam_rate=0.1", "--param", "lam_rate=0.2"],
     "--param lam_rate must be given once"),
    (["process", "--process", "free", "--lam-rate", "0.1", "--param", "lam_rate=0.2"],
     "--param lam_rate must be given once (not also as --lam-rate), got '0.2'"),
    (["process", "--process", "free", "--beta", "2"], "options of process 'free' must be among {gamma_rate, lam_rate}, "
                                                       "got 'beta'"),
    (["iso-classification", "--lam-end", "1.1", "--corrector-option", "max_iters=3"],
     "options of corrector 'newton' must be among {border, contraction, damp_cut_steps, drift_tol, early_rejection, "
     "forcing, grad_tol, initial_damping, max_damping, max_iter}, got 'max_iters'"),
    (["iso-classification", "--lam-end", "1.1", "--corrector-option", "max_iter=many"],
     "option max_iter of corrector 'newton' must be an int, got 'many'"),
    (["iso-classification", "--lam-end", "1.1", "--corrector", "none", "--corrector-option", "max_iter=3"],
     "options of corrector 'none' must be none (it takes no options), got 'max_iter'"),
    (["iso-classification", "--lam-end", "1.1", "--corrector-option", "max_iter=0"],
     "corrector max_iter must be an integer >= 1, got 0"),
    (["iso-classification", "--lam-end", "1.1", "--integrator", "rk4", "--rtol", "1e-3"],
     "options of integrator 'rk4' must be none (it takes no options), got 'rtol'"),
    (["--import", "no_such_module_for_quasistatic", "process", "--process", "free", "--lam-rate", "0.1"],
     "--import must be a module on the Python path, got 'no_such_module_for_quasistatic'"),
    (["process", "--process", "lambda-drift", "--param", "speed=1"], "process must be one of"),  # not imported
    (["transfer", "--source", "0", "--target", "1", "--method", "geodesic", "--param", "k=1"],
     "options of transfer process method 'geodesic' must be among {slope}, got 'k'"),
])
def test_bad_parameters_and_options_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    assert main([*argv, *BASE, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quasistatic: error:") and message in err and "\n" not in err, err
    assert not out.exists()


def test_a_bad_parameter_of_a_newly_registered_process_exits_2(plugin, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["--import", plugin, "process", "--process", "lambda-drift", "--param", "sped=1", *BASE,
                 "--out", str(out)]) == 2
    assert "options of process 'lambda-drift' must be among {speed}, got 'sped'" in capsys.readouterr().err
    assert not out.exists()


def test_a_newly_registered_transfer_method_is_a_method_of_the_transfer_command(restored_registries, tmp_path,
                                                                                 capsys):
    from quasistatic.processes import IsoClassificationTransfer

    TRANSFER_PROCESSES.register("iso-c-copy", IsoClassificationTransfer)
    out = tmp_path / "bad"
    assert main(["transfer", "--source", "0", "--target", "1", "--method", "iso-c-copy", "--param", "lam_ned=1",
                 *BASE, "--out", str(out)]) == 2
    assert "options of transfer process method 'iso-c-copy' must be among {lam_end}, got 'lam_ned'" \
        in capsys.readouterr().err
    assert not out.exists()


def test_corrector_tolerances_given_as_options_warn_that_the_engine_sets_them(tmp_path):
    with pytest.warns(UserWarning, match="--corrector-option grad_tol is unused: --grad-tol sets it"):
        assert main(["process", "--process", "free", "--param", "lam_rate=0.1", "--corrector-option", "grad_tol=1",
                     "--method", "guess", *BASE, "--out", str(tmp_path / "x")]) == 2  # refused after the check


# --- the process contract without the linear algebra ---------------------------------------------------

SOLVER_STACK = ("quasistatic.linalg.krylov", "quasistatic.linalg.linear_solve", "quasistatic.linalg.operators",
                "quasistatic.continuation.tangents")


def module_path(name: str) -> Path | None:
    """The file of module ``name`` of the package (None for one outside it)."""
    base = PACKAGE.parent / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imports_of(name: str) -> set[str]:
    """The package's modules that module ``name`` imports, relative imports resolved; a module's
    parent packages run their ``__init__`` too and count, except the package's own (the public
    API, which imports everything)."""
    path = module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]  # a name may be a module
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if module_path(".".join(parts[:i])))
    return found


def test_the_process_contract_does_not_import_the_solvers():
    """``import quasistatic.processes`` runs ``quasistatic/__init__.py``, the public API, which imports
    everything; so the modules of quasistatic/processes/ and all they import, transitively, are read
    instead: none of them is the tangent solve or the linear algebra under it."""
    start = {f"quasistatic.processes.{path.stem}" if path.stem != "__init__" else "quasistatic.processes"
             for path in (PACKAGE / "processes").glob("*.py")}
    seen, queue = set(), sorted(start)
    while queue:
        name = queue.pop()
        if name not in seen:
            seen.add(name)
            queue.extend(imports_of(name) - seen)
    # the walk follows imports
    assert "quasistatic.thermo.sensitivities" in seen and "quasistatic.thermo.objective" in seen
    assert not seen & set(SOLVER_STACK), sorted(seen & set(SOLVER_STACK))


def test_sensitivities_keep_their_old_names():
    import quasistatic
    import quasistatic.processes
    import quasistatic.continuation.tangents as tangents
    import quasistatic.thermo.sensitivities as sensitivities

    assert quasistatic.Sensitivities is tangents.Sensitivities is sensitivities.Sensitivities
    assert quasistatic.processes.Sensitivities is sensitivities.Sensitivities
    assert tangents.CONTROLS == ("lam", "gamma", "t") and tangents.FUNCTIONALS[-1] == "F"
