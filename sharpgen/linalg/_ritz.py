"""Ritz values: which are wanted, in what order they are returned, and their error bounds."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "check_basis_dtype",
    "convergence_threshold",
    "error_bounds",
    "output_order",
    "wanted_list",
    "wanted_order",
]


def wanted_order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of all Ritz values, most wanted first."""
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    if which == "magnitude":
        return np.argsort(-np.abs(theta), kind="stable")
    asc = np.argsort(theta, kind="stable")
    out = np.empty_like(asc)
    m = asc.size
    out[0::2] = asc[::-1][: (m + 1) // 2]
    out[1::2] = asc[: m // 2]
    return out


def output_order(theta: np.ndarray, which: str) -> np.ndarray:
    """Order in which the selected Ritz values are returned."""
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    if which == "magnitude":
        return np.argsort(-np.abs(theta), kind="stable")
    return np.argsort(-theta, kind="stable")


def convergence_threshold(value: float, scale: float, tol: float, dtype: torch.dtype) -> float:
    r"""The residual threshold $\mathrm{tol}\,\max(|\theta|, \sqrt{\epsilon}\,s)/(1+\mathrm{tol})$.

    ``value`` is the Ritz value $\theta$, ``scale`` the largest $|\theta_j|$ ($s$) and
    $\epsilon$ the machine epsilon of ``dtype``.
    """
    floor = math.sqrt(torch.finfo(dtype).eps) * scale
    return tol * max(abs(value), floor) / (1.0 + tol)


def error_bounds(
    theta: Sequence[float], resid: Sequence[float], bound: str, idx: Sequence[int] | None = None
) -> list[float]:
    r"""The error bounds of the Ritz values ``idx`` (default: all) that the stopping rule uses.

    ``"residual"``: $\|r_i\|$, a distance to the spectrum that holds for any symmetric
    $A$. ``"gap"``: $\min(\|r_i\|, \|r_i\|^2/\delta_i)$ with the gap estimate
    $\delta_i = \min_{j \ne i} (|\theta_i - \theta_j| - \|r_j\|)$ (the residual bound
    when $\delta_i \le \|r_i\|$): the quadratic bound for an isolated eigenvalue
    (Kato-Temple), with the gap read from the other Ritz values, each moved towards
    $\theta_i$ by its own residual.

    The projected problem is a few dozen numbers, handled as Python floats: between two
    products, each NumPy call on them cost several times its own arithmetic.
    """
    m = len(theta)
    out = []
    for i in range(m) if idx is None else idx:
        r = resid[i]
        if bound == "gap" and m > 1:
            delta = min(abs(theta[i] - theta[j]) - resid[j] for j in range(m) if j != i)
            if delta > r:  # then delta > 0 and r**2 / delta < r: no overflow
                r = r * r / delta
        out.append(r)
    return out


def wanted_list(theta: list[float], which: str) -> list[int]:
    """`wanted_order` for ascending Ritz values as a list (no NumPy call)."""
    m = len(theta)
    if which == "largest":
        return list(range(m - 1, -1, -1))
    if which == "smallest":
        return list(range(m))
    return wanted_order(np.asarray(theta), which).tolist()


def check_basis_dtype(basis_dtype: object, dtype: torch.dtype) -> torch.dtype | None:
    """None, or a floating dtype no wider than the operator's ``dtype``."""
    if basis_dtype is None:
        return None
    if not isinstance(basis_dtype, torch.dtype) or not basis_dtype.is_floating_point:
        raise TypeError(
            f"basis_dtype must be None or a floating torch.dtype such as torch.float16, got "
            f"{basis_dtype!r}."
        )
    if torch.finfo(basis_dtype).bits > torch.finfo(dtype).bits:
        raise ValueError(
            f"basis_dtype={basis_dtype} is wider than the operator's dtype {dtype}; pass "
            f"basis_dtype=None (the operator's dtype) or a narrower one."
        )
    return basis_dtype
