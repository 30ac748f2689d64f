"""The integrator contract and its registry.

An integrator advances the flat state y (θ and the controls) of ``dy/ds = field(s, y)`` by one step
h. Fixed-step methods only declare ``order``; adaptive ones (``adaptive = True``) sub-step inside h
to their tolerances. The engine, not the integrator, chooses h (step control from the corrector's
effort, as in numerical continuation), so every method takes exactly the steps the engine asks for.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from ..errors import choice_error

__all__ = ["VectorField", "Integrator", "register_integrator", "available_integrators", "make_integrator"]

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

    def predict(self, field: VectorField, s: float, y: Tensor, h: float,
                previous: tuple[float, Tensor] | None) -> Tensor:
        """The engine's predictor step: :meth:`step`, by default; a method that extrapolates from
        the last accepted point (``previous``) overrides it."""
        return self.step(field, s, y, h)


_INTEGRATORS: dict[str, Callable[..., Integrator]] = {}


def register_integrator(name: str, factory: Callable[..., Integrator]) -> None:
    """Make ``factory(**options)`` available under ``name`` (the CLI's ``--integrator``)."""
    _INTEGRATORS[name] = factory


def available_integrators() -> list[str]:
    return sorted(_INTEGRATORS)


def make_integrator(name: str, **options: Any) -> Integrator:
    """The integrator registered as ``name``; options a fixed-step method does not use (rtol, atol)
    are dropped with a warning, never silently."""
    if name not in _INTEGRATORS:
        raise choice_error("integrator", available_integrators(), name)
    factory = _INTEGRATORS[name]
    accepted = getattr(factory, "options", ())
    unused = sorted(k for k, v in options.items() if k not in accepted and v is not None)
    if unused:
        warnings.warn(f"integrator {name!r} ignores the options {unused}", UserWarning, stacklevel=2)
    return factory(**{k: v for k, v in options.items() if k in accepted and v is not None})
