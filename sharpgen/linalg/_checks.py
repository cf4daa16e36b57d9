"""Argument checks of the estimators (the rules live in `sharpgen._validation`)."""

from __future__ import annotations

from sharpgen._validation import check_choice, check_generator, check_int, check_positive

__all__ = [
    "check_choice",
    "check_generator",
    "check_positive_float",
    "check_positive_int",
    "resolve_budget",
]


def check_positive_int(name: str, value: object, *, minimum: int = 1, hint: str = "") -> int:
    """Return ``value`` as an int if it is an integer ``>= minimum`` (`check_int`), else raise."""
    return check_int(name, value, minimum=minimum, hint=hint, noun="")


def check_positive_float(name: str, value: object, *, hint: str = "") -> float:
    """Return ``value`` as a float if it is a finite real ``> 0`` (`check_positive`), else raise."""
    return check_positive(name, value, hint=hint)


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
