"""Cost of curvature products and solves relative to a gradient, on the digits MLP and a wider MLP.

Run (about two minutes on a 2-core CPU; see benchmarks/README.md)::

    python -m pytest benchmarks/bench_curvature.py --benchmark-enable -q

Per case (model × dtype × device × HVP mode) it times, in this order and in one process:

- ``gradient``           ∇θJ by ``Objective.gradient`` (the unit every ratio is expressed in);
- ``hvp``                one Hessian-vector product A v, v (N,), by ``CurvatureOperator``;
- ``hvp_fresh_operator`` the same with a CurvatureOperator built inside the timed call (the "reverse"
                         mode's one-off pullback included);
- ``hvp_batched3``       A V for V (N, 3): one vmapped call on three columns;
- ``hvp_three_singles``  three separate single-vector calls (the baseline of the batched call);
- ``ggn_batched3``       G V for V (N, 3) with the Gauss–Newton operator (for the GGN solve below);
- ``cg3_hessian``        ``solve(A + μI, B, method="cg")`` with B (N, 3), μ = 1e-2, a fixed budget
                         of ``CG_MAX_ITER`` lockstep iterations (tol 1e-12 is never met);
- ``cg3_ggn``            the same solve on G + μI, positive definite, so CG takes every step.

J is the objective at Controls(λ=1, γ=10), K = 1 fixed noise sample, on the full digits train split
(1437 examples) at the seeded initial θ. Ratios (HVP/gradient, batched-3 / three singles, CG/gradient)
are medians of the same run divided by each other; conftest.py prints them and writes them with the
environment to benchmarks/results/curvature.json. Nothing asserts on time.

The thread study times the digits MLP's gradient, HVP and a tiny elementwise op at
torch.set_num_threads(1) and (2) in this process, and (with ``--benchmark-enable``) the same in a
subprocess started with OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from quasistatic.linalg.operators import CurvatureOperator
from quasistatic.data import load_dataset
from quasistatic.models import ModelConfig, build_model
from quasistatic.thermo.objective import Controls, Objective
from quasistatic.linalg.krylov import SolveResult, solve
from quasistatic.work import HVP_COST

# torch's first forward-mode AD call loads jvp decompositions written with torch.jit.script, which
# warns that TorchScript is deprecated: torch's own warning, not this library's.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

CONTROLS = Controls(1.0, 10.0)
SAMPLES = 1  # K fixed noise draws per example
MODEL_SEED = 0
K = 3  # right-hand sides / batched columns
DAMPING = 1e-2  # μ of the solve's operator A + μI
CG_MAX_ITER = 10  # lockstep CG iterations per solve (= the solver's check interval: no early exit)
CG_TOL = 1e-12  # never met in CG_MAX_ITER iterations: every solve does the same work

# Rounds per benchmark (after warm-up rounds): enough for a median, small enough for ~2 minutes.
ROUNDS = {"gradient": 30, "hvp": 20, "hvp_fresh_operator": 10, "hvp_batched3": 12, "hvp_three_singles": 10,
          "ggn_batched3": 8, "cg3_hessian": 3, "cg3_ggn": 3}
WARMUP = {"gradient": 3, "hvp": 2, "hvp_fresh_operator": 1, "hvp_batched3": 2, "hvp_three_singles": 1,
          "ggn_batched3": 1, "cg3_hessian": 1, "cg3_ggn": 1}


@dataclass(frozen=True)
class Case:
    model: str  # "digits-mlp" or "wide-mlp"
    hidden: tuple[int, ...]
    dtype: torch.dtype
    device: str
    mode: str = "reverse"  # CurvatureOperator mode: "reverse" (kept pullback) or "forward" (jvp of grad)

    @property
    def id(self) -> str:
        return f"{self.model}-{str(self.dtype).removeprefix('torch.')}-{self.device}-{self.mode}"


DIGITS = ModelConfig().hidden  # (64, 64)
WIDE = (256, 256)
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
CASES = [
    pytest.param(case, id=case.id, marks=_CUDA if case.device == "cuda" else ())
    for case in [
        Case("digits-mlp", DIGITS, torch.float32, "cpu"),
        Case("digits-mlp", DIGITS, torch.float32, "cpu", mode="forward"),
        Case("digits-mlp", DIGITS, torch.float64, "cpu"),
        Case("wide-mlp", WIDE, torch.float32, "cpu"),
        Case("wide-mlp", WIDE, torch.float32, "cpu", mode="forward"),
        Case("digits-mlp", DIGITS, torch.float32, "cuda"),
        Case("wide-mlp", WIDE, torch.float32, "cuda"),
    ]
]


@dataclass
class Setup:
    """Everything one case's benchmarks act on, built once per case (module-scoped fixture)."""

    case: Case
    objective: Objective
    theta: torch.Tensor  # (N,)
    hessian: CurvatureOperator  # A, undamped
    damped: CurvatureOperator  # A + μI, for the solve
    ggn: CurvatureOperator  # G + μI, for the solve
    vectors: torch.Tensor  # (N, K) seeded directions
    rhs: torch.Tensor  # (N, K) seeded right-hand sides, unit columns

    def sync(self) -> None:
        if self.case.device == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """fn followed by a device synchronize, so that the timer sees the finished work."""
        def run() -> Any:
            out = fn()
            self.sync()
            return out
        return run

    def info(self) -> dict[str, Any]:
        return {"case": self.case.id, "model": self.case.model, "hidden": list(self.case.hidden),
                "dtype": str(self.case.dtype), "device": self.case.device, "parameters": self.theta.numel(),
                "examples": len(self.objective.parts[0].data), "samples": SAMPLES,
                "controls": CONTROLS.to_dict(), "torch_threads": torch.get_num_threads()}


