"""The one place that decides how curvature products are taken, and what to do on failure.

Backends (``backend=`` of the objective, the operators and the Hessian measures):

* ``"func"``: ``torch.func`` (`sharpgen.curvature._kernels`), in the objective's
  ``func_mode``; ``"forward"`` falls back to ``"reverse"`` for ops without a forward-mode
  formula of their backward (silently: both are exact), and the objective remembers it.
* ``"autograd"``: double backward.
* ``"auto"``: ``"func"``, falling back to ``"autograd"`` with a `RuntimeWarning` when
  ``torch.func`` cannot trace the model; the operator remembers the backend that worked.

`plan_backend` adds the rule of the measures: with ``"auto"`` they keep every batch's
double-backward graph between products (as PyHessian does for one batch), memory permitting.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = [
    "BACKENDS",
    "FUNC_MODES",
    "attempts",
    "check_backend",
    "plan_backend",
    "prefer_double_backward",
    "run_with_fallback",
]

BACKENDS = ("auto", "func", "autograd")
FUNC_MODES = {"reverse": "rev", "forward": "fwd"}

T = TypeVar("T")


def check_backend(backend: object) -> str:
    """Return ``backend`` if it is one of `BACKENDS`, else raise `ValueError`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS} ('auto': torch.func with a double-backward "
            f"fallback; 'func': torch.func only; 'autograd': double backward only), got "
            f"{backend!r}."
        )
    return backend


def plan_backend(backend: str, *, single_vectors: bool, single_batch: bool) -> tuple[str, bool]:
    """``(backend, cache_graph)`` of the operator a measure builds.

    With ``backend="auto"`` a measure gets ``("autograd", True)``: every batch's
    double-backward graph is built once and each product is one more backward pass through
    it (PyHessian keeps the graph of one batch the same way), memory permitting (see
    ``GRAPH_CACHE_BYTES`` in `sharpgen.curvature._products`). In our CPU measurements
    (``benchmarks/bench_kernels.py``) a product through a kept graph cost 0.5-1.5 gradients
    against 1.8-2.9 for ``torch.func`` forward- or reverse-over-reverse, and a column loop
    on a kept graph was the fastest block product on a conv net (batched columns through
    ``vmap`` or ``is_grads_batched`` cost 2x more per column there, and the same on an
    MLP). ``single_vectors`` and ``single_batch`` are accepted for the callers; the rule
    no longer depends on them.
    """
    if backend == "auto":
        return "autograd", True
    return backend, False


def prefer_double_backward(backend: str, kernel: str, device: torch.device) -> str:
    """``"auto"`` for Hessian products on a CPU is ``"autograd"``; anything else unchanged.

    Double backward was the fastest correct single product on every model of
    ``benchmarks/bench_kernels.py`` on a CPU (1.1-2.5 gradients against 1.8-2.9 for
    ``torch.func``); on accelerators, where ``vmap`` batches columns, ``"auto"`` keeps
    trying ``torch.func`` first (not measured here).
    """
    if kernel == "ggn_rev":  # one route whatever the backend; "autograd" lets it be kept
        return "autograd"
    if backend == "auto" and kernel == "hvp" and device.type == "cpu":
        return "autograd"
    return backend


def attempts(backend: str, mode: str) -> list[tuple[str, str]]:
    """The ``(backend, mode)`` pairs tried in order for a requested backend and func mode."""
    funcs = [("func", "fwd"), ("func", "rev")] if mode == "fwd" else [("func", "rev")]
    if backend == "func":
        return funcs
    if backend == "autograd":
        return [("autograd", "rev")]
    return [*funcs, ("autograd", "rev")]


def run_with_fallback(
    run: Callable[[str, str], T], backend: str, mode: str, *, owner: str
) -> tuple[T, str, str]:
    """Run ``run(backend, mode)`` over `attempts` until one succeeds.

    A `RuntimeError` (``NotImplementedError`` included) moves on to the next attempt;
    out-of-memory errors and every other exception propagate at once, and the last
    attempt's error propagates as it is (an error of the user's model or loss fails under
    double backward too, and is then not blamed on ``torch.func``).

    Returns:
        ``(result, backend, mode)`` of the attempt that succeeded.
    """
    plan = attempts(backend, mode)
    failure: BaseException | None = None
    for i, (b, m) in enumerate(plan):
        try:
            out = run(b, m)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            if i == len(plan) - 1:
                raise
            if plan[i + 1][0] == "autograd":
                failure = exc
            continue
        if failure is not None:
            first = str(failure).splitlines()[0][:200] if str(failure) else ""
            warnings.warn(
                f"{owner}: torch.func could not trace the model ({type(failure).__name__}: "
                f"{first}); falling back to double backward (backend='autograd'), which is "
                "slower for blocks of vectors. Pass backend='autograd' to silence this warning.",
                RuntimeWarning,
                stacklevel=5,
            )
        return out, b, m
    raise AssertionError("unreachable: the last attempt returns or raises")
