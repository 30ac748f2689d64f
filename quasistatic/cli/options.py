"""Flags and set-up shared by the commands: argument groups, their checks, the configs of
:mod:`quasistatic.experiments.runner` they make, and the run directory, data and model of the commands that
record their flags (equilibrate, transfer)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..continuation.correctors import CORRECTORS, available_correctors
from ..data import DataSplit, available_datasets
from ..continuation.engine import EngineConfig
from ..continuation.equilibrate import EquilibrationConfig
from ..errors import bad_value
from ..integrators import available_integrators
from ..linalg import LinearSolveConfig, available_preconditioners, available_solvers
from ..models import ModelConfig, available_architectures
from ..registry import Registry
from ..thermo.functionals import check_chunk_size
from ..experiments.rundir import RunDirectory
from ..experiments.runner import DataConfig, FollowConfig, StartConfig, model_for_data, versions

__all__ = [
    "RESUME_IGNORES",
    "data_arguments",
    "model_arguments",
    "run_arguments",
    "engine_arguments",
    "linalg_arguments",
    "parameter_argument",
    "registry_options",
    "run_settings",
    "linear_solve_config",
    "engine_config",
    "follow_config",
    "data_config",
    "start_config",
    "hidden_option",
    "model_config",
    "inputs",
    "write_config",
    "settings",
]

# the flags a resumed run may change (the commands whose config.json records their flags as "settings")
RESUME_IGNORES = ("resume", "overwrite", "no_progress", "device", "out", "command_line")


def data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="digits", help=f"one of {', '.join(available_datasets())} (default digits)")
    group.add_argument("--data-dir", default=None, help="folder with the data set's files (mnist, cifar10)")
    group.add_argument("--download", action="store_true", help="download missing mnist/cifar10 files")
    group.add_argument("--classes", default=None, help="label subset: 0-4, 5-9, 1,3,7, or vehicles/animals for cifar10")
    group.add_argument("--relabel", action="store_true", help="map the chosen classes to 0..k-1")
    group.add_argument("--val-fraction", type=float, default=0.2, help="validation share of the split (default 0.2)")
    group.add_argument(
        "--examples", type=int, default=None, help="at most this many examples of each split, its first (default all)"
    )


def model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="mlp", help=f"one of {', '.join(available_architectures())} (default mlp)")
    group.add_argument("--latent-dim", type=int, default=8, help="dimension of z (default 8)")
    group.add_argument(
        "--hidden",
        default="16",
        help="mlp hidden widths, comma separated, '' for none (default 16: one layer, small enough "
        "for exact curvature solves on a CPU)",
    )
    group.add_argument("--width", type=int, default=64, help="resnet18 base width (default 64)")
    group.add_argument("--prior", default="normal", help="normal (default) or mog")


def run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--lam", type=float, default=1.0, help="λ, weight of the distortion (default 1)")
    group.add_argument("--gamma", type=float, default=10.0, help="γ, weight of the classification loss (default 10)")
    group.add_argument("--samples", type=int, default=1, help="K, fixed noise samples per example (default 1)")
    group.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="examples evaluated at once (default all; several chunks copy the data once); on one data set, "
        "one process with the shard size of 2 torchrun ranks follows their process bit for bit",
    )
    group.add_argument(
        "--sigma",
        type=float,
        default=3e-2,
        help="σ of eq. 6's σS term, S = ½‖θ‖² (default 3e-2; > 0 keeps J's minima isolated)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the split, the initialization and the noise")
    group.add_argument("--device", default="cpu", help="cpu or cuda")
    group.add_argument(
        "--dtype",
        default="float32",
        help="float32 or float64 (default: float32 for equilibrate; float64 for the commands that follow "
        "a process, whose derivatives need it)",
    )
    group.add_argument("--out", required=True, help="output directory")
    group.add_argument("--overwrite", action="store_true", help="empty an existing --out first")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("process")
    group.add_argument("--steps", type=int, default=10, help="steps over s ∈ [0, 1] (default 10)")
    group.add_argument(
        "--integrator",
        default="hermite",
        help=f"predictor: one of {', '.join(available_integrators())} (default hermite: the cheapest "
        "at the default tolerances, benchmarks/README.md)",
    )
    group.add_argument("--corrector", default="newton", help=f"one of {', '.join(available_correctors())}")
    group.add_argument(
        "--corrector-option",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="an option of the corrector, typed by its signature (repeatable), e.g. max_iter=10, "
        "border=solve for newton, epochs=5 for equilibrate; --grad-tol and --drift-tol set "
        "its tolerances",
    )
    group.add_argument(
        "--grad-tol",
        type=float,
        default=1e-6,
        help="‖∇θJ‖ the start and every accepted step must reach, on the full data (default 1e-6)",
    )
    group.add_argument(
        "--drift-tol",
        type=float,
        default=1e-4,
        help="|g − g0|/|g0| of the process constraint at every accepted step (default 1e-4)",
    )
    group.add_argument(
        "--tangent-tol",
        type=float,
        default=None,
        help="relative residual of the tangent solves (default: 10·grad-tol within [1e-2, 0.1] "
        "with a corrector, 0.1·drift-tol without)",
    )
    group.add_argument(
        "--max-work",
        type=float,
        default=None,
        help="stop following a process after this many gradient-equivalents, the polish of its start "
        "included (not a fresh model's Adam epochs, nor a transfer baseline's; default: no limit); the run "
        "ends with its trajectory so far, and --resume with a larger --max-work goes on",
    )
    group.add_argument(
        "--eigen-iterations",
        type=int,
        default=8,
        help="LOBPCG iterations for the smallest Hessian eigenvalue at every accepted step (the "
        "trajectory's lambda_min, which locates folds; default 8, 0: not tracked)",
    )
    group.add_argument(
        "--at-fold",
        default="jump",
        help="at a fold of the equilibrium branch (located from lambda_min): jump (default: relax to "
        "another branch just past it, the dissipated free energy booked in the trajectory), stop, "
        "or arclength (follow the branch through the fold as saddles by pseudo-arclength "
        "continuation; processes with a residual form only)",
    )
    group.add_argument(
        "--arclength",
        default="theta-s-gamma",
        help="--at-fold arclength: the coordinates its arclength is measured in, theta-s-gamma (default: "
        "all of (θ, s, γ), Keller's) or s-log-gamma (the controls (s, log γ) alone: a step moves γ by at "
        "most a factor e^h, for a process whose constraint fixes γ, e.g. the iso-c transfer)",
    )
    linalg_arguments(parser)
    group.add_argument("--rtol", type=float, default=None, help="adaptive integrators: relative tolerance")
    group.add_argument("--atol", type=float, default=None, help="adaptive integrators: absolute tolerance")
    group.add_argument("--from-checkpoint", default=None, help="start from this checkpoint instead of equilibrating")
    group.add_argument("--epochs", type=int, default=120, help="epochs of the initial equilibration (default 120)")
    group.add_argument("--batch-size", type=int, default=32, help="minibatch size of equilibrations (default 32)")
    group.add_argument("--fd-step", type=float, default=1e-2, help="fd-equilibration: finite-difference step")
    group.add_argument("--fd-epochs", type=int, default=10, help="fd-equilibration: epochs per equilibration")


def linalg_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("linear algebra (every solve of the run: tangents, corrector, polish)")
    group.add_argument(
        "--solver", default="cg", help=f"Krylov solver: one of {', '.join(available_solvers())} (default cg)"
    )
    group.add_argument(
        "--preconditioner",
        default="auto",
        help=f"auto or one of {', '.join(available_preconditioners())} (default auto: dense, the "
        "Hessian on a subsample eigendecomposed, for models up to 6,000 parameters, kfac above; "
        "cholesky: the Hessian on the whole data Cholesky-factorized, up to 20,000)",
    )
    group.add_argument(
        "--whitening",
        default="auto",
        help=f"the preconditioner that whitens the polish's L-BFGS: auto or one of "
        f"{', '.join(available_preconditioners())} except cholesky (default auto: kfac where the solves "
        "use dense, cholesky or kfac, else theirs)",
    )
    group.add_argument(
        "--preconditioner-sample",
        type=float,
        default=None,
        help="fraction of the training set the preconditioner is built on (default 1 for cholesky, 0.25 "
        "for the others; changes only the iteration counts)",
    )
    group.add_argument(
        "--hvp-sample",
        type=float,
        default=1.0,
        help="fraction of the training set of the solves' Hessian-vector products (default 1: exact; "
        "< 1 is subsampled curvature, an approximation)",
    )
    group.add_argument("--curvature", default="hessian", help="hessian (default, exact) or ggn (Gauss–Newton)")


def parameter_argument(parser: argparse.ArgumentParser, registry: Registry, names: Sequence[str]) -> None:
    """``--param NAME=VALUE`` (repeatable): a parameter of the process, by the names its factory in
    ``registry`` declares (listed in the help for ``names``)."""
    listing = "; ".join(f"{name}: {', '.join(p.name for p in registry.parameters(name)) or '-'}" for name in names)
    parser.add_argument(
        "--param",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help=f"a parameter of the process, parsed with its declared type (repeatable); {listing}",
    )


def registry_options(
    registry: Registry, name: str, texts: Sequence[str] | None, flag: str, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The options of ``registry``'s ``name`` from the command line: ``texts``, the NAME=VALUE
    values of the repeatable ``flag``, parsed with their declared types (an unknown name raises,
    listing the accepted ones), and ``given``, the values of dedicated flags (None: not given)."""
    pairs: dict[str, str] = {}
    for text in texts or ():
        key, equals, value = text.partition("=")
        if not equals or not key.strip():
            raise bad_value(flag, "NAME=VALUE", text)
        if key.strip() in pairs:
            raise bad_value(f"{flag} {key.strip()}", "given once", text)
        pairs[key.strip()] = value.strip()
    options = registry.parse_options(name, pairs)
    for key, value in (given or {}).items():
        if value is None:
            continue
        if key in options:
            raise bad_value(f"{flag} {key}", f"given once (not also as --{key.replace('_', '-')})", pairs[key])
        options[key] = value
    return options


