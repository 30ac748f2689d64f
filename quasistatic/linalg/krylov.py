"""Matrix-free solvers for A X = B, with A = ∇²_θ J (possibly damped, A + μI) given only as an operator.

The operator ``matvec(V) -> A @ V`` acts on a block V of shape (n, k): k right-hand sides at once,
which the curvature code batches with vmap, so one call on k columns is cheaper than k calls on one.
A is symmetric; near a minimum of J it is positive (semi)definite, away from one it may be indefinite.

Three solvers are registered by name and picked with :func:`solve`:

- ``"cg"``: conjugate gradients (Hestenes & Stiefel 1952), for symmetric positive definite A;
  reports negative curvature pᵀAp ≤ 0 instead of stepping along it.
- ``"minres"``: MINRES (Paige & Saunders 1975), for symmetric and possibly indefinite A.
- ``"direct"``: assembles the dense A from matvecs and factorizes it; for small models and tests.

Why CG and MINRES are written here instead of calling ``scipy.sparse.linalg.cg``/``minres``: scipy
works on numpy arrays on the host, one right-hand side per call (k solves, k sequential HVPs per
iteration) and each operator application would cross devices. We need batched solves of k columns
in lockstep, on the device of the tensors (CPU or CUDA), torch-native, matrix-free on vmapped HVPs,
with no host synchronization per iteration.

Conventions shared by all solvers:

- ``relative_residual`` is ‖b − A x‖ / ‖b‖ per column, recomputed exactly from the operator at the
  end (one extra matvec for the iterative solvers), and ``converged`` is judged on it. The recurrence
  residuals that stop CG and MINRES drift from the true one in finite precision; a column whose
  recurrence met tol but whose exact residual did not is restarted from the exact residual while that
  reduces it (see :func:`_restarted`); this matters mostly in float32.
- A zero right-hand-side column has the solution 0 and the residual 0 (whatever x0 says).
- ``max_iter`` bounds the lockstep iterations (all restarts together) and defaults to ``10 * n``, as
  ``scipy.sparse.linalg.cg``: in exact arithmetic CG and MINRES terminate within n steps, in floating
  point they can need several times more (116 steps for n = 60, κ = 1e3, tol = 1e-8 in the tests);
  for large n the tolerance, not this cap, is meant to stop the solve.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from quasistatic.errors import bad_value
from quasistatic.registry import Registry

__all__ = [
    "Matvec",
    "SolveResult",
    "Solver",
    "SOLVERS",
    "register_solver",
    "available_solvers",
    "get_solver",
    "solve",
    "cg",
    "minres",
    "direct",
    "assemble",
]

Matvec = Callable[[Tensor], Tensor]  # V (n, k) -> A @ V (n, k)


@dataclass(frozen=True)
class SolveResult:
    """The outcome of a solve of A X = B with k right-hand sides.

    solution: X, same shape as the rhs given to :func:`solve`, (n,) or (n, k).
    iterations: the most solver steps any column took (a converged column stops stepping); 0 for direct.
    matvecs: operator applications, each on an (n, k) block, including the initial residual of a warm
        start, the exact residual after each run, and lockstep steps run between two convergence checks.
    relative_residual: (k,) ‖b − A x‖ / ‖b‖ per column, recomputed exactly at the end (‖b − A x‖ for a
        zero column).
    negative_curvature: (k,) bool; whether the column met a direction p with pᵀAp ≤ 0 (see each solver).
    converged: every column has relative_residual ≤ tol.
    negative_directions: (n, k), from CG only (else None): column j the unit direction p with pᵀAp ≤ 0
        that stopped column j where ``negative_curvature[j]``, zero elsewhere. A certificate that A
        has an eigenvalue ≤ pᵀAp (Courant–Fischer), and a start for an eigensolver looking for it.
    """

    solution: Tensor
    iterations: int
    matvecs: int
    relative_residual: Tensor
    negative_curvature: Tensor
    converged: bool
    negative_directions: Tensor | None = None

    def summary(self) -> str:
        """One line for logs, e.g. ``converged: 37 iterations, 41 matvecs, max relative residual 4.1e-09, ...``."""
        status = "converged" if self.converged else "NOT converged"
        return (
            f"{status}: {self.iterations} iterations, {self.matvecs} matvecs, "
            f"max relative residual {self.relative_residual.max().item():.2e}, "
            f"negative curvature in {int(self.negative_curvature.sum())}/"
            f"{self.negative_curvature.numel()} columns"
        )


class Solver(Protocol):
    """The contract of a registered solver.

    It receives what :func:`solve` has checked: rhs a finite floating-point (n, k) block, tol > 0,
    max_iter an integer ≥ 1 or None (the solver's default), x0 None or finite, (n, k), same dtype and
    device as rhs, and ``preconditioner`` None or V ↦ M⁻¹V for a symmetric positive definite M
    (a solver that cannot use one warns when given one). It returns a :class:`SolveResult` whose
    solution is (n, k).
    """

    def __call__(
        self,
        matvec: Matvec,
        rhs: Tensor,
        *,
        tol: float,
        max_iter: int | None,
        x0: Tensor | None,
        preconditioner: Matvec | None = None,
    ) -> SolveResult: ...


SOLVERS: Registry[SolveResult] = Registry("linear solver")  # name -> Solver


def register_solver(name: str, fn: Solver, *, replace: bool = False) -> None:
    """Make ``fn`` available to :func:`solve` (and to configs and the CLI) as ``method=name``.

    Options of a built-in solver can be fixed under a new name, e.g.
    ``register_solver("cg-sync1", functools.partial(cg, check_every=1))``.
    """
    SOLVERS.register(name, fn, replace=replace)


def available_solvers() -> list[str]:
    """The registered solver names, sorted."""
    return SOLVERS.available()


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``; an unknown name raises an InputError listing the valid ones."""
    return SOLVERS.get(name)


def solve(
    matvec: Matvec,
    rhs: Tensor,
    *,
    method: str = "cg",
    tol: float = 1e-6,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
) -> SolveResult:
    """Solve A X = B for X with the solver registered as ``method``.

    matvec: V (n, k) -> A @ V (n, k), A symmetric, n × n.
    rhs: B, (n,) or (n, k), floating point, finite.
    tol: stop a column once ‖b − A x‖ ≤ tol ‖b‖.
    max_iter: the most (lockstep) iterations; None for the solver's default (10 n for cg and minres).
    x0: a warm start, same shape as rhs (cast to its dtype and device).
    Returns a :class:`SolveResult` whose solution has the shape of rhs; its per-column fields are
    (k,), with k = 1 for an (n,) rhs.
    """
    solver = get_solver(method)
    if not isinstance(rhs, Tensor):
        raise bad_value("rhs", "a torch.Tensor", type(rhs).__name__)
    if rhs.ndim not in (1, 2) or 0 in rhs.shape:
        raise bad_value("rhs shape", "(n,) or (n, k) with n, k ≥ 1", tuple(rhs.shape))
    if not rhs.is_floating_point():
        raise bad_value("rhs dtype", "a floating-point dtype", rhs.dtype)
    if not bool(torch.isfinite(rhs).all()):
        raise bad_value("rhs", "finite", f"{int((~torch.isfinite(rhs)).sum())} NaN or inf entries")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 < tol < math.inf):
        raise bad_value("tol", "a finite number > 0", tol)
    if max_iter is not None:
        _check_positive_int("max_iter", max_iter)
    if x0 is not None:
        if not isinstance(x0, Tensor):
            raise bad_value("x0", "a torch.Tensor or None", type(x0).__name__)
        if x0.shape != rhs.shape:
            raise bad_value("x0 shape", f"{tuple(rhs.shape)} (the shape of rhs)", tuple(x0.shape))
        if not bool(torch.isfinite(x0).all()):
            raise bad_value("x0", "finite", f"{int((~torch.isfinite(x0)).sum())} NaN or inf entries")
        x0 = x0.to(dtype=rhs.dtype, device=rhs.device)
    vector = rhs.ndim == 1
    if vector:
        rhs = rhs[:, None]
        x0 = None if x0 is None else x0[:, None]
    result = solver(
        matvec,
        rhs,
        tol=float(tol),
        max_iter=max_iter,
        x0=x0,
        **({} if preconditioner is None else {"preconditioner": preconditioner}),
    )
    return replace(result, solution=result.solution[:, 0]) if vector else result


