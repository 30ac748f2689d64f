"""Tests of quasistatic.linalg.krylov against numpy/scipy references on seeded dense float64 matrices.

The shared suite is parametrized over ``available_solvers()``, so a newly registered solver is
tested by registering it. Accuracy is asserted with the bound that a residual implies:
‖x − x*‖ / ‖x*‖ ≤ κ(A) · ‖b − A x‖ / ‖b‖, plus the reference's own rounding error.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from quasistatic.errors import InputError
from quasistatic.linalg.krylov import (SolveResult, available_solvers, cg, direct, get_solver, minres,
                                 register_solver, solve)

N = 60
TOL = 1e-8
SOLVERS = available_solvers()
ITERATIVE = ["cg", "minres"]


def _orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def spd_matrix(n: int = N, cond: float = 1e3, seed: int = 0) -> np.ndarray:
    """Q diag(λ) Qᵀ with λ log-spaced in [1, cond]."""
    q = _orthogonal(n, np.random.default_rng(seed))
    return (q * np.logspace(0, np.log10(cond), n)) @ q.T


def damped_psd_matrix(n: int = N, seed: int = 1) -> np.ndarray:
    """G Gᵀ + μ I with G (n, n/2), so G Gᵀ has rank n/2; μ = λ_max / 1e3 (condition ≈ 1e3)."""
    g = np.random.default_rng(seed).standard_normal((n, n // 2))
    a = g @ g.T
    return a + np.linalg.eigvalsh(a)[-1] / 1e3 * np.eye(n)


def indefinite_matrix(n: int = N, seed: int = 2) -> np.ndarray:
    """Q diag(λ) Qᵀ with half the λ in [1, 100] and half in [-100, -1]."""
    q = _orthogonal(n, np.random.default_rng(seed))
    lam = np.concatenate([np.logspace(0, 2, n // 2), -np.logspace(0, 2, n - n // 2)])
    return (q * lam) @ q.T


MATRICES = {"spd": spd_matrix(), "damped": damped_psd_matrix()}


def operator(a: np.ndarray, dtype: torch.dtype = torch.float64):
    """The matrix-free view of a dense matrix: V (n, k) -> A V."""
    dense = torch.tensor(a, dtype=dtype)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        assert v.ndim == 2 and v.shape[0] == dense.shape[0], v.shape
        return dense @ v

    return matvec


def rhs(k: int | None, seed: int = 3, n: int = N) -> np.ndarray:
    shape = (n,) if k is None else (n, k)
    return np.random.default_rng(seed).standard_normal(shape)


def assert_close_to_exact(result: SolveResult, a: np.ndarray, b: np.ndarray, tol: float) -> None:
    """The solution's relative error is within κ(A) · tol (plus the reference's rounding)."""
    exact = np.linalg.solve(a, b).reshape(b.shape[0], -1)
    x = result.solution.double().numpy().reshape(exact.shape)
    error = np.linalg.norm(x - exact, axis=0) / np.linalg.norm(exact, axis=0)
    bound = np.linalg.cond(a) * tol + 1e-10
    assert (error <= bound).all(), f"relative errors {error} exceed κ·tol = {bound:.2e}: {result.summary()}"


# --- shared suite over every registered solver -------------------------------------------------------

@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("matrix", sorted(MATRICES))
@pytest.mark.parametrize("k", [1, 3])
def test_solves_to_tolerance(method: str, matrix: str, k: int) -> None:
    a, b = MATRICES[matrix], rhs(k)
    result = solve(operator(a), torch.tensor(b), method=method, tol=TOL)
    assert result.converged, result.summary()
    assert result.solution.shape == (N, k)
    assert result.relative_residual.shape == result.negative_curvature.shape == (k,)
    assert (result.relative_residual <= TOL).all()
    assert not result.negative_curvature.any()
    # the reported residual is the exact one
    exact_residual = np.linalg.norm(b - a @ result.solution.numpy(), axis=0) / np.linalg.norm(b, axis=0)
    np.testing.assert_allclose(result.relative_residual.numpy(), exact_residual, rtol=1e-6, atol=1e-12)
    assert_close_to_exact(result, a, b, TOL)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.filterwarnings("ignore:the direct solver ignores x0")
def test_warm_start_from_exact_solution(method: str) -> None:
    a, b = MATRICES["spd"], rhs(3)
    x0 = torch.tensor(np.linalg.solve(a, b))
    result = solve(operator(a), torch.tensor(b), method=method, tol=TOL, x0=x0)
    assert result.converged and result.iterations <= 1, result.summary()
    assert_close_to_exact(result, a, b, TOL)


@pytest.mark.parametrize("method", SOLVERS)
def test_vector_rhs_round_trips(method: str) -> None:
    a, b = MATRICES["damped"], rhs(None)
    result = solve(operator(a), torch.tensor(b), method=method, tol=TOL)
    assert result.solution.shape == (N,)
    assert result.relative_residual.shape == result.negative_curvature.shape == (1,)
    assert result.converged, result.summary()
    assert_close_to_exact(result, a, b, TOL)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.filterwarnings("ignore:the direct solver ignores x0")
def test_zero_rhs_column_gives_zero(method: str) -> None:
    a, b = MATRICES["spd"], rhs(3)
    b[:, 1] = 0
    x0 = torch.ones(N, 3, dtype=torch.float64)  # a nonzero warm start for the zero column too
    result = solve(operator(a), torch.tensor(b), method=method, tol=TOL, x0=x0)
    assert torch.equal(result.solution[:, 1], torch.zeros(N, dtype=torch.float64))
    assert result.relative_residual[1] == 0
    assert result.converged, result.summary()


@pytest.mark.parametrize("method", SOLVERS)
def test_matvecs_counts_operator_calls(method: str) -> None:
    calls = []
    inner = operator(MATRICES["spd"])

    def counting(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape[1])
        return inner(v)

    result = solve(counting, torch.tensor(rhs(3)), method=method, tol=TOL)
    assert result.matvecs == len(calls) >= 1


@pytest.mark.parametrize("method", SOLVERS)
def test_float32(method: str) -> None:
    # minres needs its restart from the exact residual here: its recurrence alone stops at 1.004e-3 in one column
    a, b, tol = MATRICES["spd"], rhs(3), 1e-3
    result = solve(operator(a, torch.float32), torch.tensor(b, dtype=torch.float32), method=method, tol=tol)
    assert result.solution.dtype == result.relative_residual.dtype == torch.float32
    assert result.converged and (result.relative_residual <= tol).all(), result.summary()
    assert_close_to_exact(result, a, b, tol)


# --- solver-specific behaviour -----------------------------------------------------------------------

def test_cg_agrees_with_scipy() -> None:
    a, b = MATRICES["spd"], rhs(None)
    steps = []
    # scipy renamed cg's relative tolerance from tol to rtol in 1.12 (and removed tol in 1.14)
    rtol = "rtol" if "rtol" in inspect.signature(scipy.sparse.linalg.cg).parameters else "tol"
    reference, info = scipy.sparse.linalg.cg(scipy.sparse.linalg.LinearOperator(a.shape, matvec=lambda v: a @ v),
                                             b, maxiter=10 * N, callback=steps.append, **{rtol: TOL})
    assert info == 0
    result = solve(operator(a), torch.tensor(b), method="cg", tol=TOL)
    assert abs(result.iterations - len(steps)) <= 1, (result.iterations, len(steps))
    difference = np.linalg.norm(result.solution.numpy() - reference) / np.linalg.norm(reference)
    assert difference <= 2 * np.linalg.cond(a) * TOL, difference


@pytest.mark.parametrize("method", ["cg", "direct"])
def test_negative_curvature_reported(method: str) -> None:
    result = solve(operator(indefinite_matrix()), torch.tensor(rhs(3)), method=method, tol=TOL)
    assert result.negative_curvature.all(), result.summary()


def test_cg_stops_at_last_iterate_on_negative_curvature() -> None:
    # A = diag(1, -1), b = (1, 1): the first direction p = b has pᵀAp = 0, so no step is taken.
    a, b = np.diag([1.0, -1.0]), np.ones(2)
    result = solve(operator(a), torch.tensor(b), method="cg", tol=TOL)
    assert result.negative_curvature.tolist() == [True]
    assert result.iterations == 0 and not result.converged
    assert torch.equal(result.solution, torch.zeros(2, dtype=torch.float64))
    assert result.relative_residual.item() == pytest.approx(1.0)


def test_cg_returns_the_directions_of_negative_curvature_it_met() -> None:
    """Each column stopped by negative curvature hands back its direction p: unit norm, pᵀAp ≤ 0
    on the dense matrix, so it bounds A's smallest eigenvalue (numpy) from above; a column that
    converged gets a zero column. MINRES gives none."""
    a = indefinite_matrix()
    b = rhs(3)
    b[:, 2] = np.linalg.eigh(a)[1][:, -1]  # an eigenvector of a positive eigenvalue: CG converges
    result = solve(operator(a), torch.tensor(b), method="cg", tol=TOL)
    assert result.negative_curvature.tolist() == [True, True, False]
    p = result.negative_directions.numpy()
    assert p.shape == (N, 3) and np.allclose(np.linalg.norm(p[:, :2], axis=0), 1.0) and not p[:, 2].any()
    quotients = np.einsum("ik,ij,jk->k", p[:, :2], a, p[:, :2])
    assert (quotients <= 0).all() and (quotients >= np.linalg.eigvalsh(a)[0]).all()
    assert solve(operator(a), torch.tensor(b), method="minres", tol=TOL).negative_directions is None


def test_minres_solves_indefinite_system() -> None:
    a, b = indefinite_matrix(), rhs(3)
    result = solve(operator(a), torch.tensor(b), method="minres", tol=TOL)
    assert result.converged and (result.relative_residual <= TOL).all(), result.summary()
    assert result.negative_curvature.all()
    assert_close_to_exact(result, a, b, TOL)


def test_minres_reports_zero_rayleigh_quotient() -> None:
    # v_1 = b / ‖b‖ has v_1ᵀ A v_1 = 0; MINRES still solves A x = b, x = (1, -1).
    result = solve(operator(np.diag([1.0, -1.0])), torch.ones(2, dtype=torch.float64), method="minres", tol=TOL)
    assert result.negative_curvature.tolist() == [True] and result.converged
    np.testing.assert_allclose(result.solution.numpy(), [1.0, -1.0], rtol=1e-12)


@pytest.mark.parametrize("method", ITERATIVE)
def test_converged_column_is_frozen(method: str) -> None:
    a = MATRICES["spd"]
    eigenvector = np.linalg.eigh(a)[1][:, 10]  # converges in one step
    b = torch.tensor(np.stack([eigenvector, rhs(None)], axis=1))
    early = solve(operator(a), b, method=method, tol=TOL, max_iter=3)
    full = solve(operator(a), b, method=method, tol=TOL)
    assert full.converged and full.iterations > 3, full.summary()
    assert early.relative_residual[0] <= TOL and early.relative_residual[1] > TOL
    assert torch.equal(early.solution[:, 0], full.solution[:, 0])


@pytest.mark.parametrize("method", ITERATIVE)
def test_stopped_columns_are_not_applied(method: str) -> None:
    """A column that has stopped (here a zero right-hand side, and one that converges at once) is
    left out of the products from the next check on: it costs nothing while the others run."""
    a = MATRICES["spd"]
    applied = []
    matvec = operator(a)

    def counting(v: torch.Tensor) -> torch.Tensor:
        applied.append(v.shape[1])
        return matvec(v)

    eigenvector = np.linalg.eigh(a)[1][:, 10]
    b = torch.tensor(np.stack([eigenvector, rhs(None), np.zeros(N)], axis=1))
    result = solve(counting, b, method=method, tol=TOL)
    reference = solve(matvec, b, method=method, tol=TOL)
    assert torch.equal(result.solution, reference.solution) and result.converged
    assert result.iterations > 30
    # three columns only in the first check's products and the exact residuals; one afterwards
    assert sum(applied) <= 3 * 10 + result.matvecs - 10 + 2 * 3, applied
    assert applied.count(1) >= result.iterations - 12


@pytest.mark.parametrize("solver", [cg, minres])
def test_check_every_does_not_change_the_result(solver) -> None:
    a, b = MATRICES["damped"], torch.tensor(rhs(3))
    every_step = solver(operator(a), b, tol=TOL, max_iter=None, x0=None, check_every=1)  # (n, k) API
    sparse = solver(operator(a), b, tol=TOL, max_iter=None, x0=None, check_every=7)
    assert torch.equal(every_step.solution, sparse.solution)
    assert every_step.iterations == sparse.iterations
    assert every_step.matvecs == every_step.iterations + 1  # one per step plus the final residual
    assert every_step.matvecs <= sparse.matvecs < every_step.matvecs + 7


@pytest.mark.parametrize("method", ITERATIVE)
def test_host_synchronizations_per_check_not_per_iteration(method: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor -> Python conversions (each a device synchronization on CUDA) happen once per check."""
    syncs = []
    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *args, _f=original, _n=name: syncs.append(_n) or _f(self, *args))
    result = solve(operator(MATRICES["spd"]), torch.tensor(rhs(3)), method=method, tol=TOL)
    monkeypatch.undo()
    assert result.converged and result.iterations > 50
    # input checks (≤ 2), one per run start and one after the last run (2 without restarts),
    # one per check of 10 iterations, and the result's iterations and converged (2)
    assert 0 < len(syncs) <= 2 + 2 + result.matvecs // 10 + 2, syncs


