"""The checks of an objective (`ModelObjective`): the loss's value, the first batch, determinism.

They run before any curvature product (the first batch at construction, determinism on
request), so that a bad model, loss or data set fails with a clear message instead of a
wrong answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

from sharpgen._distributed import check_ranks_agree
from sharpgen.curvature._columns import SavedBytes, held_tensors
from sharpgen.curvature._data import check_devices
from sharpgen.curvature._graph_key import graph_key
from sharpgen.curvature._interface import FirstGraph
from sharpgen.curvature._no_second import builtin_first_order
from sharpgen.curvature._second_order import first_order_functions

if TYPE_CHECKING:
    from sharpgen.curvature._interface import Objective

__all__ = [
    "FirstGraph",
    "check_deterministic",
    "check_processes_agree",
    "checked_loss",
    "first_graph_key",
    "keeping_first_graph",
    "take_first_graph",
    "validate_first_batch",
]

#: Whether objectives built now keep their validation graph for the first build.
_KEEP_FIRST: ContextVar[bool] = ContextVar("sharpgen_keep_first_graph", default=False)


@contextmanager
def keeping_first_graph() -> Iterator[None]:
    """Context: a one-batch objective built inside keeps its validation graph (`FirstGraph`).

    For the measures, which build an objective and at once build the batch's gradient
    graph: the forward pass of the validation then serves as the graph's forward pass
    (one forward per call instead of two). An objective built elsewhere keeps nothing, so
    an objective that a caller holds does not hold a graph.
    """
    token = _KEEP_FIRST.set(True)
    try:
        yield
    finally:
        _KEEP_FIRST.reset(token)


def first_graph_key(obj: Objective) -> tuple[Any, ...]:
    """What the validation graph depends on: the graph key's tensors and the base point.

    The graph key (`sharpgen.curvature._graph_key.graph_key`) covers the model's other
    tensors and the batch; the version counters of the objective's own parameter copies
    cover an in-place write to the base point.
    """
    _, _, ids, versions = graph_key(obj, "", "")
    return ids, versions, tuple(t._version for t in obj.params.values())


def take_first_graph(obj: Objective, p: Mapping[str, Tensor], inputs: Any) -> FirstGraph | None:
    """The kept validation graph if it is the loss at ``p`` on ``inputs`` (handed over once).

    It is that loss when ``p`` is the base point, ``inputs`` the batch it saw and nothing
    it depends on was written or replaced since (`first_graph_key`).
    """
    first, obj._first_graph = obj._first_graph, None
    if first is None or p is not obj.params or inputs is not first.inputs:
        return None
    return first if first_graph_key(obj) == first.key else None


def check_processes_agree(obj: Objective) -> None:
    """With a process group, raise unless every process built the same objective."""
    if obj.process_group is None:
        return
    agree = {
        "the number of selected parameters": obj.numel,
        "the parameter names and shapes": [(n, tuple(t.shape)) for n, t in obj.params.items()],
        "the dtype": str(obj.dtype),
        "reduction": obj.reduction,
        "bn": obj.bn,
    }
    check_ranks_agree(obj.process_group, agree, where="ModelObjective")


def checked_loss(loss: Any) -> Tensor:
    """``loss`` as a 0-d tensor, or a `TypeError`/`ValueError` naming what ``loss_fn`` did."""
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return a tensor, got {type(loss).__name__}; return "
            "e.g. torch.nn.functional.cross_entropy(outputs, targets)."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return a "
            "scalar: the batch mean (reduction='mean', the default) or the batch sum "
            "(pass reduction='sum')."
        )
    return loss.reshape(())


def validate_first_batch(obj: Objective) -> None:
    """Evaluate the loss on the first batch: finite, depending on the selected parameters.

    Also records the operations without a second derivative the loss goes through (unless
    ``second_order="ignore"``), for `ModelObjective.check_second_order`. Inside
    `keeping_first_graph`, a one-batch objective without dropout keeps the loss and its
    graph as ``obj._first_graph`` for its first graph build.
    """
    keep = obj.single_batch and not obj.dropout and obj.process_group is None
    keep = keep and obj.micro_batch_size is None  # a micro-batch's graph is not the batch's
    keep = keep and _KEEP_FIRST.get()
    counter = SavedBytes(held_tensors(obj))  # what a kept first graph holds
    with obj.state(), torch.enable_grad():
        inputs, targets = obj._first_batch()
        check_devices(inputs, targets, 0, obj.device)
        p = {n: t.detach().requires_grad_(True) for n, t in obj.params.items()}
        with saved_tensors_hooks(counter.pack, _unpack) if keep else nullcontext():
            loss = obj.batch_loss(p, inputs, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss on the first batch is {float(loss.detach())}; check the data for "
                "NaN/Inf, the model for overflow (try float64) and the parameters."
            )
        if not loss.requires_grad:
            raise ValueError(
                f"the loss does not depend on the selected parameters "
                f"{list(obj.params)[:6]}; select parameters the loss uses (params=...), "
                "and check that loss_fn does not detach the outputs."
            )
        if obj.second_order != "ignore":
            obj._first_order = first_order_functions(loss, list(p.values()))
            obj._first_order += builtin_first_order(
                obj.model, loss, lambda: obj.batch_loss(p, inputs, targets)
            )
    if keep:
        obj._first_graph = FirstGraph(p, loss, inputs, first_graph_key(obj), counter)


def _unpack(t: Tensor) -> Tensor:
    return t


def check_deterministic(obj: Objective) -> None:
    """Evaluate the loss in two passes over the data and raise if they differ.

    Raises:
        ValueError: If the two losses differ by more than ``1000 * eps`` (relative).
    """
    first = obj.loss()
    second = obj.loss()
    tol = 1000 * torch.finfo(obj.dtype).eps
    if not torch.isclose(first, second, rtol=tol, atol=0.0):
        raise ValueError(
            f"the loss differs between two passes over the data ({float(first)!r} vs "
            f"{float(second)!r}), so curvature products would be inconsistent. Make the "
            "evaluation deterministic: switch off data augmentation, use a DataLoader with "
            "shuffle=False (or a fixed list of batches), and keep dropout=False (and "
            "bn='eval' or fixed batches)."
        )