def cg(
    matvec: Matvec,
    rhs: Tensor,
    *,
    tol: float,
    max_iter: int | None,
    x0: Tensor | None,
    preconditioner: Matvec | None = None,
    check_every: int = 10,
) -> SolveResult:
    """Conjugate gradients (Hestenes & Stiefel 1952) on the k columns of rhs (n, k) in lockstep,
    preconditioned by M⁻¹ = ``preconditioner`` when given (z = M⁻¹r, β = rᵀz / r_oldᵀz_old).

    Each column runs its own CG recurrence (its own α, β; not block CG) and stops once its recurrence
    residual ‖r‖ ≤ tol ‖b‖; a stopped column is frozen (masked updates), so it does not drift.
    Negative curvature: when pᵀAp ≤ 0 in a column, CG's step is undefined (A is not positive definite
    on the Krylov space); the column is flagged, frozen at its last iterate (the step along p is not
    taken, and it is not restarted), and counts as not converged unless that iterate meets tol; p
    (normalized) is returned in ``negative_directions``.
    Restarts and sync discipline: see :func:`_restarted`.
    """
    return _restarted(_cg_steps, matvec, preconditioner, rhs, tol, max_iter, x0, check_every, stop_on_negative=True)


def minres(
    matvec: Matvec,
    rhs: Tensor,
    *,
    tol: float,
    max_iter: int | None,
    x0: Tensor | None,
    preconditioner: Matvec | None = None,
    check_every: int = 10,
) -> SolveResult:
    """MINRES (Paige & Saunders 1975) on the k columns of rhs (n, k) in lockstep, preconditioned by
    M⁻¹ = ``preconditioner`` (symmetric positive definite) when given, as scipy's ``psolve``.

    For symmetric, possibly indefinite (or singular but consistent) A: x_j minimizes ‖b − A x‖ over
    x0 + K_j(A, r0). The Lanczos recurrence and the Givens-rotated QR of its tridiagonal T_j follow
    ``scipy.sparse.linalg.minres``, vectorized over columns; a column stops once its residual estimate
    φ̄_j (= ‖b − A x_j‖ in exact arithmetic, the M⁻¹-norm when preconditioned) ≤ tol ‖b‖ (scaled by
    ‖r0‖_{M⁻¹}/‖r0‖ when preconditioned), and is frozen (masked updates).
    Negative curvature: set when the Krylov space was found to hold a direction with pᵀAp ≤ 0, i.e.
    T_j = V_jᵀ A V_j is not positive definite. It is detected by the LDLᵀ pivots of T_j,
    d_1 = α_1, d_j = α_j − β_j² / d_{j−1} ≤ 0, which catches every Lanczos vector with vᵀAv = α_j ≤ 0
    and is exactly when CG on the same column would meet pᵀAp ≤ 0. MINRES keeps stepping through it.
    Restarts and sync discipline: see :func:`_restarted`.
    """
    return _restarted(
        _minres_steps, matvec, preconditioner, rhs, tol, max_iter, x0, check_every, stop_on_negative=False
    )


