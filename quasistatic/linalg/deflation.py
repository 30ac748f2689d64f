"""``deflation``: a recycled-subspace (spectral limited-memory) preconditioner built from Ritz pairs
of A = ∇²θJ, carried from one solve point to the next and refined there.

The preconditioner (spectral LMP, Gratton, Sartenaer & Tshimanga 2011, "On a class of limited
memory preconditioners for large scale linear systems with multiple right-hand sides", SIAM J.
Optim. 21(3); the spectral case of their Section 3.2). With W (n, k) orthonormal Ritz vectors of A,
θ (k,) their Ritz values, Π = WWᵀ and Π⊥ = I − Π:

    P⁻¹     = W D⁻¹ Wᵀ + ν⁻¹ Π⊥ S Π⊥ S Π⊥,        D = diag(max(|θᵢ|, floor · max|θ|)),
    P^{-1/2} = W D^{-1/2} Wᵀ + ν^{-1/2} Π⊥ S Π⊥,

where S = B^{-1/2} is the symmetric square root of an optional ``base`` preconditioner B (S = I
without one). Without a base this is the spectral LMP scaled by 1/ν,

    P⁻¹ = ν⁻¹ [I + W (ν D⁻¹ − I) Wᵀ],

and ν defaults to max|θ|, the largest kept Ritz value: if W spans an invariant subspace of A,
P⁻¹A is 1 on it and λ/ν on the rest, so the deflated eigenvalues land at the lower edge of what
remains (λ ≥ ν roughly) and κ(P⁻¹A) drops from λ_max/λ_min to about λ_max/ν. (CG is invariant
under a scaling of P as a whole; ν matters for the relative placement and for the whitened
operator P^{-1/2}AP^{-1/2} of the L-BFGS polish, whose smallest eigenvalue it makes ≈ 1.)
With a base, ν defaults to 1 (B ≈ |A| already maps the directions it fits to ≈ 1). The two terms
act on orthogonal subspaces, so P^{-1/2} is symmetric, P^{-1/2}P^{-1/2} = P⁻¹ exactly, and P is
SPD whatever the signs of θ (the absolute value and the floor make D positive; a Ritz value ≤ 0,
the Hessian being indefinite away from a minimum, is deflated at |θ|: P⁻¹A is then −1 there,
which MINRES handles). When W is A-invariant, P^{-1/2}AP^{-1/2} is block diagonal: sign(θ) on W
and the base-preconditioned A compressed to W⊥ on the rest.

Why the base acts on W⊥ rather than the Ritz pairs being those of the base-preconditioned
S A S (the LMP with a first-level preconditioner, P⁻¹ = S M S with M the spectral LMP of S A S):
that P⁻¹ is SPD and deflates exactly, but its symmetric square root (S M S)^{1/2} has no cheap
form (S M^{1/2} is a square-root factor but not symmetric, and the ``Preconditioner`` contract asks
for the symmetric one). Here the Ritz pairs are those of A itself, computed with B as the
eigensolver's preconditioner, and ``smallest_eigenvalue`` is an estimate of λ_min(A), whatever
the base, which is what a fold detector needs.

The Ritz pairs and their recycling. ``scipy.sparse.linalg.lobpcg`` (Knyazev 2001) computes the k
algebraically smallest eigenpairs of A through a ``LinearOperator`` on the Hessian-vector products
(float64 numpy ↔ torch; each product counts on ``objective.work`` through
:class:`~quasistatic.linalg.operators.CurvatureOperator`), preconditioned by B⁻¹ when a base is
given. At the next point it is started from the previous point's W (``previous=``), refined with
a few iterations instead of recomputed: the recycled-subspace idea of GCRO-DR (Parks, de Sturler,
Mackey, Johnson & Maiti 2006, "Recycling Krylov subspaces for sequences of linear systems", SIAM
J. Sci. Comput. 28(5)), applied here to the preconditioner rather than to the Krylov method. A
build costs about k products for the start block, k per iteration on the unconverged columns, and
k for scipy's final Rayleigh–Ritz step.

What it can and cannot do here (measured on the digits default model at equilibrium, 2,625
parameters, λ = 1, γ = 10, float64, one thread; right-hand sides −∂θ∇J/∂λ, −∂θ∇J/∂γ; PCG
iterations for the two columns to relative residual 1e-2 | 1e-6). The Hessian has 1,375
eigenvalues below 0.05 (λ_min ≈ 1.5e-3, λ₁₇ ≈ 9.3e-3, λ₆₅ ≈ 2.2e-2, λ_max ≈ 134): deflation
cannot remove the bulk, only shave its bottom, so even exact eigenvectors only halve CG at 1e-6:

    P = I                                       138, 81 | 602, 532
    exact eigenvectors, k = 16 | 64 | 256        96, 76 | 288, 267;  71, 57 | 197, 183;  61, 52 | 169, 161
    k = 16, cold, 20 it (368 HVPs, 2.8 s)       137, 79 | 590, 527   (θ_min 2.7e-2: not converged)
    k = 16, cold, 100 it (1,648 HVPs, 8.3 s)     98, 68 | 382, 376
    k = 64, cold, 20 it (1,472 HVPs, 9.0 s)      81, 63 | 309, 286
    k = 64, cold, 100 it (6,592 HVPs, 42 s)      71, 57 | 238, 221

Unpreconditioned LOBPCG converges slowly in this cluster (residuals ‖Aw − θw‖ stay ~1e-2, the
size of the eigenvalues). Recycling works: at a nearby point (θ* + 0.05 θ_λ, λ = 1.05), 5
iterations from the previous W (k = 64, 512 HVPs, 4.5 s) give 68, 62 | 203, 190, against
81, 65 | 319, 283 for a cold build of 1,472 HVPs (and 240, 226 reusing the old P unrefined).
The best use measured is with a base: ``dense`` on a 10 % subsample alone gives 37, 23 |
141, 132; with the 64 smallest Ritz pairs of the full Hessian on top (LOBPCG preconditioned by
it, 20 it, 1,472 HVPs, 10 s) 17, 17 | 58, 55, and θ_min = 1.518e-3 (λ_min 1.513e-3), because
the subsample misjudges exactly the flattest directions. Built on the subsample itself,
deflation does nothing (its smallest eigenpairs, down to −0.65, are the subsample's own).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch
from threadpoolctl import threadpool_limits  # installed with scikit-learn
from torch import Tensor

from ..errors import bad_value
from ..thermo.objective import Controls, Objective
from .operators import CurvatureOperator
from .preconditioners import Preconditioner, make_preconditioner, register_preconditioner

__all__ = ["DeflationPreconditioner", "RitzPairs", "ritz_pairs", "build_deflation"]

Matvec = Callable[[Tensor], Tensor]  # V (n, k) -> A V (n, k)


class DeflationPreconditioner(Preconditioner):
    """P⁻¹ = W D⁻¹ Wᵀ + ν⁻¹ Π⊥ S Π⊥ S Π⊥, P^{-1/2} = W D^{-1/2} Wᵀ + ν^{-1/2} Π⊥ S Π⊥
    (module docstring), from orthonormal Ritz vectors W (n, k), Ritz values θ (k,) of any sign, and an
    optional base preconditioner whose symmetric square root is S (S = I without one).

    scale: ν; None for max|θ| without a base, 1 with one.
    floor: the smallest |θᵢ| kept, as a fraction of max|θ| (keeps D⁻¹ bounded near a fold).
    ``info`` holds what the build measured (products, iterations, residual norms), when built by
    :func:`build_deflation`.
    """

    name = "deflation"

    def __init__(
        self,
        vectors: Tensor,
        values: Tensor,
        base: Preconditioner | None = None,
        *,
        scale: float | None = None,
        floor: float = 1e-3,
    ) -> None:
        if not isinstance(vectors, Tensor) or vectors.ndim != 2 or not vectors.is_floating_point():
            raise bad_value("deflation vectors", "a floating-point (n, k) tensor", getattr(vectors, "shape", vectors))
        n, k = vectors.shape
        if not 1 <= k <= n:
            raise bad_value("deflation vectors shape", "(n, k) with 1 <= k <= n", tuple(vectors.shape))
        values = torch.as_tensor(values, dtype=vectors.dtype, device=vectors.device).reshape(-1)
        if values.numel() != k or not bool(torch.isfinite(values).all()):
            raise bad_value("deflation values", f"{k} finite numbers (one per vector)", values.tolist())
        gram = vectors.mT @ vectors
        tol = max(1e-6, 10 * math.sqrt(torch.finfo(vectors.dtype).eps))
        if float((gram - torch.eye(k, dtype=gram.dtype, device=gram.device)).abs().max()) > tol:
            raise bad_value(
                "deflation vectors",
                f"orthonormal columns (|WᵀW − I| <= {tol:.0e})",
                f"|WᵀW − I| = {float((gram - torch.eye(k, dtype=gram.dtype)).abs().max()):.2e}",
            )
        if isinstance(floor, bool) or not isinstance(floor, numbers.Real) or not 0 < floor <= 1:
            raise bad_value("deflation floor", "a number in (0, 1]", floor)
        largest = float(values.abs().max())
        if not largest > 0:
            raise bad_value("deflation values", "not all zero", values.tolist())
        if scale is None:
            scale = 1.0 if base is not None else largest
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf:
            raise bad_value("deflation scale", "a finite number > 0", scale)
        # Declared: mypy defers this __init__ (the package's import cycle) and could not infer them in the methods.
        self.vectors: Tensor = vectors
        self.values: Tensor = values
        self.base: Preconditioner | None = base
        self.scale: float = float(scale)
        self.magnitudes: Tensor = values.abs().clamp_min(floor * largest)
        self.info: dict[str, Any] = {}

    def _complement(self, block: Tensor) -> Tensor:
        """Π⊥ V."""
        return block - self.vectors @ (self.vectors.mT @ block)

    def apply(self, block: Tensor) -> Tensor:
        coefficients = self.vectors.mT @ block
        rest = block - self.vectors @ coefficients
        if self.base is not None:
            rest = self._complement(self.base.apply_inverse_sqrt(rest))
            rest = self._complement(self.base.apply_inverse_sqrt(rest))
        return rest / self.scale + self.vectors @ (coefficients / self.magnitudes[:, None])

    def apply_inverse_sqrt(self, block: Tensor) -> Tensor:
        coefficients = self.vectors.mT @ block
        rest = block - self.vectors @ coefficients
        if self.base is not None:
            rest = self._complement(self.base.apply_inverse_sqrt(rest))
        return rest / math.sqrt(self.scale) + self.vectors @ (coefficients / self.magnitudes.sqrt()[:, None])

    @property
    def rank(self) -> int:
        return self.vectors.shape[1]

    @property
    def memory_bytes(self) -> int:
        own = (self.vectors.numel() + 2 * self.values.numel()) * self.vectors.element_size()
        return own + (self.base.memory_bytes if self.base is not None else 0)

    @property
    def smallest_eigenvalue(self) -> float:
        """The smallest Ritz value (signed): an upper bound on λ_min(A), an estimate of it."""
        return float(self.values.min())


@dataclass(frozen=True)
class RitzPairs:
    """k Ritz pairs of a symmetric A from :func:`ritz_pairs`.

    values: (k,) ascending; vectors: (n, k) orthonormal; residual_norms: (k,) ‖A w − θ w‖ after the
    final Rayleigh–Ritz step; products: A-applications counted in columns (one HVP each);
    iterations: the LOBPCG iteration whose block was returned (scipy returns the iterate with the
    smallest mean residual, usually the last); converged: every residual norm ≤ tol.
    """

    values: Tensor
    vectors: Tensor
    residual_norms: Tensor
    products: int
    iterations: int
    converged: bool


def ritz_pairs(
    matvec: Matvec,
    size: int,
    rank: int,
    *,
    start: Tensor | None = None,
    iterations: int = 20,
    tol: float = 1e-4,
    preconditioner: Matvec | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    block: int = 32,
) -> RitzPairs:
    """The ``rank`` algebraically smallest eigenpairs of the symmetric A = ``matvec`` (n = ``size``)
    by ``scipy.sparse.linalg.lobpcg`` (largest=False), started from ``start`` (n, ≤ rank) when given
    (the recycled subspace; missing columns are drawn at random with ``seed``), at most
    ``iterations`` iterations, stopping once every ‖A w − θ w‖ ≤ ``tol`` (absolute, in A's units),
    preconditioned by ``preconditioner`` ≈ A⁻¹ (SPD) when given.

    LOBPCG runs in float64 numpy; the products run in ``dtype`` on ``device``. For n < 5 rank,
    scipy falls back to a dense eigensolver on A assembled from n products. For an indefinite A
    the pairs are the most negative eigenvalues, not the smallest in magnitude. ``matvec`` is
    called on at most ``block`` columns at a time (LOBPCG asks for up to 3k): on the digits model
    a vmapped HVP costs 4.3 ms per column in blocks of 16–32 and 10 ms in blocks of 64–192.
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= size:
        raise bad_value("deflation rank", f"an integer in [1, n = {size}]", rank)
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
        raise bad_value("deflation iterations", "an integer >= 1", iterations)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < math.inf:
        raise bad_value("deflation tol", "a finite number > 0", tol)
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise bad_value("deflation block", "an integer >= 1", block)
    products = 0

    def as_torch(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(dtype=dtype, device=device)

    def as_numpy(t: Tensor) -> np.ndarray:
        return t.detach().to(device="cpu", dtype=torch.float64).numpy()

    def a_block(x: np.ndarray) -> np.ndarray:
        nonlocal products
        x2 = as_torch(x.reshape(size, -1))
        products += x2.shape[1]
        out = torch.cat([matvec(x2[:, start : start + block]) for start in range(0, x2.shape[1], block)], 1)
        return as_numpy(out).reshape(x.shape)

    operator = scipy.sparse.linalg.LinearOperator((size, size), matvec=a_block, matmat=a_block, dtype=np.float64)
    m_operator = None
    if preconditioner is not None:

        def m_block(x: np.ndarray) -> np.ndarray:
            return as_numpy(preconditioner(as_torch(x.reshape(size, -1)))).reshape(x.shape)

        m_operator = scipy.sparse.linalg.LinearOperator((size, size), matvec=m_block, matmat=m_block, dtype=np.float64)

    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((size, rank))
    if start is not None:
        if not isinstance(start, Tensor) or start.ndim != 2 or start.shape[0] != size:
            raise bad_value("deflation start vectors", f"an (n = {size}, k) tensor", getattr(start, "shape", start))
        kept = min(rank, start.shape[1])
        x0[:, :kept] = as_numpy(start[:, :kept])
    x0, _ = np.linalg.qr(x0)
    # LOBPCG's own numpy work is small (n × 3k blocks), but OpenBLAS's spinning threads fight the
    # HVPs' torch threads for the cores: 49 against 6 ms per HVP on the 2-core machine under load
    # (benchmarks/README.md, "Threads"). Its BLAS gets torch's thread count for the call.
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"(?s).*(not reaching the requested tolerance|too small relative)", category=UserWarning
        )
        values, vectors, *rest = scipy.sparse.linalg.lobpcg(
            operator,
            x0,
            M=m_operator,
            tol=float(tol),
            maxiter=int(iterations),
            largest=False,
            retResidualNormsHistory=True,
        )
    history = rest[0] if rest else []  # scipy's dense fallback (n < 5 rank) returns no history
    order = np.argsort(values)
    values, vectors = values[order], vectors[:, order]
    if history:
        residuals = np.asarray(history[-1], dtype=np.float64).reshape(-1)[order]
    else:  # scipy's dense fallback: exact eigenpairs
        residuals = np.zeros(rank)
    vectors, _ = _orthonormal(vectors)
    return RitzPairs(
        values=as_torch(values),
        vectors=as_torch(vectors),
        residual_norms=as_torch(residuals),
        products=products,
        iterations=max(len(history) - 2, 0) if history else 0,
        converged=bool((residuals <= tol).all()),
    )


def _orthonormal(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-orthonormalize LOBPCG's vectors (orthonormal to rounding) keeping their order and signs."""
    q, r = np.linalg.qr(vectors)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1
    return q * signs, r


def build_deflation(
    objective: Objective,
    theta: Tensor,
    controls: Controls,
    *,
    rank: int = 32,
    iterations: int = 20,
    tol: float = 1e-4,
    base: str | Preconditioner = "none",
    base_options: dict[str, Any] | None = None,
    previous: DeflationPreconditioner | None = None,
    scale: float | None = None,
    floor: float = 1e-3,
    operator: str = "hessian",
    seed: int = 0,
) -> DeflationPreconditioner:
    """Build ``deflation`` at (θ, controls) on ``objective`` (the LinearSolve passes its subsample).

    rank: k, the number of Ritz pairs (the smallest algebraic eigenvalues of A).
    iterations, tol: LOBPCG's iteration cap and its absolute residual threshold ‖A w − θ w‖.
    base: a registered preconditioner name (built here at the same point with ``base_options``)
        or a built :class:`Preconditioner`; "none" for none. It preconditions LOBPCG (B⁻¹ ≈ A⁻¹)
        and acts on the complement of W in P (module docstring).
    previous: the preconditioner of the last point; its W starts LOBPCG here (the recycled
        subspace: columns beyond ``rank`` are dropped, missing ones drawn at random). Its base is
        not reused; ``base`` is built afresh at this point.
    scale, floor: see :class:`DeflationPreconditioner`.
    operator: "hessian" (exact A) or "ggn".
    Cost: the products LOBPCG asks for (``info["products"]``), counted as HVPs on ``objective.work``.
    """
    theta = theta.detach()
    if previous is not None and not isinstance(previous, DeflationPreconditioner):
        raise bad_value("deflation previous", "a DeflationPreconditioner or None", type(previous).__name__)
    if previous is not None and previous.vectors.shape[0] != theta.numel():
        raise bad_value(
            "deflation previous vectors", f"{theta.numel()} rows (the parameter count)", previous.vectors.shape[0]
        )
    if isinstance(base, Preconditioner):
        if base_options:
            raise bad_value("deflation base_options", "empty when base is a built preconditioner", base_options)
        base_pre: Preconditioner | None = base
    elif base == "none":
        base_pre = None
    elif base in ("deflation", "cholesky"):  # cholesky: no P^(-1/2) to whiten the complement with
        raise bad_value("deflation base", "a preconditioner other than 'deflation' and 'cholesky'", base)
    else:
        base_pre = make_preconditioner(base, objective, theta, controls, **(base_options or {}))
    op = CurvatureOperator(objective, theta, controls, kind=operator)
    pairs = ritz_pairs(
        op,
        theta.numel(),
        rank,
        start=None if previous is None else previous.vectors,
        iterations=iterations,
        tol=tol,
        preconditioner=None if base_pre is None else base_pre.apply,
        dtype=theta.dtype,
        device=theta.device,
        seed=seed,
    )
    pre = DeflationPreconditioner(pairs.vectors, pairs.values, base_pre, scale=scale, floor=floor)
    pre.info = {
        "products": pairs.products,
        "iterations": pairs.iterations,
        "converged": pairs.converged,
        "residual_norms": pairs.residual_norms,
        "warm": previous is not None,
    }
    return pre


register_preconditioner("deflation", build_deflation)
