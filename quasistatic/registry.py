"""One registry mechanism: names → factories, with the project's error template for bad names and
options (``../shared/ENGINEERING.md``, habits 1 and 6).

Every registry of the library (data sets, architectures, integrators, correctors, Krylov solvers,
preconditioners, processes, curvature operators, transfer methods) is a :class:`Registry`. A
factory's keyword options are read from its signature; a factory may also declare them, with a
type and a help line, as a ``parameters`` attribute of :class:`Parameter` (the processes do), which
is what the command line parses ``--param NAME=VALUE`` and ``--corrector-option NAME=VALUE`` with.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import InputError, bad_value, choice_error

__all__ = ["Parameter", "Registry"]

T = TypeVar("T")
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_TEXT_TYPES = (bool, int, float, str)  # the types a parameter read from a signature can be parsed as
_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class Parameter:
    """One keyword option of a registered factory, as the command line takes it as text."""

    name: str  # the factory's keyword, e.g. "lam_end"
    type: Callable[[str], Any] = float  # parses the text: float, int, str, bool (true/false) or any parser
    default: Any = None  # the factory's default (shown in help; the factory applies it when not given)
    help: str = ""  # one line for the command line's help

    def parse(self, text: str, owner: str = "") -> Any:
        """The value of ``text`` under :attr:`type`; a text it cannot parse raises :class:`InputError`
        (naming the option and its ``owner``, e.g. "process 'free'")."""
        what = f"option {self.name}" + (f" of {owner}" if owner else "")
        if self.type is bool:
            if text.lower() not in _BOOLEANS:
                raise bad_value(what, "true or false", text)
            return _BOOLEANS[text.lower()]
        try:
            return self.type(text)
        except ValueError:
            kind = getattr(self.type, "__name__", str(self.type))
            raise bad_value(what, f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}", text) from None


class Registry(Generic[T]):
    """Factories by name. ``make(name, *inputs, **options)`` builds one; an unknown name or an option
    the factory does not take raises :class:`InputError` naming the accepted ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # what the names name, for messages: "preconditioner", "linear solver", ...
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T], *, replace: bool = False) -> None:
        """Make ``factory(*inputs, **options)`` available as ``name``; a taken name is refused
        unless ``replace``. Declared ``parameters`` must be keyword options of the factory."""
        if not isinstance(name, str) or not name.strip():
            raise bad_value(f"{self.kind} name", "a non-empty string", name)
        if name in self._factories and not replace:
            taken = bad_value(f"{self.kind} name", f"new (taken: {', '.join(self.available())})", name)
            raise InputError(f"{taken}; pass replace=True to replace it")
        if not callable(factory):
            raise bad_value(f"factory of {self.kind} {name!r}", "a callable", factory)
        accepted = _keyword_options(factory)
        declared = getattr(factory, "parameters", None) or ()
        undeclared = [p.name for p in declared if accepted is not None and p.name not in accepted]
        if undeclared:
            raise bad_value(
                f"declared parameters of {self.kind} {name!r}",
                f"keyword options of its factory ({_listed(accepted)})",
                undeclared,
            )
        self._factories[name] = factory

    def available(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; an unknown name raises, listing the registered ones."""
        if not isinstance(name, str) or name not in self._factories:
            raise choice_error(self.kind, self.available(), name)
        return self._factories[name]

    def make(self, name: str, *inputs: Any, **options: Any) -> T:
        """``factory(*inputs, **options)`` of ``name``; the options are checked against its signature
        first (those its positional ``inputs`` fill are not options)."""
        factory = self.get(name)
        accepted = self.options(name, bound=len(inputs))
        if accepted is not None:
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise bad_value(f"options of {self.kind} {name!r}", _listed(accepted), ", ".join(unknown))
        return factory(*inputs, **options)

    def options(self, name: str, bound: int = 0) -> list[str] | None:
        """The keyword options ``name``'s factory takes after its first ``bound`` positional inputs
        (None when it takes any)."""
        return _keyword_options(self.get(name), bound)

    def parameters(self, name: str) -> tuple[Parameter, ...]:
        """The options of ``name`` the command line can set: its factory's declared ``parameters``,
        or else those of its keyword options that have a default, typed by their annotation (or the
        default's type) when that is bool, int, float or str, else read as text."""
        factory = self.get(name)
        declared = getattr(factory, "parameters", None)
        if declared is not None:
            return tuple(declared)
        return tuple(
            Parameter(p.name, _text_type(p), p.default)
            for p in _signature_parameters(factory) or ()
            if p.kind in _KEYWORD and p.default is not inspect.Parameter.empty
        )

    def parse_options(self, name: str, texts: Mapping[str, str]) -> dict[str, Any]:
        """Options of ``name`` from texts by option name, each parsed by its :class:`Parameter`; a
        name that is not one of :meth:`parameters` raises, listing them."""
        parameters = {p.name: p for p in self.parameters(name)}
        unknown = sorted(set(texts) - set(parameters))
        if unknown:
            raise bad_value(f"options of {self.kind} {name!r}", _listed(list(parameters)), ", ".join(unknown))
        return {key: parameters[key].parse(text, f"{self.kind} {name!r}") for key, text in texts.items()}

    @contextmanager
    def restoring(self) -> Iterator[Registry[T]]:
        """Within the ``with`` block, registrations may be added or replaced; on leaving it the
        registry is as before (tests and tutorials that register examples)."""
        saved = dict(self._factories)
        try:
            yield self
        finally:
            self._factories.clear()
            self._factories.update(saved)


def _signature_parameters(factory: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """The parameters of the factory's signature, string annotations evaluated where they can be;
    None when it has no signature (some builtins)."""
    try:
        try:
            signature = inspect.signature(factory, eval_str=True)
        except NameError:  # an annotation naming something imported only for type checkers
            signature = inspect.signature(factory)
    except ValueError:
        return None
    return list(signature.parameters.values())


def _keyword_options(factory: Callable[..., Any], bound: int = 0) -> list[str] | None:
    """The keyword options of ``factory`` after ``bound`` positional inputs; None when it takes any
    (``**kwargs``) or has no signature."""
    parameters = _signature_parameters(factory)
    if parameters is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    filled = {p.name for p in [p for p in parameters if p.kind in _POSITIONAL][:bound]}
    return [p.name for p in parameters if p.kind in _KEYWORD and p.name not in filled]


def _text_type(parameter: inspect.Parameter) -> Callable[[str], Any]:
    """How to parse a signature parameter's text: its annotation (``float | None`` is float) or its
    default's type when one of bool, int, float, str; str otherwise."""
    annotation = parameter.annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    candidates = [t for t in (typing.get_args(annotation) if union else (annotation,)) if t is not type(None)]
    if len(candidates) == 1 and candidates[0] in _TEXT_TYPES:
        return candidates[0]
    return type(parameter.default) if type(parameter.default) in _TEXT_TYPES else str


def _listed(names: list[str] | None) -> str:
    """``among {a, b}`` (sorted), or ``none (it takes no options)``."""
    return f"among {{{', '.join(sorted(names))}}}" if names else "none (it takes no options)"