def linear_solve_config(args: argparse.Namespace) -> LinearSolveConfig:
    """The run's LinearSolveConfig from the linear-algebra flags (checked here: exit 2 on a bad one)."""
    return LinearSolveConfig(
        operator=args.curvature,
        solver=args.solver,
        preconditioner=args.preconditioner,
        whitening=args.whitening,
        preconditioner_sample=args.preconditioner_sample,
        hvp_sample=args.hvp_sample,
        seed=args.seed,
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The run's EngineConfig from the process flags (checked here: exit 2 on a bad one)."""
    if args.steps < 1:
        raise bad_value("--steps", "an integer >= 1", args.steps)
    return EngineConfig(
        steps=args.steps,
        grad_tol=args.grad_tol,
        drift_tol=args.drift_tol,
        tangent_tol=args.tangent_tol,
        eigen_iterations=args.eigen_iterations,
        at_fold=args.at_fold,
        arclength=args.arclength,
    )


def follow_config(args: argparse.Namespace, method: str = "engine") -> FollowConfig:
    """How the process is followed by ``method``, from the flags of :func:`engine_arguments`: the
    integrator with ``--rtol``/``--atol``, the corrector with its ``--corrector-option``s."""
    return FollowConfig(
        method=method,
        integrator=args.integrator,
        integrator_options={
            name: value for name, value in (("rtol", args.rtol), ("atol", args.atol)) if value is not None
        },
        corrector=args.corrector,
        corrector_options=registry_options(CORRECTORS, args.corrector, args.corrector_option, "--corrector-option"),
        engine=engine_config(args),
        linear_solve=linear_solve_config(args),
        fd_step=args.fd_step,
        fd_epochs=args.fd_epochs,
    )


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of :class:`~quasistatic.experiments.runner.RunSettings` that a run command takes
    from its flags as they are (its sections, data, model, start and follow, are built apart)."""
    return {
        "samples": args.samples,
        "chunk_size": args.chunk_size,
        "sigma": args.sigma,
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "imports": tuple(args.imports),
        "resume": args.resume,
        "overwrite": args.overwrite,
        "max_work": args.max_work,
    }


def data_config(args: argparse.Namespace) -> DataConfig:
    """The data set of the flags of :func:`data_arguments`."""
    return DataConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        classes=args.classes,
        relabel=args.relabel,
        val_fraction=args.val_fraction,
        examples=args.examples,
    )


def start_config(args: argparse.Namespace) -> StartConfig:
    """The start of a process: ``--lam``, ``--gamma``, and ``--from-checkpoint`` or the equilibration
    of ``--epochs`` and ``--batch-size``."""
    return StartConfig(
        lam=args.lam,
        gamma=args.gamma,
        checkpoint=args.from_checkpoint,
        equilibration=EquilibrationConfig(epochs=args.epochs, batch_size=args.batch_size),
    )


def hidden_option(spec: str) -> tuple[int, ...]:
    if spec.strip() == "":
        return ()  # no hidden layer: linear encoder and decoder
    try:
        widths = tuple(int(w) for w in spec.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise bad_value("--hidden", "comma-separated positive integers such as 64,64 (or '' for none)", spec)
    return widths


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The model of the flags of :func:`model_arguments`, the likelihood by ``--dataset`` (gaussian
    for cifar10); its input shape and number of classes are the data's
    (:func:`quasistatic.experiments.runner.model_for_data`)."""
    return ModelConfig(
        architecture=args.model,
        latent_dim=args.latent_dim,
        hidden=hidden_option(args.hidden),
        width=args.width,
        prior=args.prior,
        likelihood="gaussian" if args.dataset == "cifar10" else "bernoulli",
    )


def inputs(
    args: argparse.Namespace, out: str | Path | None = None, data: DataConfig | None = None
) -> tuple[RunDirectory, DataSplit, ModelConfig]:
    """Validate the shared flags, then the output directory (``out``, default ``--out``), the data
    (``data``, default the flags') and the model's config (in that order: nothing is touched on
    disk before every flag has been checked)."""
    if args.samples < 1:
        raise bad_value("--samples", "an integer >= 1", args.samples)
    check_chunk_size(args.chunk_size, "--chunk-size")
    data, model = data_config(args) if data is None else data, model_config(args)
    run = RunDirectory(args.out if out is None else out, overwrite=args.overwrite, resume=args.resume)
    split = data.load(args.seed)
    return run, split, model_for_data(model, split.train)


def write_config(run: RunDirectory, args: argparse.Namespace, model_config: ModelConfig, split, **extra) -> None:
    """config.json: every setting, the model, the versions, the data, and the command's own part."""
    run.write_json(
        "config.json",
        {
            "settings": settings(args),
            "model": model_config.to_dict(),
            **extra,
            "versions": versions(),
            "data": {"name": split.name, "train": len(split.train), "val": len(split.val)},
        },
    )


def settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("run", "command")}
