"""The integrator contract and its registry.

An integrator advances the flat state y (θ and the controls) of ``dy/ds = field(s, y)`` by one step
h. Fixed-step methods only declare ``order``; adaptive ones (``adaptive = True``) sub-step inside h
to their tolerances. The engine, not the integrator, chooses h (step control from the corrector's
effort, as in numerical continuation), so every method takes exactly the steps the engine asks for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from ..registry import Registry

__all__ = [
    "VectorField",
    "Integrator",
    "INTEGRATORS",
    "register_integrator",
    "available_integrators",
    "make_integrator",
]

VectorField = Callable[[float, Tensor], Tensor]


class Integrator(ABC):
    """One step of an ODE method: y(s + h) from y(s)."""

    order: ClassVar[int]  # global order of accuracy: the error of a fixed-h run is O(h^order)
    adaptive: ClassVar[bool] = False  # True when the method sub-steps to a tolerance

    @abstractmethod
    def step(self, field: VectorField, s: float, y: Tensor, h: float) -> Tensor:
        """y(s + h) for dy/ds = field(s, y)."""

    def slope(self, field: VectorField, s: float, y: Tensor, previous: tuple[float, Tensor] | None) -> Tensor:
        """dy/ds at the start of a step as this method sees it (the engine's step control reads
        it): the field, by default. ``previous`` is the last accepted (s, y), or None."""
        return field(s, y)

    def predict(
        self, field: VectorField, s: float, y: Tensor, h: float, previous: tuple[float, Tensor] | None
    ) -> Tensor:
        """The engine's predictor step: :meth:`step`, by default; a method that extrapolates from
        the last accepted point (``previous``) overrides it."""
        return self.step(field, s, y, h)


INTEGRATORS: Registry[Integrator] = Registry("integrator")


def register_integrator(name: str, factory: Callable[..., Integrator], *, replace: bool = False) -> None:
    """Make ``factory(**options)`` available under ``name`` (the CLI's ``--integrator``)."""
    INTEGRATORS.register(name, factory, replace=replace)


def available_integrators() -> list[str]:
    return INTEGRATORS.available()


def make_integrator(name: str, **options: Any) -> Integrator:
    """The integrator registered as ``name``; an option it does not take (rtol, atol for a
    fixed-step method) raises :class:`InputError` listing those it does."""
    return INTEGRATORS.make(name, **options)
