"""Bordered systems, solved whole: M x = r with

    M = [[A, U],      A = ∇²θJ (n × n, symmetric, possibly singular or indefinite),
         [Vᵀ, W]]     U, V (n × m) borders, W (m × m) corner, m small (1–3).

Pseudo-arclength continuation (Keller 1977) needs M where A itself is singular: at a fold A has a
zero eigenvalue but M does not (its borders are the parameter column and the arclength row). Block
elimination through A⁻¹ (what the tangent solves of the engine do) breaks down there; this module
never inverts A. It runs GMRES (``scipy.sparse.linalg.gmres``: M is not symmetric, and one
right-hand side per call is all continuation needs) on M with the preconditioner

    M_P⁻¹,  M_P = [[P, U], [Vᵀ, W]],

applied exactly by block elimination through P, the run's symmetric positive definite
preconditioner (P ≈ |A| is invertible where A is not): y = P⁻¹r_θ, S = W − VᵀP⁻¹U (m × m),
x_p = S⁻¹(r_p − Vᵀy), x_θ = y − P⁻¹U x_p. When P = A away from folds, M_P⁻¹M = I. Should S be
singular (M_P singular by accident), diag(P⁻¹, I) is used instead.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from ..errors import bad_value
from .krylov import Matvec, SolveResult

__all__ = ["solve_bordered"]


def solve_bordered(
    matvec: Matvec,
    columns: Tensor,
    rows: Tensor,
    corner: Tensor,
    rhs: Tensor,
    *,
    tol: float,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
    restart: int = 60,
) -> SolveResult:
    """x (n + m,) with ‖r − M x‖ ≤ tol ‖r‖ for M = [[A, U], [Vᵀ, W]]: ``matvec`` V ↦ A V on
    (n, k) blocks, ``columns`` U (n, m), ``rows`` V (n, m), ``corner`` W (m, m), ``rhs`` r (n + m,);
    ``preconditioner`` V ↦ P⁻¹V (SPD, ≈ A⁻¹) or None for P = I; ``max_iter`` bounds the GMRES
    iterations (default 10 (n + m)). The residual is recomputed exactly at the end (one product).
    ``negative_curvature`` is not judged here (False)."""
    n, m = columns.shape
    if rows.shape != (n, m) or corner.shape != (m, m) or rhs.shape != (n + m,):
        raise bad_value(
            "bordered system shapes",
            f"U, V (n, m), W (m, m), r (n + m,) with n = {n}, m = {m}",
            (tuple(rows.shape), tuple(corner.shape), tuple(rhs.shape)),
        )
    if not tol > 0:
        raise bad_value("tol", "a number > 0", tol)
    like = rhs
    apply_p = preconditioner or (lambda block: block)

    def as_torch(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(dtype=like.dtype, device=like.device)

    def as_numpy(t: Tensor) -> np.ndarray:
        return t.detach().to(device="cpu", dtype=torch.float64).numpy()

    def product(x: Tensor) -> Tensor:
        top = matvec(x[:n, None])[:, 0] + columns @ x[n:]
        return torch.cat([top, rows.mT @ x[:n] + corner @ x[n:]])

    p_columns = apply_p(columns)  # P⁻¹U (n, m)
    schur = corner - rows.mT @ p_columns  # S = W − VᵀP⁻¹U
    magnitudes = torch.linalg.svdvals(schur)
    singular = bool(magnitudes[-1] <= m * torch.finfo(schur.dtype).eps * magnitudes[0]) or not bool(magnitudes[0] > 0)

    def precondition(r: Tensor) -> Tensor:
        y = apply_p(r[:n, None])[:, 0]
        if singular:  # M_P itself is singular (S = 0 by accident): block-diagonal diag(P⁻¹, I) instead
            return torch.cat([y, r[n:]])
        x_p = torch.linalg.solve(schur, r[n:] - rows.mT @ y)
        return torch.cat([y - p_columns @ x_p, x_p])

    products = 0

    def m_vector(x: np.ndarray) -> np.ndarray:
        nonlocal products
        products += 1
        return as_numpy(product(as_torch(x.reshape(-1))))

    iterations = 0

    def count(_: object) -> None:
        nonlocal iterations
        iterations += 1

    size = n + m
    operator = scipy.sparse.linalg.LinearOperator((size, size), matvec=m_vector, dtype=np.float64)
    inverse = scipy.sparse.linalg.LinearOperator(
        (size, size), dtype=np.float64, matvec=lambda x: as_numpy(precondition(as_torch(x.reshape(-1))))
    )
    restart = min(restart, size)
    cap = max_iter if max_iter is not None else 10 * size
    # scipy's own BLAS work is small; keep its threads from fighting torch's (see deflation.ritz_pairs)
    bnorm = torch.linalg.vector_norm(rhs)
    x = None if x0 is None else as_numpy(x0)
    goal = tol
    for _ in range(3):  # GMRES stops on its preconditioned residual: tighten it while the true one is above tol
        with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
            x, _ = scipy.sparse.linalg.gmres(
                operator,
                as_numpy(rhs),
                x0=x,
                rtol=goal,
                atol=0.0,
                restart=restart,
                maxiter=max(1, -(-(cap - iterations) // restart)),
                M=inverse,
                callback=count,
                callback_type="pr_norm",
            )
        solution = as_torch(x)
        products += 1
        residual = torch.linalg.vector_norm(rhs - product(solution))
        relative = residual / bnorm if bnorm > 0 else residual
        if relative <= tol or iterations >= cap:
            break
        goal = goal * float(tol / relative)
    return SolveResult(
        solution, iterations, products, relative.reshape(1), torch.zeros(1, dtype=torch.bool), bool(relative <= tol)
    )
