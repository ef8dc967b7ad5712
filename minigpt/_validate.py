"""The one vocabulary for checking arguments at the package's entry points.

Every check raises :class:`UserError` (a ``ValueError``) or :class:`UserTypeError` (also a
``TypeError``), with one line naming the argument, what it must be and what it got; the command line
prints that line and exits with status 2. Numpy scalars count as numbers, bools do not, NaN and inf
are refused. Rules that belong to one method (a PiSSA target needs a weight, say) stay beside its
entry point and use these checks for their parts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


class UserError(ValueError):
    """A bad argument or file; the message says what was wrong and what to do. CLI: one line, exit
    2."""

    exit_code = 2


class WriteError(UserError):
    """A file that cannot be written where it was asked for (not a folder, no permission, disk
    full)."""


class UserTypeError(UserError, TypeError):
    """A :class:`UserError` for an argument of the wrong type (still a ``TypeError`` for
    callers)."""


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int, refusing floats (even 10.0), bools and values out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise UserError(f"{name} must be an integer {bounds}, got {value}")
    return value


def check_float(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_min: bool = False,
    strict_max: bool = False,
) -> float:
    """``value`` as a finite Python float within the bounds (``strict_*``: the bound itself is
    excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    low_bad = minimum is not None and (value <= minimum if strict_min else value < minimum)
    high_bad = maximum is not None and (value >= maximum if strict_max else value > maximum)
    if low_bad or high_bad:
        low = "" if minimum is None else f"{'>' if strict_min else '>='} {minimum:g}"
        high = "" if maximum is None else f"{'<' if strict_max else '<='} {maximum:g}"
        raise UserError(
            f"{name} must be {' and '.join(p for p in (low, high) if p)}, got {value:g}"
        )
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``; otherwise one line listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``True`` or ``False`` (numpy bools too), nothing else: ``1`` or ``"yes"`` are mistakes."""
    try:
        import numpy as np

        bools: tuple[type, ...] = (bool, np.bool_)
    except ImportError:  # pragma: no cover - numpy is a dependency
        bools = (bool,)
    if not isinstance(value, bools):
        raise UserTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)
