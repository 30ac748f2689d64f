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
  message that names ``kfac``.

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
    "DENSE_MAX_SIZE",
    "check_dense_size",
]

DENSE_MAX_SIZE = 6000  # parameters: the dense preconditioner keeps 2n² floats (0.6 GB in float64 here)


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


def check_dense_size(n: int, max_size: int = DENSE_MAX_SIZE) -> None:
    """Refuse ``dense`` for a model of n parameters above ``max_size`` (the error names the others)."""
    if n > max_size:
        raise bad_value(
            "the model's parameter count for preconditioner 'dense'",
            f"at most max_size = {max_size} (use preconditioner 'kfac' or 'deflation' for larger "
            "models, or raise max_size)",
            n,
        )


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
    n = theta.numel()
    check_dense_size(n, max_size)
    op = CurvatureOperator(objective, theta, controls, kind=operator)
    return DensePreconditioner(assemble(op, n, theta), floor)


def _identity(objective: Objective, theta: Tensor, controls: Controls) -> IdentityPreconditioner:
    return IdentityPreconditioner()


# factory(objective, theta, controls, **options) -> Preconditioner; the objective is the one to
# build on (a subsample of the training set when the LinearSolve asks for one), and the factory
# counts its work on objective.work.
PRECONDITIONERS: Registry[Preconditioner] = Registry("preconditioner")
PRECONDITIONERS.register("none", _identity)
PRECONDITIONERS.register("dense", _dense)


def register_preconditioner(name: str, factory: Callable[..., Preconditioner], *, replace: bool = False) -> None:
    """Make ``factory(objective, theta, controls, **options) -> Preconditioner`` available as ``name``."""
    PRECONDITIONERS.register(name, factory, replace=replace)


def available_preconditioners() -> list[str]:
    return PRECONDITIONERS.available()


def make_preconditioner(
    name: str, objective: Objective, theta: Tensor, controls: Controls, **options: Any
) -> Preconditioner:
    return PRECONDITIONERS.make(name, objective, theta.detach(), controls, **options)
