"""The paper's processes (Secs. 3–4), each registered by name.

Pseudo-time s runs over [0, 1]; a process that moves λ from λ₀ to λ_end does so at the constant
rate λ̇ = λ_end − λ₀, and a transfer moves t from 0 to 1 at ṫ = 1.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import bad_value
from ..thermo.objective import Controls
from ..registry import Parameter
from ..thermo.sensitivities import Sensitivities
from .base import ConstraintProcess, Process, Rates, ResidualForm, SingularConstraintError, register_process

__all__ = [
    "Free",
    "IsoClassification",
    "IsoClassificationRate",
    "IsoClassificationTransfer",
    "ConstantLambdaRate",
    "GeodesicTransfer",
]


_LAM_END = Parameter("lam_end", float, None, "final λ: λ̇ = λ_end − λ₀ over s ∈ [0, 1]")


def _lam_rate(start: Controls, lam_end: float | None) -> float:
    if lam_end is None:
        raise bad_value("lam_end", "a number (the final lambda)", lam_end)
    if not lam_end >= 0:
        raise bad_value("lam_end", "a number >= 0", lam_end)
    return lam_end - start.lam


class Free(Process):
    """Lemma 5: (λ̇, γ̇) given, θ̇ = θ_λλ̇ + θ_γγ̇ (eq. 17)."""

    parameters = (
        Parameter("lam_rate", float, 0.0, "λ̇, the change of λ over s ∈ [0, 1]"),
        Parameter("gamma_rate", float, 0.0, "γ̇, the change of γ over s ∈ [0, 1]"),
    )

    def __init__(self, start: Controls, lam_rate: float = 0.0, gamma_rate: float = 0.0) -> None:
        super().__init__(start)
        if lam_rate == 0 and gamma_rate == 0:
            raise bad_value("(lam_rate, gamma_rate)", "not both zero", (lam_rate, gamma_rate))
        self.rates = (lam_rate, gamma_rate)

    def control_velocity(self, s: float, controls: Controls, sensitivities: Sensitivities) -> Rates:
        return self.rates[0], self.rates[1], 0.0

    def residual_form(self) -> ResidualForm:
        return ResidualForm(self.start, (*self.rates, 0.0), solves_gamma=False)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lam_rate": self.rates[0], "gamma_rate": self.rates[1]}


class IsoClassification(ConstraintProcess):
    """dC = 0 with θ on the surface (eqs. 19–20): λ̇ = λ_end − λ₀ and γ̇ = −C_λλ̇ / C_γ, or, with
    ``alpha``, Remark 7's form λ̇ = −α C_γ, γ̇ = α C_λ (eqs. 22, 31)."""

    parameters = (
        _LAM_END,
        Parameter("alpha", float, None, "Remark 7's time scale: λ̇ = −αC_γ, γ̇ = αC_λ instead of a lam_end"),
    )

    def __init__(self, start: Controls, lam_end: float | None = None, alpha: float | None = None) -> None:
        super().__init__(start)
        if (lam_end is None) == (alpha is None):
            raise bad_value(
                "iso-classification parameters", "exactly one of lam_end or alpha", {"lam_end": lam_end, "alpha": alpha}
            )
        self.alpha = alpha
        self.lam_rate = None if alpha is not None else _lam_rate(start, lam_end)
        if self.lam_rate == 0:
            raise bad_value("lam_end", f"different from the starting lambda {start.lam}", lam_end)

    def driven_rates(self, s: float, controls: Controls) -> tuple[float, float]:
        # the alpha form (lam_rate None) overrides control_velocity and has no residual form
        assert self.lam_rate is not None
        return self.lam_rate, 0.0

    def residual_form(self) -> ResidualForm | None:
        return None if self.alpha is not None else super().residual_form()  # the α form is an ODE in (λ, γ)

    def control_velocity(self, s: float, controls: Controls, sensitivities: Sensitivities) -> Rates:
        if self.alpha is None:
            return super().control_velocity(s, controls, sensitivities)
        c_lam, c_gamma = sensitivities("C", "lam"), sensitivities("C", "gamma")
        if c_gamma == 0 and c_lam == 0:
            raise SingularConstraintError(
                f"C_lambda and C_gamma must not both vanish for Remark 7's alpha form, got 0 and 0 at {controls}"
            )
        return -self.alpha * c_gamma, self.alpha * c_lam, 0.0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lam_rate": self.lam_rate, "alpha": self.alpha}


