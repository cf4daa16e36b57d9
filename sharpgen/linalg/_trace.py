r"""`trace`: one entry point for every trace estimator, with an exact method and ``"auto"``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sharpgen._precision import full_precision_fn
from sharpgen.linalg._adaptive import adaptive_trace
from sharpgen.linalg._checks import (
    check_choice,
    check_generator,
    check_positive_float,
    check_positive_int,
)
from sharpgen.linalg._hutchinson import hutchinson_trace
from sharpgen.linalg._hutchpp import hutchpp_trace
from sharpgen.linalg._operator import LinearOperator, as_linear_operator
from sharpgen.linalg._results import TraceEstimate
from sharpgen.linalg._xtrace import xtrace

__all__ = ["DEFAULT_RTOL", "TRACE_METHODS", "exact_trace", "resolve_trace_method", "trace"]

TRACE_METHODS = ("auto", "exact", "adaptive", "hutchinson", "hutchpp", "xtrace")
#: Fewest products each stochastic method accepts as a fixed budget.
MIN_MATVECS = {"adaptive": 1, "hutchinson": 1, "hutchpp": 3, "xtrace": 4}
#: Target relative standard error when neither ``num_matvecs`` nor ``rtol`` is given.
DEFAULT_RTOL = 0.01
_ESTIMATORS: dict[str, Callable[..., TraceEstimate]] = {
    "hutchinson": hutchinson_trace,
    "hutchpp": hutchpp_trace,
    "xtrace": xtrace,
}


def resolve_trace_method(
    method: str,
    n: int,
    *,
    num_matvecs: int | None,
    rtol: float | None,
    max_matvecs: int,
    exact_threshold: int,
) -> tuple[str, int | None, float | None]:
    """Validate the budget and resolve ``"auto"``; returns ``(method, num_matvecs, rtol)``.

    ``"auto"`` is ``"exact"`` when ``n <= exact_threshold`` and the budget allows ``n``
    products (``num_matvecs >= n``; ``max_matvecs >= n`` with ``rtol``; always with neither),
    else ``"adaptive"``. A stochastic method given neither budget gets ``rtol=DEFAULT_RTOL``.
    """
    method = check_choice("method", method, TRACE_METHODS)
    if num_matvecs is not None and rtol is not None:
        raise ValueError(
            f"pass at most one of num_matvecs (a fixed budget) and rtol (a target relative "
            f"standard error); got num_matvecs={num_matvecs!r} and rtol={rtol!r}."
        )
    max_matvecs = check_positive_int("max_matvecs", max_matvecs)
    exact_threshold = check_positive_int("exact_threshold", exact_threshold, minimum=0)
    if rtol is not None:
        rtol = check_positive_float("rtol", rtol, hint="pass e.g. rtol=0.01 for 1%.")
    if num_matvecs is not None:
        minimum = MIN_MATVECS.get(method, 1)
        num_matvecs = check_positive_int(
            "num_matvecs", num_matvecs, minimum=minimum,
            hint=f"method={method!r} needs at least {minimum} matrix-vector products.",
        )  # fmt: skip
    if method == "auto":
        if num_matvecs is not None:
            budget = num_matvecs
        else:
            budget = max_matvecs if rtol is not None else n
        method = "exact" if n <= min(exact_threshold, budget) else "adaptive"
    if method == "exact":
        if num_matvecs is not None and num_matvecs < n:
            raise ValueError(
                f"num_matvecs={num_matvecs} is too small for method='exact', which needs one "
                f"product per dimension ({n}); raise num_matvecs or use method='auto'."
            )
        return method, None, None
    if method == "xtrace" and num_matvecs is not None and num_matvecs // 2 > n:
        raise ValueError(
            f"num_matvecs={num_matvecs} is too large for XTrace on dimension {n} (it uses "
            f"num_matvecs // 2 probes, at most {n}); use method='exact' ({n} products)."
        )
    if num_matvecs is None and rtol is None:
        rtol = DEFAULT_RTOL
    return method, num_matvecs, rtol


def exact_trace(op: LinearOperator, block_size: int) -> TraceEstimate:
    r"""$\sum_i e_i^\top A e_i$ from products with ``block_size`` basis vectors at a time."""
    n = op.shape[0]
    start = op.num_matvecs
    total = torch.zeros((), dtype=torch.float64)
    for first in range(0, n, block_size):
        stop = min(n, first + block_size)
        E = torch.zeros(n, stop - first, dtype=op.dtype, device=op.device)
        idx = torch.arange(stop - first, device=op.device)
        E[first + idx, idx] = 1
        AE = op.matmat(E)
        total = total + AE[first + idx, idx].sum().to(device="cpu", dtype=torch.float64)
    return TraceEstimate(
        value=float(total), stderr=0.0, num_matvecs=op.num_matvecs - start, method="exact"
    )


@full_precision_fn
def trace(
    A: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    *,
    method: str = "auto",
    num_matvecs: int | None = None,
    rtol: float | None = None,
    max_matvecs: int = 1000,
    exact_threshold: int = 2000,
    block_size: int = 64,
    generator: torch.Generator | None = None,
    size: int | None = None,
    probe_block: int | None = None,
) -> TraceEstimate:
    r"""$\operatorname{tr}(A)$ by the method that fits the budget: exact, or estimated.

    Methods (cost in products with $A$, "matvecs"):

    * ``"exact"``: $\sum_i e_i^\top A e_i$ with the $n$ basis vectors, ``block_size`` at a
      time. Exactly $n$ matvecs; ``stderr`` is 0.
    * ``"hutchinson"``, ``"hutchpp"``, ``"xtrace"``: `hutchinson_trace`, `hutchpp_trace`,
      `xtrace` with their default probes.
    * ``"adaptive"``: Rademacher Hutchinson or Hutch++, decided from the first probes (their
      Hutchinson variance $v_H$ against the leave-one-out residual $F_\perp$ of their own
      sketch, which bounds the variance left after deflating; cf. Persson, Cortinovis &
      Kressner 2022). On a flat spectrum it is Hutchinson with the whole budget; with a few
      dominant eigenvalues it deflates. Its standard error is that of independent samples.
    * ``"auto"`` (default): ``"exact"`` when $n \le$ ``exact_threshold`` and the budget
      allows $n$ products (``num_matvecs >= n``; ``max_matvecs >= n`` with ``rtol``; always
      when neither is given), else ``"adaptive"``.

    The stochastic methods run a fixed budget of ``num_matvecs`` products, or add products
    until ``stderr <= rtol * |value|`` (capped by ``max_matvecs``; ``converged=False`` when
    the cap was hit). With neither given, ``rtol=0.01``.

    Args:
        A: Dense symmetric tensor, `LinearOperator` or matvec callable (then pass ``size``).
        method: ``"auto"``, ``"exact"``, ``"adaptive"``, ``"hutchinson"``, ``"hutchpp"`` or
            ``"xtrace"``.
        num_matvecs: Fixed budget of products (at least 3 for Hutch++, 4 for XTrace; at
            least $n$ for ``"exact"``).
        rtol: Target relative standard error, instead of ``num_matvecs``.
        max_matvecs: Cap on the products when ``rtol`` is used.
        exact_threshold: Largest dimension for which ``"auto"`` computes the trace exactly.
        block_size: Basis vectors per block product of ``"exact"``.
        generator: Source of all randomness; the global RNG is untouched when given.
        size: Dimension, when ``A`` is a callable.
        probe_block: Probes per block product of ``"hutchinson"`` (default: that of
            `hutchinson_trace`); memory ``2 * n * probe_block`` numbers.

    Returns:
        A `TraceEstimate`; ``method`` is the method actually used (``"exact"``,
        ``"hutchinson"``, ``"hutchpp"`` or ``"xtrace"``).

    Raises:
        ValueError: Unknown ``method``, both ``num_matvecs`` and ``rtol``, a budget below the
            method's minimum (for ``"exact"``: below $n$), non-positive ``rtol``,
            ``max_matvecs`` or ``block_size``; a non-square or non-symmetric dense ``A``.
        TypeError: Wrongly typed arguments.

    Examples:
        >>> import torch
        >>> from sharpgen.linalg import trace
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> trace(A)  # 5 <= exact_threshold: exact
        TraceEstimate(value=15 ± 0, method='exact', num_matvecs=5)
        >>> g = torch.Generator().manual_seed(0)
        >>> est = trace(torch.eye(3000, dtype=torch.float64), num_matvecs=30, generator=g)
        >>> est.method, est.value  # flat spectrum: Hutchinson; exact for a diagonal matrix
        ('hutchinson', 3000.0)

    References:
        M. Hutchinson (1989). R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++",
        SOSA 2021. D. Persson, A. Cortinovis, D. Kressner, "Improved variants of the Hutch++
        algorithm for trace estimation", SIAM J. Matrix Anal. Appl. 43(3), 2022.
        E. N. Epperly, J. A. Tropp, R. J. Webber, "XTrace", SIAM J. Matrix Anal. Appl. 2024.
    """
    op = as_linear_operator(A, size=size, check_symmetric=True)
    block_size = check_positive_int("block_size", block_size)
    generator = check_generator(generator)
    method, num_matvecs, rtol = resolve_trace_method(
        method, op.shape[0], num_matvecs=num_matvecs, rtol=rtol,
        max_matvecs=max_matvecs, exact_threshold=exact_threshold,
    )  # fmt: skip
    if method == "exact":
        return exact_trace(op, block_size)
    if method == "adaptive":
        return adaptive_trace(
            op, num_matvecs=num_matvecs, rtol=rtol, max_matvecs=max_matvecs, generator=generator
        )
    kwargs: dict[str, Any] = {"generator": generator}
    if method == "hutchinson" and probe_block is not None:
        kwargs["block_size"] = check_positive_int("probe_block", probe_block)
    if num_matvecs is not None:
        kwargs["num_matvecs"] = num_matvecs
    else:
        kwargs["rtol"] = rtol
        kwargs["max_matvecs"] = max_matvecs
    return _ESTIMATORS[method](op, **kwargs)