class _RunningColumns:
    """The operator applied only to the columns still running at the last synchronization: a
    stopped column's product would be discarded anyway (its state is frozen), so it is not paid for.
    The set is refreshed at each check (``update``), so between checks a column that has just
    stopped is still applied, masked, as before."""

    def __init__(self, matvec: Matvec, active: Tensor) -> None:
        self.matvec = matvec
        self.update(active)

    def update(self, active: Tensor) -> None:
        self.columns = active.nonzero().squeeze(1)  # host synchronization
        self.all = len(self.columns) == len(active)

    def __call__(self, block: Tensor) -> Tensor:
        if self.all:
            return self.matvec(block)
        out = torch.zeros_like(block)
        out[:, self.columns] = self.matvec(block[:, self.columns])
        return out


# (running-column matvec, M⁻¹, x, r = b − A x, active (k,), target = tol ‖b‖ (k,), budget, check_every)
#   -> (x, negative (k,), the directions met (n, k) or None, steps taken per column (k,),
#       lockstep iterations run = matvecs used)
_Steps = Callable[
    [_RunningColumns, Matvec, Tensor, Tensor, Tensor, Tensor, int, int],
    tuple[Tensor, Tensor, Tensor | None, Tensor, int],
]


def _identity(block: Tensor) -> Tensor:
    return block