_TRAIN = None


def digits_train():
    global _TRAIN
    if _TRAIN is None:
        _TRAIN = load_dataset("digits").train  # seeded split, 1437 examples
    return _TRAIN


def build_setup(case: Case) -> Setup:
    model = build_model(ModelConfig(hidden=case.hidden), seed=MODEL_SEED).to(dtype=case.dtype, device=case.device)
    objective = Objective(model, digits_train(), samples=SAMPLES)
    theta = objective.initial_theta()
    generator = torch.Generator().manual_seed(1)
    n = theta.numel()
    vectors = torch.randn(n, K, generator=generator, dtype=case.dtype).to(case.device)
    rhs = torch.randn(n, K, generator=generator, dtype=case.dtype).to(case.device)
    rhs = rhs / torch.linalg.vector_norm(rhs, dim=0)
    return Setup(case, objective, theta,
                 CurvatureOperator(objective, theta, CONTROLS, mode=case.mode),
                 CurvatureOperator(objective, theta, CONTROLS, damping=DAMPING, mode=case.mode),
                 CurvatureOperator(objective, theta, CONTROLS, kind="ggn", damping=DAMPING),
                 vectors, rhs)


@pytest.fixture(scope="session", autouse=True)
def model_threads(pytestconfig: pytest.Config):
    """The model benchmarks run at --bench-threads torch threads (1 by default; see the README)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(pytestconfig.getoption("bench_threads"))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=CASES)
def setup(request: pytest.FixtureRequest, curvature_results) -> Setup:
    """One case; module scope with params makes pytest run all benchmarks of a case back to back."""
    built = build_setup(request.param)
    curvature_results.cases.setdefault(built.case.id, {"info": {}, "timings": {}})["info"] = built.info()
    return built


def _run(benchmark, setup: Setup, name: str, fn: Callable[[], Any]) -> Any:
    return benchmark.pedantic(setup.timed(fn), rounds=ROUNDS[name], warmup_rounds=WARMUP[name], iterations=1)


def _calls(benchmark, name: str) -> int:
    """How many times pedantic called the function: warm-up and timed rounds, or once if disabled."""
    return 1 if benchmark.stats is None else ROUNDS[name] + WARMUP[name]


def _finish(benchmark, results, setup: Setup, name: str, **facts: Any) -> None:
    """Record the median, and put this case's ratios known so far into extra_info."""
    benchmark.group = setup.case.id
    benchmark.extra_info.update(setup.info())
    benchmark.extra_info.update(facts)
    if results.record(setup.case.id, name, benchmark, **facts) is not None:
        benchmark.extra_info.update(results.ratios(setup.case.id))


def test_gradient(benchmark, setup: Setup, curvature_results) -> None:
    """∇θJ (N,): one forward and one backward pass over the 1437 examples."""
    g = _run(benchmark, setup, "gradient", lambda: setup.objective.gradient(setup.theta, CONTROLS))
    assert g.shape == setup.theta.shape and bool(torch.isfinite(g).all())
    _finish(benchmark, curvature_results, setup, "gradient")


