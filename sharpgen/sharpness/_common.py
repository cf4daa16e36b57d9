"""Shared helpers of the model-level measures: argument checks, operators, progress bars."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._distributed import unwrap_model
from sharpgen._validation import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_positive,
)
from sharpgen.curvature import HessianOperator, as_batches, select_params
from sharpgen.curvature._params import ParamSelection
from sharpgen.linalg import LinearOperator

__all__ = [
    "ProgressOperator",
    "build_hessian",
    "check_adaptive",
    "check_bool",
    "check_choice",
    "check_generator",
    "check_int",
    "check_positive",
    "num_selected",
    "progress_bar",
]


# -- argument checks (the rules live in sharpgen._validation) -------------------------------
def check_adaptive(adaptive: object, eta: object) -> tuple[bool, float]:
    r"""Check the adaptive (ASAM) scaling options of a perturbation measure.

    Returns ``(adaptive, eta)``: a bool, and the offset $\eta$ of the scale
    $|\theta| + \eta$ as a finite float ``>= 0``.
    """
    return check_bool("adaptive", adaptive), check_positive("eta", eta, allow_zero=True)


def num_selected(model: nn.Module, params: ParamSelection) -> int:
    """Number of scalar parameters the measure is taken over (no forward pass)."""
    return sum(t.numel() for t in select_params(unwrap_model(model), params).values())


# -- random numbers ---------------------------------------------------------------------------
def draw(
    kind: str,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Standard Gaussian (``"gaussian"``) or uniform on ``[-1, 1]`` (``"uniform"``) numbers.

    With a generator the numbers are drawn on the generator's device and moved to
    ``device`` (a CPU generator gives the same numbers on every device); the global RNG
    is not touched.
    """
    where = generator.device if generator is not None else device
    if kind == "gaussian":
        out = torch.randn(shape, generator=generator, dtype=dtype, device=where)
    else:
        out = torch.rand(shape, generator=generator, dtype=dtype, device=where).mul_(2).sub_(1)
    return out.to(device)


# -- operators and progress -------------------------------------------------------------------
def build_hessian(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    params: ParamSelection,
    *,
    bn: str,
    dropout: bool,
    reduction: str,
    backend: str,
    process_group: Any,
    single_vectors: bool = False,
) -> HessianOperator:
    """The `HessianOperator` every Hessian-based measure works on.

    With ``single_vectors`` (an algorithm that multiplies one vector at a time, such as
    Lanczos), ``backend="auto"`` and one batch of data, the double-backward graph is built
    once and kept between products (``backend="autograd", cache_graph=True``, as PyHessian
    does): each product is then one backward pass through the kept graph.
    """
    cache = single_vectors and backend == "auto" and as_batches(data).single
    return HessianOperator(
        model,
        loss_fn,
        data,
        params,
        bn=bn,
        dropout=dropout,
        reduction=reduction,
        backend="autograd" if cache else backend,
        cache_graph=cache,
        process_group=process_group,
    )


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def set_postfix_str(self, s: str) -> None:
        return None


@contextmanager
def progress_bar(enabled: bool, *, total: int | None, desc: str, unit: str) -> Iterator[Any]:
    """A tqdm bar when ``enabled`` (tqdm imported only then), else a no-op object.

    Raises:
        ImportError: ``enabled`` and tqdm is not installed.
    """
    check_bool("progress", enabled)
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # tqdm is an optional dependency
        raise ImportError(
            "progress=True needs tqdm, which is not installed; install it with "
            "`pip install tqdm` (or `pip install sharpgen[examples]`), or pass progress=False."
        ) from exc
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
    try:
        yield bar
    finally:
        bar.close()


class ProgressOperator(LinearOperator):
    """Wrap an operator so that every block product advances a progress bar."""

    def __init__(self, inner: LinearOperator, bar: Any) -> None:
        super().__init__(inner.shape[0], inner.dtype, inner.device)
        self.inner = inner
        self.bar = bar

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.inner.matmat(V)
        self.bar.update(V.shape[1])
        return out
