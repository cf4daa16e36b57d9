"""What the kernels, products and checks use of an objective: narrow interfaces.

`sharpgen.curvature.ModelObjective` implements all of them; the modules below it (kernels,
products, columns, graph keys, validation, dataset passes) are typed against these
protocols, not against the class, so none of them imports the objective back.

* `BatchFunctions` -- what a kernel (`sharpgen.curvature._kernels`) calls: the pure
  functions of one batch and two choices of the objective.
* `GraphKeyed` -- what a graph key (`sharpgen.curvature._graph_key`) reads.
* `Objective` -- what a dataset pass (`sharpgen.curvature._products`,
  `sharpgen.curvature._passes`, `sharpgen.curvature._validate`) uses: the data,
  the weights and reduction of the dataset loss, the model state, and the mutable
  per-objective state of the products (kept graphs, the ``func_mode`` that worked).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from sharpgen.curvature._columns import ColumnPlan, SavedBytes

__all__ = ["BatchFunctions", "FirstGraph", "GraphKeyed", "Objective"]


@dataclass
class FirstGraph:
    """The validated loss of a one-batch objective, kept for its first graph build.

    Attributes:
        params: The leaves the loss was built on (detached aliases of the objective's
            ``params`` that require grad).
        loss: The batch loss, with its graph.
        inputs: The batch inputs the loss saw (compared by identity).
        key: `sharpgen.curvature._validate.first_graph_key` when the loss was built.
        saved: What the forward pass saved for the backward
            (`sharpgen.curvature._columns.SavedBytes`), for the memory plan's graph.
    """

    params: dict[str, Tensor]
    loss: Tensor
    inputs: Any
    key: tuple[Any, ...]
    saved: SavedBytes | None = None


class BatchFunctions(Protocol):
    """The functions of one batch a kernel evaluates, and how it treats a block.

    ``_forward(others, p, inputs)`` is the model's output at the selected parameters ``p``
    (the non-selected ``others`` held constant); ``_apply_loss`` the checked scalar loss of
    outputs; ``batch_loss`` both. ``_take_first_graph`` hands over a kept validation graph
    once; ``_column_plans`` holds the per-kernel `ColumnPlan`.
    """

    @property
    def vectorize(self) -> bool: ...

    @property
    def _column_plans(self) -> dict[str, ColumnPlan]: ...

    def batch_loss(
        self, params: Mapping[str, Tensor], inputs: Any, targets: Any, *, others: Any = None
    ) -> Tensor: ...

    def _forward(self, others: dict[str, Tensor], p: Mapping[str, Tensor], inputs: Any) -> Any: ...

    def _apply_loss(self, outputs: Any, targets: Any) -> Tensor: ...

    def _take_first_graph(self, p: Mapping[str, Tensor], inputs: Any) -> FirstGraph | None: ...


class GraphKeyed(Protocol):
    """What a kept graph depends on: the model, the selection and (one batch) the data."""

    _selected_objects: list[Tensor] | None

    @property
    def model(self) -> nn.Module: ...

    @property
    def params(self) -> dict[str, Tensor]: ...

    @property
    def single_batch(self) -> bool: ...

    @property
    def data(self) -> Any: ...


class Objective(BatchFunctions, GraphKeyed, Protocol):
    """What a pass over the data uses of an objective (see the module note).

    ``_weight(n)`` is a batch's weight in the dataset sum and ``_finish`` the one reduction
    point (over batches and processes); ``_iter()`` yields the validated batches of a pass
    and ``_first_batch()`` the first one, unchecked; ``_others()`` the non-selected
    parameters, detached. ``dtype`` is the parameters' (what products are computed in),
    ``accum_dtype`` what sums, products and vectors are kept in (float32 for a
    bfloat16/float16 model, `sharpgen._precision`); ``precision()`` the context of a
    forward pass (the objective's autocast). ``_graph_cache``, ``_func_mode``,
    ``_tangents_checked``, ``_first_order`` and ``_first_graph`` are the products' state on
    this objective; ``autocast`` the autocast dtype of its forward passes (or None) and
    ``_batches`` its batches (``first()``: the first whole batch, for
    ``micro_batch_size="auto"``).
    """

    autocast: Any
    _batches: Any
    _graph_cache: Any
    _func_mode: str
    _tangents_checked: bool
    _first_order: list[str]
    _first_graph: FirstGraph | None

    @property
    def numel(self) -> int: ...

    @property
    def sizes(self) -> list[int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def accum_dtype(self) -> torch.dtype: ...

    @property
    def process_group(self) -> Any: ...

    @property
    def bn(self) -> str: ...

    @property
    def dropout(self) -> bool: ...

    @property
    def second_order(self) -> str: ...

    @property
    def reduction(self) -> str: ...

    @property
    def micro_batch_size(self) -> int | None: ...

    @property
    def graphs(self) -> str: ...

    def resolve(self, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]: ...

    def state(self) -> AbstractContextManager[None]: ...

    def precision(self) -> AbstractContextManager[Any]: ...

    def _iter(self) -> Iterator[tuple[Any, Any]]: ...

    def _first_batch(self) -> tuple[Any, Any]: ...

    def loss(self, params: Mapping[str, Tensor] | None = None) -> Tensor: ...

    def check_second_order(self, where: str) -> None: ...

    def _others(self) -> dict[str, Tensor]: ...

    def _weight(self, n: int) -> float: ...

    def _finish(
        self, partials: list[Tensor], count: int, what: str, check: bool = True
    ) -> list[Tensor]: ...