def test_hvp(benchmark, setup: Setup, curvature_results) -> None:
    """A v for one vector v (N,)."""
    v = setup.vectors[:, 0]
    out = _run(benchmark, setup, "hvp", lambda: setup.hessian(v))
    assert out.shape == v.shape and bool(torch.isfinite(out).all())
    _finish(benchmark, curvature_results, setup, "hvp")


def test_hvp_fresh_operator(benchmark, setup: Setup, curvature_results) -> None:
    """A v with a new CurvatureOperator per call: equals ``hvp`` today; if the operator ever caches
    work at its fixed θ, this keeps the one-time cost visible next to the amortized one."""
    v = setup.vectors[:, 0]
    out = _run(benchmark, setup, "hvp_fresh_operator",
               lambda: CurvatureOperator(setup.objective, setup.theta, CONTROLS, mode=setup.case.mode)(v))
    assert out.shape == v.shape
    _finish(benchmark, curvature_results, setup, "hvp_fresh_operator")


def test_hvp_batched3(benchmark, setup: Setup, curvature_results) -> None:
    """A V for V (N, 3) in one vmapped call."""
    out = _run(benchmark, setup, "hvp_batched3", lambda: setup.hessian(setup.vectors))
    assert out.shape == setup.vectors.shape
    _finish(benchmark, curvature_results, setup, "hvp_batched3")


def test_hvp_three_singles(benchmark, setup: Setup, curvature_results) -> None:
    """The baseline of the batched call: A v₁, A v₂, A v₃ as three single-vector calls."""
    columns = [setup.vectors[:, j] for j in range(K)]
    outs = _run(benchmark, setup, "hvp_three_singles", lambda: [setup.hessian(v) for v in columns])
    batched = setup.hessian(setup.vectors)  # same numbers either way (checked once, untimed)
    scale = batched.abs().max().clamp_min(1)
    tol = 1e-4 if setup.case.dtype == torch.float32 else 1e-10
    assert float((torch.stack(outs, 1) - batched).abs().max() / scale) < tol
    _finish(benchmark, curvature_results, setup, "hvp_three_singles")


def test_ggn_batched3(benchmark, setup: Setup, curvature_results) -> None:
    """(G + μI) V for V (N, 3): the product the GGN solve below applies at each iteration."""
    out = _run(benchmark, setup, "ggn_batched3", lambda: setup.ggn(setup.vectors))
    assert out.shape == setup.vectors.shape
    _finish(benchmark, curvature_results, setup, "ggn_batched3")


def _solve_facts(result: SolveResult, hvps_per_call: float) -> dict[str, Any]:
    return {"cg_max_iter": CG_MAX_ITER, "cg_tol": CG_TOL, "damping": DAMPING, "rhs_columns": K,
            "iterations": result.iterations, "matvecs": result.matvecs, "hvps": hvps_per_call,
            "negative_curvature_columns": int(result.negative_curvature.sum()),
            "max_relative_residual": float(result.relative_residual.max()),
            "counted_gradient_equivalents": hvps_per_call * HVP_COST}  # work.py's convention


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_cg3(benchmark, setup: Setup, curvature_results, kind: str) -> None:
    """CG on (A + μI) X = B or (G + μI) X = B, B (N, 3), CG_MAX_ITER lockstep iterations.

    At the initial θ the damped Hessian is indefinite: its columns meet pᵀAp ≤ 0 within a few steps
    and freeze, yet the lockstep loop still runs every iteration up to its check (masked), so the work
    is the same. The GGN solve is positive definite and takes every step.
    """
    name = f"cg3_{kind}"
    operator = setup.damped if kind == "hessian" else setup.ggn
    work = setup.objective.work
    before = work.hvps
    result = _run(benchmark, setup, name,
                  lambda: solve(operator, setup.rhs, method="cg", tol=CG_TOL, max_iter=CG_MAX_ITER))
    hvps_per_call = (work.hvps - before) / _calls(benchmark, name)
    assert result.solution.shape == setup.rhs.shape
    _finish(benchmark, curvature_results, setup, name, **_solve_facts(result, hvps_per_call))
    if benchmark.stats is not None:
        per_matvec = benchmark.stats.stats.median / result.matvecs
        product = curvature_results.median(setup.case.id, "hvp_batched3" if kind == "hessian" else "ggn_batched3")
        if product:
            benchmark.extra_info["solve_per_matvec_over_product"] = per_matvec / product
            curvature_results.cases[setup.case.id]["timings"][name]["solve_per_matvec_over_product"] = (
                per_matvec / product)


