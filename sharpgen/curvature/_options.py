"""The options of an objective, defined once: what is differentiated, and how.

`ModelObjective` takes them as keyword arguments; every measure and operator takes the same
names in its convenience form ``(model, loss_fn, data, **objective_options)`` and hands them
to `ModelObjective` unchanged (see `sharpgen.curvature.as_objective`).
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch
from torch import nn

from sharpgen._precision import LOW_PRECISION
from sharpgen._validation import check_bool
from sharpgen.curvature._backend import FUNC_MODES, check_backend
from sharpgen.curvature._micro import check_micro_batch_size
from sharpgen.curvature._params import ParamSelection
from sharpgen.curvature._second_order import check_policy as check_second_order_policy
from sharpgen.curvature._state import check_policy

__all__ = [
    "OBJECTIVE_OPTIONS",
    "VALID_FUNC_MODES",
    "VALID_GRAPHS",
    "VALID_REDUCTIONS",
    "ObjectiveOptions",
    "check_model_and_loss",
    "check_options",
]

VALID_REDUCTIONS = ("mean", "sum")
VALID_FUNC_MODES = tuple(FUNC_MODES)
VALID_GRAPHS = ("auto", "keep", "recompute")


class ObjectiveOptions(TypedDict, total=False):
    """Keyword options of `ModelObjective`, accepted by every measure's convenience form.

    Each key is documented on `ModelObjective`: ``params`` (which parameters), ``bn`` and
    ``dropout`` (the model-state policy), ``reduction`` (``"mean"`` or ``"sum"``),
    ``backend`` (how curvature products are taken: ``"auto"``, ``"func"``,
    ``"autograd"``), ``process_group`` (``torch.distributed``), ``func_mode`` and
    ``vectorize`` (how ``torch.func`` takes them), ``second_order`` (what to do with an
    operation that has no second derivative), ``micro_batch_size`` (batches evaluated in
    pieces of at most this many samples; ``"auto"``: the largest that fits the measure's
    ``memory_budget``, None where the whole batch fits) and ``graphs`` (whether gradient
    graphs are kept between curvature products: ``"auto"``, ``"keep"``, ``"recompute"``) and
    ``autocast`` (forward passes under `torch.autocast`: ``None`` follows the caller's
    context, ``False``, ``True`` or a dtype such as ``torch.bfloat16``).

    Examples:
        >>> options: ObjectiveOptions = {"bn": "batch", "reduction": "sum"}
        >>> sorted(options)
        ['bn', 'reduction']
    """

    params: ParamSelection
    bn: str
    dropout: bool
    reduction: str
    backend: str
    process_group: Any
    func_mode: str
    vectorize: bool | None
    second_order: str
    micro_batch_size: int | str | None
    graphs: str
    autocast: torch.dtype | bool | None


OBJECTIVE_OPTIONS: tuple[str, ...] = tuple(ObjectiveOptions.__annotations__)


def check_model_and_loss(model: Any, loss_fn: Any) -> None:
    """Raise `TypeError` unless ``model`` is a module and ``loss_fn`` a callable."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}."
        )


def check_options(
    *,
    bn: Any,
    dropout: Any,
    reduction: Any,
    backend: Any,
    func_mode: Any,
    vectorize: Any,
    second_order: Any = "raise",
    micro_batch_size: Any = None,
    graphs: Any = "auto",
    autocast: Any = None,
) -> None:
    """Raise a clear error for an invalid objective option (before any work)."""
    if not (autocast is None or isinstance(autocast, (bool, torch.dtype))):
        raise TypeError(
            "autocast must be None (follow the caller's torch.autocast context), False, True "
            f"or a dtype such as torch.bfloat16, got {type(autocast).__name__} {autocast!r}."
        )
    if isinstance(autocast, torch.dtype) and autocast not in LOW_PRECISION:
        raise ValueError(
            f"autocast must be one of {list(LOW_PRECISION)} as a dtype, got {autocast}; pass "
            "autocast=torch.bfloat16 (or autocast=False for the parameters' own precision)."
        )
    check_policy(bn, dropout)
    check_micro_batch_size(micro_batch_size)
    if graphs not in VALID_GRAPHS:
        raise ValueError(
            f"graphs must be one of {VALID_GRAPHS} ('auto': keep gradient graphs between "
            f"products where the operator's cache_graph asks, except for micro-batches; "
            f"'keep': also for micro-batches; 'recompute': never keep one), got {graphs!r}."
        )
    check_second_order_policy(second_order)
    if reduction not in VALID_REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {VALID_REDUCTIONS} ('mean': loss_fn returns batch "
            f"means, the dataset loss is the sample-weighted mean; 'sum': loss_fn returns "
            f"batch sums, the dataset loss is their sum), got {reduction!r}."
        )
    check_backend(backend)
    if func_mode not in VALID_FUNC_MODES:
        raise ValueError(
            f"func_mode must be one of {VALID_FUNC_MODES} ('reverse': vjp of grad; "
            f"'forward': jvp of grad), got {func_mode!r}."
        )
    if vectorize is not None:
        check_bool("vectorize", vectorize)