def test_max_iter_limits_steps() -> None:
    result = solve(operator(MATRICES["spd"]), torch.tensor(rhs(3)), method="cg", tol=TOL, max_iter=5)
    assert result.iterations == 5 and result.matvecs == 6 and not result.converged


def test_direct_assembles_in_blocks() -> None:
    calls = []

    def counting(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape[1])
        return operator(MATRICES["spd"])(v)

    result = direct(counting, torch.tensor(rhs(2)), tol=TOL, max_iter=None, x0=None, block_size=16)
    assert calls == [16, 16, 16, 12] and result.matvecs == 4 and result.converged


def test_direct_singular_falls_back_to_least_squares() -> None:
    g = np.random.default_rng(4).standard_normal((N, N // 2))
    a = g @ g.T                                                  # rank n/2, no damping
    b = a @ rhs(2)                                               # consistent right-hand sides
    with pytest.warns(UserWarning, match="singular to working precision"):
        result = solve(operator(a), torch.tensor(b), method="direct", tol=TOL)
    assert result.converged, result.summary()
    np.testing.assert_allclose(result.solution.numpy(), np.linalg.pinv(a, hermitian=True) @ b, atol=1e-8)


def test_direct_warns_about_unused_options() -> None:
    with pytest.warns(UserWarning, match="ignores x0, max_iter and the preconditioner"):
        solve(operator(MATRICES["spd"]), torch.tensor(rhs(1)), method="direct", max_iter=5)


def test_summary_line() -> None:
    line = solve(operator(MATRICES["spd"]), torch.tensor(rhs(3)), tol=TOL).summary()
    assert line.startswith("converged:") and "negative curvature in 0/3 columns" in line


# --- registry and input checks -----------------------------------------------------------------------

def test_builtin_solvers_registered() -> None:
    assert {"cg", "minres", "direct"} <= set(available_solvers())
    assert get_solver("cg") is cg


def test_register_solver(restored_registries) -> None:
    register_solver("cg-sync1", functools.partial(cg, check_every=1))
    assert "cg-sync1" in available_solvers()
    result = solve(operator(MATRICES["spd"]), torch.tensor(rhs(1)), method="cg-sync1", tol=TOL)
    assert result.converged and result.matvecs == result.iterations + 1
    with pytest.raises(InputError, match=r"solver name must be new \(taken: cg, cg-sync1, direct, minres\), got 'cg'"):
        register_solver("cg", minres)


def test_unknown_solver_lists_names() -> None:
    with pytest.raises(InputError, match=r"linear solver must be one of \{cg, direct, minres\}, got 'gmres'"):
        solve(operator(MATRICES["spd"]), torch.tensor(rhs(1)), method="gmres")


@pytest.mark.parametrize("kwargs, match", [
    ({"tol": 0.0}, "tol must be a finite number > 0, got 0.0"),
    ({"tol": -1e-6}, "tol must be a finite number > 0"),
    ({"tol": float("nan")}, "tol must be a finite number > 0"),
    ({"max_iter": 0}, "max_iter must be an integer ≥ 1, got 0"),
    ({"max_iter": 2.5}, "max_iter must be an integer ≥ 1"),
    ({"x0": torch.zeros(N)}, r"x0 shape must be \(60, 3\) \(the shape of rhs\), got \(60,\)"),
    ({"x0": torch.full((N, 3), float("nan"))}, "x0 must be finite"),
])
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        solve(operator(MATRICES["spd"]), torch.tensor(rhs(3)), **kwargs)


@pytest.mark.parametrize("b, match", [
    (torch.tensor(np.where(np.arange(N)[:, None] == 7, np.nan, rhs(3))[:, :1]),
     "rhs must be finite, got '1 NaN or inf entries'"),
    (torch.ones(N, dtype=torch.long), "rhs dtype must be a floating-point dtype, got torch.int64"),
    (torch.ones(N, 2, 1, dtype=torch.float64), r"rhs shape must be \(n,\) or \(n, k\)"),
    (torch.ones(N, 0, dtype=torch.float64), r"rhs shape must be .*, got \(60, 0\)"),
    (rhs(3), "rhs must be a torch.Tensor, got 'ndarray'"),
])
def test_bad_rhs(b, match: str) -> None:
    with pytest.raises(InputError, match=match):
        solve(operator(MATRICES["spd"]), b)


@pytest.mark.parametrize("solver, option", [(cg, "check_every"), (minres, "check_every"), (direct, "block_size")])
def test_bad_solver_option(solver, option: str) -> None:
    with pytest.raises(InputError, match=f"{option} must be an integer ≥ 1, got 0"):
        solver(operator(MATRICES["spd"]), torch.tensor(rhs(1)), tol=TOL, max_iter=None, x0=None, **{option: 0})


def test_no_warnings_on_the_default_path() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in SOLVERS:
            solve(operator(MATRICES["spd"]), torch.tensor(rhs(2)), method=method, tol=TOL)