# ---------------------------------------------------------------------------------------------------
# Thread study: the digits MLP at 1 and 2 torch threads.


@pytest.fixture(scope="module")
def digits_f32() -> Setup:
    return build_setup(Case("digits-mlp", DIGITS, torch.float32, "cpu"))


def _thread_ops(s: Setup) -> dict[str, Callable[[], Any]]:
    """What the thread study times: the gradient, one HVP, and one tiny elementwise op (the (1437, 64)
    activations of the first layer plus a bias-sized tensor) that isolates the threading overhead."""
    a = torch.randn(len(s.objective.parts[0].data), DIGITS[0], generator=torch.Generator().manual_seed(2))
    b = torch.randn(DIGITS[0], generator=torch.Generator().manual_seed(3))
    return {"gradient": lambda: s.objective.gradient(s.theta, CONTROLS),
            "hvp": lambda: s.hessian(s.vectors[:, 0]),
            "tiny_add": lambda: a + b}


THREAD_ROUNDS = {"gradient": 7, "hvp": 5, "tiny_add": 30}


@pytest.mark.parametrize("op", ["gradient", "hvp", "tiny_add"])
@pytest.mark.parametrize("threads", [1, 2])
def test_threads(benchmark, digits_f32: Setup, curvature_results, threads: int, op: str) -> None:
    """Gradient, HVP and a tiny op on the digits MLP (float32, CPU) at torch.set_num_threads(threads)."""
    fn = _thread_ops(digits_f32)[op]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        benchmark.pedantic(fn, rounds=THREAD_ROUNDS[op], warmup_rounds=2, iterations=1)
    finally:
        torch.set_num_threads(previous)
    benchmark.group = "threads"
    benchmark.extra_info.update({"threads": threads, "op": op, "loadavg": list(os.getloadavg())})
    if benchmark.stats is not None:
        st = benchmark.stats.stats
        entry = {"median_s": st.median, "min_s": st.min, "rounds": st.rounds, "loadavg": list(os.getloadavg())}
        curvature_results.threads[f"{threads}-threads-{op}"] = entry
        one = curvature_results.threads.get(f"1-threads-{op}")
        if threads != 1 and one:
            entry["over_1_thread"] = benchmark.extra_info["over_1_thread"] = st.median / one["median_s"]
            entry["note"] = f"{entry['over_1_thread']:.1f}x the 1-thread median"


def test_threads_passive_wait(pytestconfig: pytest.Config, curvature_results) -> None:
    """The same at 1 and 2 threads in a fresh process with OMP_WAIT_POLICY=PASSIVE (OpenMP's workers
    sleep instead of spinning at barriers); the variable is read when OpenMP starts, hence a process."""
    if pytestconfig.getoption("benchmark_disable") and not pytestconfig.getoption("benchmark_enable"):
        pytest.skip("timing only with --benchmark-enable")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--thread-probe"], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    for key, seconds in probe["medians_s"].items():
        curvature_results.threads[f"{key} (PASSIVE)"] = {"median_s": seconds, "omp_wait_policy": "PASSIVE"}
    for op in THREAD_ROUNDS:
        one, two = probe["medians_s"].get(f"1-threads-{op}"), probe["medians_s"].get(f"2-threads-{op}")
        if one and two:
            entry = curvature_results.threads[f"2-threads-{op} (PASSIVE)"]
            entry["over_1_thread"] = two / one
            entry["note"] = f"{two / one:.1f}x the 1-thread median"


def _median_time(fn: Callable[[], Any], rounds: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _thread_probe() -> None:
    """Print {"medians_s": {"<t>-threads-<op>": seconds}} for the thread study's ops at 1 and 2 threads."""
    ops = _thread_ops(build_setup(Case("digits-mlp", DIGITS, torch.float32, "cpu")))
    medians = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for op, fn in ops.items():
            medians[f"{threads}-threads-{op}"] = _median_time(fn, rounds=THREAD_ROUNDS[op], warmup=2)
    print(json.dumps({"medians_s": medians, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


if __name__ == "__main__" and sys.argv[1:] == ["--thread-probe"]:
    _thread_probe()