def _restarted(
    steps_fn: _Steps,
    matvec: Matvec,
    preconditioner: Matvec | None,
    rhs: Tensor,
    tol: float,
    max_iter: int | None,
    x0: Tensor | None,
    check_every: int,
    *,
    stop_on_negative: bool,
) -> SolveResult:
    """Run a Krylov recurrence from the exact residual, and again from the new exact one while it helps.

    After a run, r = b − A x is recomputed exactly (one matvec; it gives relative_residual). In finite
    precision the recurrence residual drifts below the true one (most visibly in float32), so a column
    whose recurrence met tol but whose exact residual did not is restarted from its exact residual, as
    long as its exact residual decreased over the last run and max_iter is not used up.
    max_iter bounds the lockstep iterations of all runs together (default 10 n).
    Sync discipline: the recurrences stay on the device; one host synchronization per run start and one
    every ``check_every`` iterations asks whether any column is still running, so up to
    check_every − 1 extra (fully masked) matvecs can follow the last column's convergence.
    """
    _check_positive_int("check_every", check_every)
    n, k = rhs.shape
    budget = 10 * n if max_iter is None else max_iter
    bnorm = torch.linalg.vector_norm(rhs, dim=0)  # (k,)
    if x0 is None:
        x, r, matvecs = torch.zeros_like(rhs), rhs, 0
    else:
        x = torch.where(bnorm > 0, x0, 0)  # a zero rhs column gets x = 0
        r, matvecs = rhs - matvec(x), 1
        worse = torch.linalg.vector_norm(r, dim=0) > bnorm  # a guess worse than 0 is dropped
        x, r = torch.where(worse, 0, x), torch.where(worse, rhs, r)
    relative = _relative(r, bnorm)  # (k,) exact
    negative = torch.zeros(k, dtype=torch.bool, device=rhs.device)
    directions: Tensor | None = None
    steps = torch.zeros(k, dtype=torch.long, device=rhs.device)
    active, done = relative > tol, 0
    while done < budget and bool(active.any()):  # synchronization per run
        x, run_negative, run_directions, run_steps, ran = steps_fn(
            _RunningColumns(matvec, active),
            preconditioner or _identity,
            x,
            r,
            active,
            tol * bnorm,
            budget - done,
            check_every,
        )
        if run_directions is not None:
            directions = run_directions if directions is None else torch.where(negative, directions, run_directions)
        negative, steps, done = negative | run_negative, steps + run_steps, done + ran
        r, matvecs = rhs - matvec(x), matvecs + ran + 1
        previous, relative = relative, _relative(r, bnorm)
        active = (relative > tol) & (relative < previous)
        if stop_on_negative:
            active = active & ~negative
    return SolveResult(x, int(steps.max()), matvecs, relative, negative, bool((relative <= tol).all()), directions)


