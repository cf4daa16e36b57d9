"""Argument checks shared by the estimators: errors name the argument, the value and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_positive_int(name: str, value: object, *, minimum: int = 1, hint: str = "") -> int:
    """Return ``value`` as an int if it is an int ``>= minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.{(' ' + hint) if hint else ''}")
    return int(value)


def check_positive_float(name: str, value: object, *, hint: str = "") -> float:
    """Return ``value`` as a float if it is a finite number ``> 0``, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a finite number > 0, got {value!r}.{(' ' + hint) if hint else ''}"
        )
    return float(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise listing the valid ones."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {name} {value!r}; valid choices are {valid}.")
    return str(value)


def check_generator(generator: object) -> torch.Generator | None:
    """Return ``generator`` if it is a `torch.Generator` or None, else raise."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "create one with torch.Generator().manual_seed(seed)."
        )
    return generator


def resolve_budget(
    num_matvecs: int | None,
    rtol: float | None,
    max_matvecs: int,
    *,
    minimum: int,
    method: str,
) -> tuple[int | None, float | None, int]:
    """Validate the "fixed budget xor target relative standard error" pair."""
    if (num_matvecs is None) == (rtol is None):
        raise ValueError(
            f"{method}: pass exactly one of num_matvecs (a fixed budget of products) or rtol "
            f"(a target relative standard error, capped by max_matvecs); got "
            f"num_matvecs={num_matvecs!r} and rtol={rtol!r}."
        )
    max_matvecs = check_positive_int("max_matvecs", max_matvecs, minimum=minimum)
    if num_matvecs is not None:
        num_matvecs = check_positive_int(
            "num_matvecs",
            num_matvecs,
            minimum=minimum,
            hint=f"{method} needs at least {minimum} matrix-vector products.",
        )
    else:
        rtol = check_positive_float("rtol", rtol, hint="pass e.g. rtol=0.01 for 1%.")
    return num_matvecs, rtol, max_matvecs
