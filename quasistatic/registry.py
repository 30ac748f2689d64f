"""One registry mechanism: names → factories, with the project's error template for bad names and
options (``../shared/ENGINEERING.md``, habits 1 and 6)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .errors import InputError, bad_value, choice_error

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Factories by name. ``make(name, **options)`` builds one; an unknown name or an option the
    factory does not take raises :class:`InputError` naming the accepted ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # what the names name, for messages: "preconditioner", "solver", ...
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T], *, replace: bool = False) -> None:
        """Make ``factory(*args, **options)`` available as ``name``; a taken name is refused
        unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise bad_value(f"{self.kind} name", "a non-empty string", name)
        if name in self._factories and not replace:
            raise bad_value(f"{self.kind} name", f"new (taken: {', '.join(self.available())}); "
                            "pass replace=True to replace it", name)
        self._factories[name] = factory

    def available(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            raise choice_error(self.kind, self.available(), name)
        return self._factories[name]

    def make(self, name: str, *args: Any, **options: Any) -> T:
        """``factory(*args, **options)`` of ``name``; options are checked against its signature."""
        factory = self.get(name)
        accepted = self.options(name)
        if accepted is not None:
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise InputError(f"options of {self.kind} {name!r} must be among "
                                 f"{{{', '.join(accepted)}}}, got {', '.join(map(repr, unknown))}")
        return factory(*args, **options)

    def options(self, name: str) -> list[str] | None:
        """The keyword options ``name``'s factory takes (None when it takes any)."""
        parameters = inspect.signature(self.get(name)).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return [p.name for p in parameters if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                         inspect.Parameter.POSITIONAL_OR_KEYWORD)]
