"""Argument checks shared by the public functions: the error names the argument and what is
valid (``TypeError`` for the wrong type, ``ValueError`` for a value out of range), and shows
what was given."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


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
    """A number strictly between 0 and 1; ints count (and fail the range), bools and NaN do not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a fraction in (0, 1), a float, got {type(value).__name__} {value!r}"
        )
    if not 0 < value < 1:  # NaN fails this too
        raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}")


def check_optional_positive_int(name: str, value: object) -> None:
    """None or an int >= 1 (bools do not count)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`{name}` must be None or a positive int, got {type(value).__name__} {value!r}"
        )
    if value < 1:
        raise ValueError(f"`{name}` must be None or a positive int, got {value!r}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """One of the strings ``choices``."""
    if value not in choices:
        quoted = [repr(c) for c in choices]
        valid = " or ".join(quoted) if len(quoted) == 2 else "one of " + ", ".join(quoted)
        raise ValueError(f"`{name}` must be {valid}, got {value!r}")


def check_module(name: str, value: object) -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(value).__name__}")
