"""What a process reads to choose its rates: the total derivatives of R, D, C and F along the
equilibrium surface (eqs. 21, 27, 29, 30).

This module holds only the container, so that the process contract (:mod:`quasistatic.processes`)
does not depend on the linear algebra that computes it (:mod:`quasistatic.continuation.tangents`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import choice_error

__all__ = ["Sensitivities", "FUNCTIONALS", "CONTROLS"]

FUNCTIONALS = ("R", "D", "C", "F")
CONTROLS = ("lam", "gamma", "t")


@dataclass(frozen=True)
class Sensitivities:
    """matrix: (4, 3) total derivatives, rows R, D, C, F, columns λ, γ, t."""

    matrix: Tensor
    values: Tensor

    def __call__(self, functional: str, control: str) -> float:
        """X_s, e.g. ``s("C", "lam")`` is C_λ of eq. 21."""
        if functional not in FUNCTIONALS:
            raise choice_error("functional", FUNCTIONALS, functional)
        if control not in CONTROLS:
            raise choice_error("control", CONTROLS, control)
        return float(self.matrix[FUNCTIONALS.index(functional), CONTROLS.index(control)])

    def free_energy_hessian(self) -> Tensor:
        """∇²F(λ, γ) = [[D_λ, D_γ], [C_λ, C_γ]] (Remark 7, eq. 29); symmetric, ⪯ 0 (Lemma 3)."""
        return self.matrix[1:3, 0:2]