def _cg_steps(
    matvec: _RunningColumns,
    psolve: Matvec,
    x: Tensor,
    r: Tensor,
    active: Tensor,
    target: Tensor,
    budget: int,
    check_every: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Preconditioned CG iterations from x with residual r, in lockstep over the columns (see :func:`cg`)."""
    z = psolve(r)  # (n, k) M⁻¹ r
    rz = _dot(r, z)  # (k,) rᵀ M⁻¹ r
    p = z  # (n, k) search directions
    negative = torch.zeros_like(active)
    directions = torch.zeros_like(r)  # (n, k) the unit p with pᵀAp ≤ 0 that stopped a column
    steps = torch.zeros_like(active, dtype=torch.long)
    done = 0
    while True:  # active.any() holds on entry
        for _ in range(min(check_every, budget - done)):
            ap = matvec(p)  # (n, k)
            pap = _dot(p, ap)  # (k,) pᵀAp
            met = active & (pap <= 0)
            directions = torch.where(met, p / torch.linalg.vector_norm(p, dim=0).clamp_min(1e-300), directions)
            negative = negative | met
            active = active & (pap > 0)  # also freezes a column on NaN
            alpha = rz / torch.where(active, pap, 1)
            r_new = r - alpha * ap
            z_new = psolve(r_new)
            rz_new = _dot(r_new, z_new)
            p_new = z_new + (rz_new / torch.where(active, rz, 1)) * p  # β = r_newᵀz_new / rᵀz
            x, r, p, rz = _keep(active, (x + alpha * p, r_new, p_new, rz_new), (x, r, p, rz))
            steps += active
            active = active & (torch.linalg.vector_norm(r, dim=0) > target)
            done += 1
        if done >= budget or not bool(active.any()):  # synchronization per check
            return x, negative, directions, steps, done
        matvec.update(active)


def _minres_steps(
    matvec: _RunningColumns,
    psolve: Matvec,
    x: Tensor,
    r: Tensor,
    active: Tensor,
    target: Tensor,
    budget: int,
    check_every: int,
) -> tuple[Tensor, Tensor, None, Tensor, int]:
    """Preconditioned MINRES iterations from x with residual r, in lockstep over the columns (see
    :func:`minres`); its negative pivots give no direction."""
    eps = torch.finfo(r.dtype).eps
    z = psolve(r)  # (n, k) M⁻¹ r0
    beta = _dot(r, z).clamp_min(0).sqrt()  # (k,) β_1 = ‖r0‖_{M⁻¹}
    target = target * beta / torch.linalg.vector_norm(r, dim=0).clamp_min(torch.finfo(r.dtype).tiny)
    zero = torch.zeros_like(beta)
    # Lanczos: r1, r2 are the last two unnormalized Lanczos vectors (n, k), z = M⁻¹ r2.
    # QR of T_j: rotation (cs, sn), dbar, epsln; φ̄ (phibar) is the residual norm; w, w2 the last two
    # directions of the update x += φ w; pivot is d_{j-1} of the LDLᵀ of T_j.
    r1, r2, w, w2 = r, r, torch.zeros_like(r), torch.zeros_like(r)
    oldb, dbar, epsln, phibar, cs, sn, pivot = zero, zero, zero, beta, -torch.ones_like(beta), zero, zero
    negative = torch.zeros_like(active)
    steps = torch.zeros_like(active, dtype=torch.long)
    done = 0
    while True:  # active.any() holds on entry
        for _ in range(min(check_every, budget - done)):
            first = done == 0
            v = z / torch.where(active, beta, 1)  # (n, k) Lanczos vector v_j
            y = matvec(v)  # (n, k)
            if not first:
                y = y - (beta / torch.where(active, oldb, 1)) * r1
            alfa = _dot(v, y)  # α_j = v_jᵀ A v_j
            y = y - (alfa / torch.where(active, beta, 1)) * r2
            d = alfa if first else alfa - beta**2 / pivot  # LDLᵀ pivot of T_j
            negative = negative | (active & (d <= 0))
            z_new = psolve(y)
            beta_new = _dot(y, z_new).clamp_min(0).sqrt()  # β_{j+1}
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            gamma = torch.hypot(gbar, beta_new).clamp_min(eps)
            cs_new, sn_new = gbar / gamma, beta_new / gamma
            w_new = (v - epsln * w2 - delta * w) / gamma
            x, r1, r2, z, w, w2, oldb, beta, dbar, epsln, phibar, cs, sn, pivot = _keep(
                active,
                (
                    x + cs_new * phibar * w_new,
                    r2,
                    y,
                    z_new,
                    w_new,
                    w,
                    beta,
                    beta_new,
                    -cs * beta_new,
                    sn * beta_new,
                    sn_new * phibar,
                    cs_new,
                    sn_new,
                    d,
                ),
                (x, r1, r2, z, w, w2, oldb, beta, dbar, epsln, phibar, cs, sn, pivot),
            )
            steps += active
            active = active & (phibar > target)
            done += 1
        if done >= budget or not bool(active.any()):  # synchronization per check
            return x, negative, None, steps, done
        matvec.update(active)


def direct(
    matvec: Matvec,
    rhs: Tensor,
    *,
    tol: float,
    max_iter: int | None,
    x0: Tensor | None,
    preconditioner: Matvec | None = None,
    block_size: int = 256,
) -> SolveResult:
    """Dense solve: assemble A column block by column block, then LU-solve (``torch.linalg.solve``).

    A = [matvec(E_1), matvec(E_2), ...] for identity blocks E_i of ``block_size`` columns; this needs
    n² entries of memory and O(n³) time, so it is meant for small models and as the exact reference.
    Negative curvature: λ_min(A) ≤ 0 (``eigvalsh`` of (A + Aᵀ)/2), the same for every column.
    If A is singular to working precision, min |λ| ≤ n ε max |λ| (numpy's matrix_rank threshold),
    it warns and returns the minimum-norm least-squares solution pinv(A) B instead (``torch.linalg.pinv``
    with hermitian=True; ``torch.linalg.lstsq`` would assume full rank on CUDA).
    x0 and max_iter do not apply; giving one warns. iterations is 0; matvecs is the number of blocks.
    """
    _check_positive_int("block_size", block_size)
    if x0 is not None or max_iter is not None or preconditioner is not None:
        warnings.warn("the direct solver ignores x0, max_iter and the preconditioner", UserWarning, stacklevel=3)
    n, k = rhs.shape
    a = assemble(matvec, n, rhs, block_size)  # (n, n)
    sym = (a + a.mT) / 2
    eigenvalues = torch.linalg.eigvalsh(sym)  # (n,) ascending
    cutoff = n * torch.finfo(rhs.dtype).eps
    magnitude = eigenvalues.abs()
    if bool(magnitude.min() <= cutoff * magnitude.max()):
        warnings.warn(
            "A is singular to working precision; the direct solver returns the minimum-norm "
            "least-squares solution pinv(A) B",
            UserWarning,
            stacklevel=3,
        )
        x = torch.linalg.pinv(sym, rtol=cutoff, hermitian=True) @ rhs
    else:
        x = torch.linalg.solve(a, rhs)
    bnorm = torch.linalg.vector_norm(rhs, dim=0)
    relative = _relative(rhs - a @ x, bnorm)
    return SolveResult(
        x, 0, -(-n // block_size), relative, (eigenvalues[0] <= 0).repeat(k), bool((relative <= tol).all())
    )


def assemble(matvec: Matvec, n: int, like: Tensor, block_size: int = 256) -> Tensor:
    """The dense (n, n) matrix of ``matvec`` from its products with blocks of ``block_size``
    columns of the identity (dtype and device of ``like``)."""
    columns = []
    for start in range(0, n, block_size):
        identity = torch.zeros(n, min(block_size, n - start), dtype=like.dtype, device=like.device)
        identity[start : start + identity.shape[1]].fill_diagonal_(1)
        columns.append(matvec(identity))  # (n, block) columns
    return torch.cat(columns, dim=1)


def _check_positive_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise bad_value(what, "an integer ≥ 1", value)


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """Column-wise inner products of (n, k) blocks -> (k,)."""
    return (u * v).sum(dim=0)


def _keep(active: Tensor, new: tuple[Tensor, ...], old: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Per column, the new state where ``active`` (k,) and the old one elsewhere (frozen columns)."""
    return tuple(torch.where(active, a, b) for a, b in zip(new, old))


def _relative(residual: Tensor, bnorm: Tensor) -> Tensor:
    """‖r‖ / ‖b‖ per column, and ‖r‖ where b = 0."""
    norm = torch.linalg.vector_norm(residual, dim=0)
    return torch.where(bnorm > 0, norm / torch.where(bnorm > 0, bnorm, 1), norm)


register_solver("cg", cg)
register_solver("minres", minres)
register_solver("direct", direct)
