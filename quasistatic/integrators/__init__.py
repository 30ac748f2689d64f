"""ODE integrators behind a registry: euler, heun, rk4 (fixed step), the secant and hermite predictors, and
torchdiffeq's dopri5, bosh3 and adaptive_heun (adaptive)."""

from . import adaptive, runge_kutta  # noqa: F401  (register the built-in integrators)
from .base import INTEGRATORS, Integrator, VectorField, available_integrators, make_integrator, register_integrator
from .runge_kutta import RK4, Euler, ExplicitRungeKutta, Hermite, Heun, Secant

__all__ = [
    "Integrator",
    "VectorField",
    "ExplicitRungeKutta",
    "Euler",
    "Heun",
    "RK4",
    "Secant",
    "Hermite",
    "INTEGRATORS",
    "available_integrators",
    "make_integrator",
    "register_integrator",
]
