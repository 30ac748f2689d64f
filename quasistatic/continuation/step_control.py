"""Step control of the quasi-static engine, apart from the engine loop (as diffrax separates its
step-size controller): the size a step is tried at, whether a tried step is kept, and the next size.

The rules are those of numerical continuation (pacopy, BifurcationKit): a step is capped before it
is tried so that λ and γ change by at most ``max_control_change`` of max(|value|, 1) at the current
rates (a steep stretch gets small steps up front instead of rejected ones); it is rejected and
retried at h/2 when the corrector does not reach the run's tolerances within its iteration budget or
the step leaves the control domain; after an accepted step that was not itself retried and whose
correction took at most half the budget, h doubles (up to the nominal 1/steps).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..thermo.objective import Controls

__all__ = ["StepControl", "StepSizeError"]


class StepSizeError(RuntimeError):
    """The step had to shrink below ``min_step``: the process cannot be followed."""


@dataclass(frozen=True)
class StepControl:
    h_max: float  # the nominal step, 1/steps
    min_step: float = 1e-5  # smallest step before StepSizeError
    max_control_change: float = 0.2  # a step changes λ and γ by at most this × max(|value|, 1)
    budget: int = 6  # corrector iterations a step may take before it is retried at h/2

    def first(self, h: float, s: float, controls: Controls, slope: Tensor, adapts: bool) -> float:
        """The size to try a step at: the kept h, at most the rest of [0, 1], and (when the
        corrector judges steps, ``adapts``) capped by the control change at the current rates."""
        h = min(h or self.h_max, 1.0 - s)
        if not adapts:  # without a corrector the steps stay the uniform 1/steps
            return h
        for value, rate in zip((controls.lam, controls.gamma), slope[-3:-1].tolist()):
            if rate != 0:
                h = min(h, self.max_control_change * max(abs(value), 1.0) / abs(rate))
        return h

    def retry(self, h: float, s: float, controls: Controls, failure: str) -> float:
        """h/2 after a rejected step; StepSizeError (naming the point and ``failure``) below
        ``min_step``."""
        h /= 2
        if h < self.min_step:
            raise StepSizeError(
                f"the step size fell below {self.min_step:g} at s={s:.6g} (lambda={controls.lam:.6g}, "
                f"gamma={controls.gamma:.6g}, t={controls.t:.6g}): {failure}; a step that keeps shrinking usually "
                "means the equilibrium branch ends or branches here (a fold or bifurcation of the surface, "
                "where the Hessian of J becomes singular)"
            )
        return h

    def next(self, h: float, corrector_iterations: int, rejected: int, adapts: bool) -> float:
        """The size after an accepted step of size h."""
        grow = adapts and not rejected and corrector_iterations <= self.budget // 2
        return min(2 * h, self.h_max) if grow else h
