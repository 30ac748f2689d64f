"""Preconditioners for the Krylov solves of A X = B, A = ∇²θJ (eqs. 18, 25 and the corrector's Newton
systems), behind one registry.

A preconditioner is a symmetric positive definite P ≈ |A| used through P⁻¹ (preconditioned CG and
MINRES) and its symmetric square root P^{-1/2} (whitened L-BFGS in the polish). It is built at one
point (θ, λ, γ, t) and reused at the following ones while the iteration counts say it still fits;
:class:`~quasistatic.linalg.linear_solve.LinearSolve` decides when to rebuild it. P only changes
how fast the exact solve converges, never what it converges to.

Registered here:

- ``none``: P = I.
- ``dense``: A assembled from blocks of Hessian-vector products (on a subsample of the training
  set, chosen by the LinearSolve) and eigendecomposed; P = V max(|Λ|, floor·max|Λ|) Vᵀ. The
  absolute value and the floor keep P positive definite where A (or its subsample) has negative or
  near-zero eigenvalues. Memory 2n² floats: the size limit ``max_size`` (default 6,000 parameters,
  ~0.6 GB in float64 and ~1 min of eigendecomposition on 2 cores) refuses larger models with a
  message that names the others.
- ``cholesky``: A assembled the same way (on the whole training set by default: a subsample's
  Hessian is indefinite — the (64, 64) model's encoder block on a quarter of the data has
  eigenvalues down to −0.86 — and the shift would have to cover it) and factorized as
  A + μI = LLᵀ, μ the first of 0, 1e-8 s, 1e-7 s, … (s = max |Aᵢᵢ|) at which the factorization
  succeeds (Nocedal & Wright 2006, Alg. 3.3: the shift is only as large as A's negative part
  needs, so P keeps the soft eigenvalues the floor of ``dense`` flattens). Kept as the explicit
  P⁻¹ (one matrix-vector product per column and iteration). A Cholesky factorization costs
  n³/3 against ~9n³ for the eigendecomposition: 37 s against an extrapolated ~15 min at the
  (64, 64) model's n = 18,337 on one core of this VM, so its size limit is 20,000 parameters
  (n² floats kept, 2n² while it is assembled or factorized: 5.4 GB at n = 18,337 in float64). It has
  no symmetric square root at hand, so it cannot whiten the polish nor serve as deflation's base.

``kfac`` (Kronecker factors of the Gauss–Newton matrix) and ``deflation`` (a recycled subspace of
Ritz vectors) are registered by their own modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import bad_value
from ..thermo.objective import Controls, Objective
from ..registry import Registry
from .krylov import assemble
from .operators import CurvatureOperator

__all__ = [
    "Preconditioner",
    "IdentityPreconditioner",
    "DensePreconditioner",
    "PRECONDITIONERS",
    "register_preconditioner",
    "available_preconditioners",
    "make_preconditioner",
    "CholeskyPreconditioner",
    "DENSE_MAX_SIZE",
    "CHOLESKY_MAX_SIZE",
    "check_matrix_size",
]

DENSE_MAX_SIZE = 6000  # parameters: the dense preconditioner keeps 2n² floats (0.6 GB in float64 here)
CHOLESKY_MAX_SIZE = 20_000  # parameters: cholesky keeps n² floats and needs 2n² while it is built (6.4 GB at the limit)


class Preconditioner(ABC):
    """An SPD P ≈ |A| built at one point; ``apply`` is V ↦ P⁻¹V, ``apply_inverse_sqrt`` is
    V ↦ P^{-1/2}V (symmetric square root), both on (n, k) blocks."""

    name: str = ""

    @abstractmethod
    def apply(self, block: Tensor) -> Tensor:
        """P⁻¹ V for V (n, k)."""

    @abstractmethod
    def apply_inverse_sqrt(self, block: Tensor) -> Tensor:
        """P^{-1/2} V for V (n, k), with P^{-1/2} symmetric."""

    @property
    def memory_bytes(self) -> int:
        """Bytes of the tensors it keeps."""
        return 0

    @property
    def smallest_eigenvalue(self) -> float | None:
        """λ_min of the matrix it was built from, when the build computed it (else None)."""
        return None


class IdentityPreconditioner(Preconditioner):
    """P = I: plain CG and MINRES."""

    name = "none"

    def apply(self, block: Tensor) -> Tensor:
        return block

    def apply_inverse_sqrt(self, block: Tensor) -> Tensor:
        return block


class DensePreconditioner(Preconditioner):
    """P = V max(|Λ|, floor · max|Λ|) Vᵀ from the eigendecomposition of the assembled A."""

    name = "dense"

    def __init__(self, matrix: Tensor, floor: float) -> None:
        if not 0 < floor < 1:
            raise bad_value("dense preconditioner floor", "a number in (0, 1)", floor)
        eigenvalues, self.vectors = torch.linalg.eigh((matrix + matrix.mT) / 2)  # ascending, (n,), (n, n)
        self.eigenvalues = eigenvalues
        magnitude = eigenvalues.abs()
        self.inverse = 1.0 / magnitude.clamp_min(floor * float(magnitude.max()))  # (n,)

    def apply(self, block: Tensor) -> Tensor:
        return self.vectors @ (self.inverse[:, None] * (self.vectors.mT @ block))

    def apply_inverse_sqrt(self, block: Tensor) -> Tensor:
        return self.vectors @ (self.inverse.sqrt()[:, None] * (self.vectors.mT @ block))

    @property
    def memory_bytes(self) -> int:
        return (
            self.vectors.numel() * self.vectors.element_size() + 2 * self.inverse.numel() * self.inverse.element_size()
        )

    @property
    def smallest_eigenvalue(self) -> float:
        return float(self.eigenvalues[0])


class CholeskyPreconditioner(Preconditioner):
    """P = A + μI = LLᵀ from the assembled A, μ ≥ 0 the smallest shift of the sequence 0, 1e-8 s,
    1e-7 s, … (s = max |Aᵢᵢ|) for which the Cholesky factorization succeeds; kept as P⁻¹."""

    name = "cholesky"

    def __init__(self, matrix: Tensor, first_shift: float = 1e-8) -> None:
        """Factorize ``matrix`` (its lower triangle is read); its storage is shifted in place and then
        holds P⁻¹, so that the build needs 2n² floats (the matrix and one factor) and keeps n²."""
        if not 0 < first_shift < 1:
            raise bad_value("cholesky first_shift", "a number in (0, 1)", first_shift)
        if not bool(torch.isfinite(matrix).all()):
            raise bad_value("the Hessian for preconditioner 'cholesky'", "finite", "a matrix with inf or nan")
        scale = float(matrix.diagonal().abs().max()) or 1.0
        bound = float(matrix.abs().sum(dim=1).max())  # Gershgorin: A + μI is positive definite for μ > bound
        self.shift, self.attempts = 0.0, 1
        factor, info = torch.linalg.cholesky_ex(matrix)
        while int(info) != 0:
            if self.shift > 2 * bound:
                raise ArithmeticError(
                    f"no Cholesky factorization of A + {self.shift:.3g} I (Gershgorin bound {bound:.3g})"
                )
            del factor
            added = first_shift * scale if self.shift == 0 else 9 * self.shift  # μ grows ×10 per attempt
            matrix.diagonal().add_(added)
            self.shift += added
            self.attempts += 1
            factor, info = torch.linalg.cholesky_ex(matrix)
        self.inverse = torch.cholesky_inverse(factor, out=matrix)  # (n, n), symmetric, in the matrix's storage

    @property
    def positive_definite(self) -> bool:
        """Whether the assembled matrix itself (μ = 0) had a Cholesky factorization: for the exact
        Hessian on the whole training set, that the build point is a minimum (to round-off)."""
        return self.shift == 0

    def apply(self, block: Tensor) -> Tensor:
        if block.shape[1] >= 8:
            return self.inverse @ block
        # a few columns: one matrix-vector product each (OpenBLAS, n = 18,337, one thread: 0.09 s per
        # column this way, 0.43 s for two columns at once, 0.57 s for eight)
        return torch.stack([self.inverse @ column for column in block.unbind(dim=1)], dim=1)

    def apply_inverse_sqrt(self, block: Tensor) -> Tensor:
        raise NotImplementedError("preconditioner 'cholesky' keeps no symmetric square root P^(-1/2)")

    @property
    def memory_bytes(self) -> int:
        return self.inverse.numel() * self.inverse.element_size()


def check_matrix_size(n: int, max_size: int = DENSE_MAX_SIZE, name: str = "dense") -> None:
    """Refuse ``name`` (``dense`` or ``cholesky``, which keep n × n matrices) for a model of n
    parameters above ``max_size`` (the error names the others)."""
    if n > max_size:
        others = (
            f"'cholesky' (up to {CHOLESKY_MAX_SIZE:,} parameters), "
            if name == "dense" and n <= CHOLESKY_MAX_SIZE
            else ""
        )
        raise bad_value(
            f"the model's parameter count for preconditioner '{name}'",
            f"at most max_size = {max_size} (use preconditioner {others}'kfac' or 'deflation' for larger "
            "models, or raise max_size)",
            n,
        )


def _assembled(
    objective: Objective, theta: Tensor, controls: Controls, name: str, max_size: int, operator: str
) -> Tensor:
    """The (n, n) matrix of ``operator`` on ``objective`` for preconditioner ``name``, from n HVPs
    (refused above ``max_size`` before any work)."""
    check_matrix_size(theta.numel(), max_size, name)
    return assemble(CurvatureOperator(objective, theta, controls, kind=operator), theta.numel(), theta)


def _dense(
    objective: Objective,
    theta: Tensor,
    controls: Controls,
    *,
    floor: float = 1e-3,
    max_size: int = DENSE_MAX_SIZE,
    operator: str = "hessian",
) -> DensePreconditioner:
    """Build ``dense`` on ``objective`` (the LinearSolve passes its subsample): n HVPs, one
    eigendecomposition."""
    return DensePreconditioner(_assembled(objective, theta, controls, "dense", max_size, operator), floor)


def _cholesky(
    objective: Objective,
    theta: Tensor,
    controls: Controls,
    *,
    first_shift: float = 1e-8,
    max_size: int = CHOLESKY_MAX_SIZE,
    operator: str = "hessian",
) -> CholeskyPreconditioner:
    """Build ``cholesky`` on ``objective`` (the whole training set unless the LinearSolve is told
    otherwise): n HVPs, one to a few Cholesky factorizations, one inverse."""
    return CholeskyPreconditioner(_assembled(objective, theta, controls, "cholesky", max_size, operator), first_shift)


def _identity(objective: Objective, theta: Tensor, controls: Controls) -> IdentityPreconditioner:
    return IdentityPreconditioner()


# factory(objective, theta, controls, **options) -> Preconditioner; the objective is the one to
# build on (a subsample of the training set when the LinearSolve asks for one), and the factory
# counts its work on objective.work.
PRECONDITIONERS: Registry[Preconditioner] = Registry("preconditioner")
PRECONDITIONERS.register("none", _identity)
PRECONDITIONERS.register("dense", _dense)
PRECONDITIONERS.register("cholesky", _cholesky)


def register_preconditioner(name: str, factory: Callable[..., Preconditioner], *, replace: bool = False) -> None:
    """Make ``factory(objective, theta, controls, **options) -> Preconditioner`` available as ``name``."""
    PRECONDITIONERS.register(name, factory, replace=replace)


def available_preconditioners() -> list[str]:
    return PRECONDITIONERS.available()


def make_preconditioner(
    name: str, objective: Objective, theta: Tensor, controls: Controls, **options: Any
) -> Preconditioner:
    return PRECONDITIONERS.make(name, objective, theta.detach(), controls, **options)
