"""Explicit Runge–Kutta methods of fixed step: each is its Butcher tableau and its order.

Written here rather than taken from torchdiffeq because the engine needs a single step of size h
that it controls (a predictor between corrector calls); torchdiffeq's fixed-grid solvers are
reached through :mod:`quasistatic.integrators.adaptive` for the adaptive methods.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import Integrator, VectorField, register_integrator

__all__ = ["ExplicitRungeKutta", "Euler", "Heun", "RK4", "Secant", "Hermite"]


class ExplicitRungeKutta(Integrator):
    """y_{n+1} = y_n + h Σ b_i k_i, k_i = f(s + c_i h, y_n + h Σ_{j<i} a_ij k_j)."""

    a: ClassVar[tuple[tuple[float, ...], ...]]  # strictly lower-triangular rows, row i has i entries
    b: ClassVar[tuple[float, ...]]
    c: ClassVar[tuple[float, ...]]

    def step(self, field: VectorField, s: float, y: Tensor, h: float) -> Tensor:
        stages: list[Tensor] = []
        for row, c_i in zip(self.a, self.c):
            y_i = y
            for a_ij, k_j in zip(row, stages):
                if a_ij:
                    y_i = y_i + h * a_ij * k_j
            stages.append(field(s + c_i * h, y_i))
        return y + h * sum(b_i * k_i for b_i, k_i in zip(self.b, stages) if b_i)


class Euler(ExplicitRungeKutta):
    order = 1
    a = ((),)
    b = (1.0,)
    c = (0.0,)


class Heun(ExplicitRungeKutta):
    """Heun's (explicit trapezoidal) method."""

    order = 2
    a = ((), (1.0,))
    b = (0.5, 0.5)
    c = (0.0, 1.0)


class RK4(ExplicitRungeKutta):
    """The classical fourth-order Runge–Kutta method."""

    order = 4
    a = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
    b = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
    c = (0.0, 0.5, 0.5, 1.0)


register_integrator("euler", Euler)
register_integrator("heun", Heun)
register_integrator("rk4", RK4)


class Secant(Euler):
    """The secant predictor of numerical continuation: y + h (y − y_prev)/(s − s_prev) from the last
    two accepted points, with no field evaluation, hence no tangent solve (BifurcationKit's
    ``Secant``). The controls are extrapolated too: exact for processes whose control rates are
    constant (iso-classification to ``lam_end``, transfers in t), an approximation of the process's
    rates otherwise (e.g. Remark 7's α-form), which the corrector does not undo. The first step,
    with no previous point, is an Euler step."""

    def slope(self, field: VectorField, s: float, y: Tensor, previous: tuple[float, Tensor] | None) -> Tensor:
        if previous is None:
            return field(s, y)
        s_previous, y_previous = previous
        return (y - y_previous) / (s - s_previous)

    def predict(
        self, field: VectorField, s: float, y: Tensor, h: float, previous: tuple[float, Tensor] | None
    ) -> Tensor:
        return y + h * self.slope(field, s, y, previous)


register_integrator("secant", Secant)


class Hermite(Euler):
    """Quadratic extrapolation from the tangent at the start of the step and the last accepted
    point: y + h ẏ + h² c, the parabola through (s_prev, y_prev) with value y and slope ẏ at s,
    c = (y_prev − y + Δ ẏ)/Δ², Δ = s − s_prev. Same tangent solve as Euler, one order more: the
    corrector starts O(h³) from the surface instead of O(h²). Without a previous point, an Euler
    step."""

    def predict(
        self, field: VectorField, s: float, y: Tensor, h: float, previous: tuple[float, Tensor] | None
    ) -> Tensor:
        slope = field(s, y)
        if previous is None:
            return y + h * slope
        s_previous, y_previous = previous
        delta = s - s_previous
        return y + h * slope + (h / delta) ** 2 * (y_previous - y + delta * slope)


register_integrator("hermite", Hermite)