class IsoClassificationRate(ConstraintProcess):
    """Remark 8: C + β⁻¹R held constant while λ moves from λ₀ to λ_end."""

    parameters = (_LAM_END, Parameter("beta", float, 1.0, "β of C + β⁻¹R"))

    def __init__(self, start: Controls, lam_end: float | None = None, beta: float = 1.0) -> None:
        super().__init__(start)
        if not beta > 0:
            raise bad_value("beta", "a number > 0", beta)
        self.beta = beta
        self.lam_rate = _lam_rate(start, lam_end)

    @property
    def constraint(self) -> tuple[float, float, float]:
        return (1.0 / self.beta, 0.0, 1.0)

    def driven_rates(self, s: float, controls: Controls) -> tuple[float, float]:
        return self.lam_rate, 0.0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lam_rate": self.lam_rate, "beta": self.beta}


class IsoClassificationTransfer(ConstraintProcess):
    """Eqs. 26–28: the data move (ṫ = 1), λ̇ given, γ̇ = −(C_λλ̇ + C_t) / C_γ keeps C constant."""

    uses_mixture = True
    parameters = (Parameter("lam_end", float, None, "final λ, λ̇ = λ_end − λ₀ (default: λ kept)"),)

    def __init__(self, start: Controls, lam_end: float | None = None) -> None:
        super().__init__(start)
        self.lam_rate = 0.0 if lam_end is None else _lam_rate(start, lam_end)

    def driven_rates(self, s: float, controls: Controls) -> tuple[float, float]:
        return self.lam_rate, 1.0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lam_rate": self.lam_rate}


class ConstantLambdaRate(IsoClassificationTransfer):
    """Eq. 32: λ̇ = k constant while the data move, γ̇ from the iso-classification constraint."""

    parameters = (Parameter("k", float, -1.5, "λ̇, constant (the paper's -1.5 with λ = 4)"),)

    def __init__(self, start: Controls, k: float = -1.5) -> None:
        super().__init__(start)
        self.lam_rate = k


class GeodesicTransfer(Process):
    """Eq. 30: the R–D path is a straight line of slope k = dD/dR at constant C while ṫ = 1.

    Ḋ = kṘ and Ċ = 0 with the total derivatives along the surface X_s (rows R, D, C of the
    sensitivities) give the 2×2 system

        (D_λ − kR_λ)λ̇ + (D_γ − kR_γ)γ̇ = −(D_t − kR_t),    C_λλ̇ + C_γγ̇ = −C_t.

    The paper eliminates Ṙ with the first law, Ṙ = −λḊ + ρ (ρ = ∂_tJ at fixed θ), which gives
    D_λλ̇ + D_γγ̇ = kρ/(1 + kλ) − D_t; the two agree when σ = 0 (tests/test_processes.py), and the
    form here stays exact with the σS term, whose σṠ the paper's form leaves out.
    """

    uses_mixture = True
    parameters = (Parameter("slope", float, None, "k = dD/dR of the R–D line (required)"),)

    def __init__(self, start: Controls, slope: float | None = None) -> None:
        super().__init__(start)
        if slope is None:
            raise bad_value("slope", "a number k = dD/dR", slope)
        if 1 + slope * start.lam == 0:
            raise bad_value("slope", f"different from -1/lambda = {-1 / start.lam:.6g} (1 + k*lambda = 0)", slope)
        self.slope = slope

    @property
    def constraint(self) -> tuple[float, float, float]:
        return (0.0, 0.0, 1.0)

    def control_velocity(self, s: float, controls: Controls, sensitivities: Sensitivities) -> Rates:
        k, m = self.slope, sensitivities.matrix
        system = torch.stack([m[1, :2] - k * m[0, :2], m[2, :2]])  # rows: D − kR and C; columns λ, γ
        rhs = -torch.stack([m[1, 2] - k * m[0, 2], m[2, 2]])
        if torch.linalg.matrix_rank(system) < 2:
            raise SingularConstraintError(
                f"the system of eq. 30 must be non-singular, got {system.tolist()} at "
                f"lambda={controls.lam:.6g}, gamma={controls.gamma:.6g}, t={controls.t:.6g}"
            )
        lam_dot, gamma_dot = torch.linalg.solve(system, rhs).tolist()
        return lam_dot, gamma_dot, 1.0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "slope": self.slope}


register_process("free", Free)
register_process("iso-classification", IsoClassification)
register_process("iso-c-rate", IsoClassificationRate)
register_process("iso-classification-transfer", IsoClassificationTransfer)
register_process("constant-lambda-rate", ConstantLambdaRate)
register_process("geodesic-transfer", GeodesicTransfer)
