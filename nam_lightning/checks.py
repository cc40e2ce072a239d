"""Argument checks shared by the public functions: the error names the argument and what is
valid (``TypeError`` for the wrong type, ``ValueError`` for a value out of range)."""

from __future__ import annotations

import math


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool (True or False), got {value!r}")


def check_finite_float(name: str, value: object, *, zero_ok: bool = False) -> None:
    """A finite number > 0 (``>= 0`` with ``zero_ok``); ints count, bools and NaN do not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__}")
    if not (0 <= value < math.inf if zero_ok else 0 < value < math.inf):
        raise ValueError(
            f"`{name}` must be a finite float {'>=' if zero_ok else '>'} 0, got {value!r}"
        )


def check_fraction(name: str, value: object) -> None:
    """A float strictly between 0 and 1; ints count, bools and NaN do not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a fraction in (0, 1), a float, got {value!r}")
    if not 0 < value < 1:  # NaN fails this too
        raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}")
