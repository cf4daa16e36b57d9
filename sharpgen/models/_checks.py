"""Argument checks shared by the model builders and constructions (private)."""

from __future__ import annotations

import torch
from torch import Tensor

from sharpgen._validation import check_int as _check_int
from sharpgen._validation import check_positive

ARCHS = ("no_bias", "bias", "simplified_bn", "simplified_ln")
ACTIVATIONS = ("relu", "softplus")


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum`` or raise naming ``name`` (`_validation`)."""
    return _check_int(name, value, minimum=minimum)


def check_positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a finite positive float or raise naming ``name`` (`_validation`)."""
    return check_positive(name, value, allow_zero=allow_zero)


def check_arch(arch: object) -> str:
    """Return ``arch`` if it is one of `ARCHS`, else raise listing the valid ones."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid architectures are {', '.join(ARCHS)}.")
    return str(arch)


def check_activation(activation: object) -> str:
    """Return ``activation`` if it is one of `ACTIVATIONS`, else raise listing them."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; valid activations are {', '.join(ACTIVATIONS)}."
        )
    return str(activation)


def check_float_tensor(name: str, value: object, *, ndim: int | None = None) -> Tensor:
    """Check that ``value`` is a floating tensor (of ``ndim`` dimensions when given)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {value.dtype}; "
            f"convert it with {name}.to(torch.float64) (or float32)."
        )
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}.")
    return value


def check_dataset(X: object, y: object) -> tuple[Tensor, Tensor]:
    """Check a training set ``X`` of shape (n, d) and labels ``y`` of shape (n,)."""
    X = check_float_tensor("X", X, ndim=2)
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}.")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"y must have shape (n,) = ({X.shape[0]},) to match X of shape {tuple(X.shape)}, "
            f"got shape {tuple(y.shape)}."
        )
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must have at least one row and one column, got {tuple(X.shape)}.")
    if not bool(torch.isfinite(X).all()) or not bool(torch.isfinite(y.to(X.dtype)).all()):
        raise ValueError("X and y must be finite (found NaN or Inf).")
    return X, y.to(X.dtype)


def check_pm_one(name: str, y: Tensor) -> None:
    """Raise unless every entry of ``y`` is -1 or +1."""
    if not bool(((y == 1) | (y == -1)).all()):
        bad = y[(y != 1) & (y != -1)][:3].tolist()
        raise ValueError(
            f"{name} must contain only the labels -1 and +1 (found e.g. {bad}); "
            "map binary labels with 2 * y - 1."
        )


def check_cube(name: str, X: Tensor) -> None:
    """Raise unless every entry of ``X`` is -1 or +1 (points of the hypercube)."""
    if not bool(((X == 1) | (X == -1)).all()):
        raise ValueError(
            f"{name} must hold points of the hypercube {{-1, +1}}^d (every entry -1 or +1); "
            "this construction is stated for cube data such as sharpgen.data.xor_cube."
        )


def check_unique_rows(name: str, X: Tensor) -> None:
    """Raise if ``X`` has duplicate rows."""
    n_unique = torch.unique(X, dim=0).shape[0]
    if n_unique != X.shape[0]:
        raise ValueError(
            f"{name} has {X.shape[0] - n_unique} duplicate training point(s); a memorizer needs "
            "one neuron per distinct point: remove duplicates first "
            "(torch.unique(X, dim=0), or xor_cube(..., unique=True))."
        )


def check_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` (default: torch's default dtype) if it is a floating torch.dtype."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    return dtype


def check_width(width: int | None, needed: int, what: str) -> int:
    """``width`` (default ``needed``) if it has room for the ``needed`` neurons of ``what``."""
    if width is None:
        return needed
    width = check_int("width", width)
    if width < needed:
        raise ValueError(f"width={width} is smaller than the {needed} neurons {what} needs.")
    return width


def check_depth(depth: int, arch: str) -> int:
    """``depth`` (>= 2) if ``arch`` allows it: deeper than 2 only with ``arch="bias"``."""
    depth = check_int("depth", depth, minimum=2)
    if depth > 2 and arch != "bias":
        raise ValueError(
            f"depth={depth} is only available for arch='bias' (deep nets with bias in the first "
            f"layer only), not arch={arch!r}."
        )
    return depth
