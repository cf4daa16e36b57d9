"""Argument validation: one rule per kind of argument, shared by the whole package (private).

Every public function checks its arguments with these helpers before any expensive work, so a
given kind of argument is accepted or refused the same way everywhere:

- **int** (`check_int`): any `numbers.Integral` (Python ints, NumPy integer scalars such as
  ``np.int64(8)``); bools are refused (``True`` is not a count).
- **real** (`check_positive`, `check_rho`): any `numbers.Real` (Python ints and floats, NumPy
  floating and integer scalars) or a one-element floating/integer tensor; bools are refused;
  the value must be finite and ``> 0`` (or ``>= 0`` where zero is meaningful).
- **bool** (`check_bool`): exactly ``True`` or ``False`` (not ``0``/``1``, not ``np.bool_``).
- **choice** (`check_choice`): one of a fixed set of strings.
- **generator** (`check_generator`): a `torch.Generator` or ``None``.
- **tensor dict** (`check_tensor_dict`): a mapping name -> tensor (or ``None``) whose names
  and shapes are those of a reference dict (the parameters).

Errors are `TypeError` for a value of the wrong kind and `ValueError` for a value of the right
kind out of range; each message names the argument, the value and the fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_choice",
    "check_generator",
    "check_int",
    "check_interval",
    "check_optional_int",
    "check_positive",
    "check_rho",
    "check_tensor_dict",
    "is_int",
]


def _suffix(hint: str) -> str:
    return f" {hint}" if hint else ""


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer in the sense of `check_int` (Integral, not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else raise `TypeError`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}.")
    return value


def check_int(
    name: str, value: object, *, minimum: int = 1, hint: str = "", noun: str = "an int"
) -> int:
    """Return ``value`` as a Python int if it is an integer ``>= minimum``, else raise.

    Args:
        name: The argument's name, used in the message.
        value: The value to check: a `numbers.Integral` that is not a bool.
        minimum: The smallest value allowed.
        hint: A sentence appended to the `ValueError` message (what the value is for).
        noun: How the range message names the kind (``"an int"``: "k must be an int >= 1");
            ``""`` gives the short form "k must be >= 1".

    Raises:
        TypeError: ``value`` is not an integer (or is a bool).
        ValueError: ``value < minimum``.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    out = int(value)  # type: ignore[call-overload]
    if out < minimum:
        kind = f"{noun} " if noun else ""
        raise ValueError(f"{name} must be {kind}>= {minimum}, got {out}.{_suffix(hint)}")
    return out


def check_optional_int(name: str, value: object, *, minimum: int = 1, hint: str = "") -> int | None:
    """`check_int` that also accepts ``None`` (returned unchanged)."""
    return None if value is None else check_int(name, value, minimum=minimum, hint=hint)


def _as_real(name: str, value: object) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} and "
                f"dtype {value.dtype}; pass a Python float or a one-element real tensor."
            )
        return float(value.detach().cpu())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    return float(value)


def check_positive(name: str, value: object, *, hint: str = "", allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real ``> 0`` (``>= 0`` with ``allow_zero``).

    Accepts Python and NumPy reals and one-element tensors; refuses bools.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is not finite, or is out of range.
    """
    out = _as_real(name, value)
    bad = out < 0 if allow_zero else out <= 0
    if not math.isfinite(out) or bad:
        rel = ">= 0" if allow_zero else "> 0"
        shown = value if type(value) in (int, float) else out
        raise ValueError(f"{name} must be a finite number {rel}, got {shown!r}.{_suffix(hint)}")
    return out


def check_interval(
    name: str, value: object, low: float, high: float, *, closed: str = "[)", hint: str = ""
) -> float:
    """Return ``value`` as a float if it lies in the interval from ``low`` to ``high``.

    ``closed`` says which ends belong to it: ``"[)"`` (default), ``"(]"``, ``"[]"`` or
    ``"()"``. Accepts Python and NumPy reals and one-element tensors; refuses bools.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is outside the interval (or not finite).
    """
    out = _as_real(name, value)
    above = out >= low if closed[0] == "[" else out > low
    below = out <= high if closed[1] == "]" else out < high
    if not (math.isfinite(out) and above and below):
        shown = value if type(value) in (int, float) else out
        span = f"{closed[0]}{low:g}, {high:g}{closed[1]}"
        raise ValueError(f"{name} must be in {span}, got {shown!r}.{_suffix(hint)}")
    return out


def check_rho(value: object, name: str = "rho") -> float:
    """Return a perturbation radius as a float ``>= 0`` (``0`` means no perturbation)."""
    out = _as_real(name, value)
    if not math.isfinite(out) or out < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0 (the radius of the neighbourhood), got {out!r}; "
            f"use {name}=0 for no perturbation."
        )
    return out


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise listing the valid ones."""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {name} {value!r}; valid choices are {valid}.")
    return value


def check_generator(generator: object) -> torch.Generator | None:
    """Return ``generator`` if it is a `torch.Generator` or None, else raise."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "create one with torch.Generator().manual_seed(seed)."
        )
    return generator


def check_tensor_dict(
    name: str,
    value: object,
    reference: Mapping[str, Tensor],
    *,
    what: str,
    hint: str,
    reference_name: str = "",
    finite: bool = False,
) -> dict[str, Tensor]:
    """Return the tensors of a dict name -> tensor (or ``None``) shaped like ``reference``.

    Args:
        name: The argument's name, used in the messages.
        value: The dict to check.
        reference: The dict whose names and shapes ``value`` must follow (the parameters).
        what: What the names must be, for the message ("in params").
        hint: The fix, appended to the message on unknown names.
        reference_name: How the message names ``reference`` (``""``: "the parameter").
        finite: Also refuse a tensor with NaN or Inf (`FloatingPointError`).

    Raises:
        TypeError: ``value`` is not a mapping, or an entry is neither a tensor nor ``None``.
        ValueError: an unknown name, or a shape that differs from the reference's.
        FloatingPointError: a non-finite entry (with ``finite``).
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict {{name: Tensor}}, got {type(value).__name__}.")
    unknown = [k for k in value if k not in reference]
    if unknown:
        raise ValueError(f"{name} has keys that are not {what}: {unknown[:5]}; {hint}")
    out = {}
    for k, v in value.items():
        if v is None:
            continue
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}[{k!r}] must be a Tensor or None, got {type(v).__name__}.")
        if v.shape != reference[k].shape:
            ref = f"{reference_name}[{k!r}]" if reference_name else "the parameter"
            raise ValueError(
                f"{name}[{k!r}] has shape {tuple(v.shape)} but {ref} has shape "
                f"{tuple(reference[k].shape)}."
            )
        if finite and not bool(torch.isfinite(v).all()):
            raise FloatingPointError(f"{name}[{k!r}] contains NaN or Inf.")
        out[k] = v
    return out
