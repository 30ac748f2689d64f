"""One error type for bad user input, and one message template for it.

Every check of a user-supplied value raises :class:`InputError` with the message
``"<what> must be <accepted>, got <value>"`` (see ``../shared/ENGINEERING.md``, habit 6).
The CLI turns an :class:`InputError` into a one-line message and exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["InputError", "bad_value", "choice_error"]


class InputError(ValueError):
    """A user-supplied value is not acceptable; the message names it and the accepted ones."""


def bad_value(what: str, accepted: str, got: Any) -> InputError:
    """Build the standard error ``"<what> must be <accepted>, got <got!r>"``."""
    return InputError(f"{what} must be {accepted}, got {got!r}")


def choice_error(what: str, choices: Iterable[str], got: Any) -> InputError:
    """Error for a name that is not one of ``choices``; lists the accepted names."""
    names = ", ".join(sorted(choices))
    return bad_value(what, f"one of {{{names}}}", got)
