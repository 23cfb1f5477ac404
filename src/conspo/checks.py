"""Argument checks shared by the math core, the TRL config, the verl plug-in and the command line.

One job: refuse a bad value with one line that names the field, the value and what is accepted. Every check
returns the value it accepted (as a float for numbers), so a caller can write ``tau = checks.positive("tau", tau)``.
The module imports only the standard library, so torch-free code (the command line) can use it too.

A number is a real ``int`` or ``float``: ``True`` and ``"0.5"`` are refused, so a YAML typo never becomes 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["choice", "positive", "finite", "at_least", "in_range", "probability", "integer"]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def choice(name: str, value: Any, accepted: Iterable[Any]) -> Any:
    """``value`` if it is one of ``accepted``, else ``name='bad' is not supported; accepted values: 'a', 'b'``."""
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {', '.join(map(repr, accepted))}")
    return value


def positive(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0."""
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def finite(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number (any sign)."""
    if not _is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def at_least(name: str, value: Any, low: float, *, inclusive: bool = True) -> float:
    """``value`` as a float if it is a finite number ``>= low`` (``> low`` when not ``inclusive``)."""
    if not _is_number(value) or value < low or (value == low and not inclusive):
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value!r}")
    return float(value)


def in_range(name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False, integer: bool = False) -> float | int:
    """``value`` if it is a finite number (an ``int`` when ``integer``) in the interval; ``None`` bounds are infinite.

    The message writes the interval out, e.g. ``top_p must be a finite number in (0, 1], got 1.5``.
    """
    ok = _is_number(value) and (isinstance(value, int) or not integer)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'} in {left}, {right}, "
                         f"got {value!r}")
    return value if integer else float(value)


def probability(name: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a number in [0, 1] (either end excluded on request)."""
    return float(in_range(name, value, 0, 1, low_open=low_open, high_open=high_open))


def integer(name: str, value: Any, low: int) -> int:
    """``value`` if it is an ``int`` (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
