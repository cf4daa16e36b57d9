"""What a kept gradient graph depends on, read cheaply before every product through it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from sharpgen.curvature._interface import GraphKeyed

__all__ = ["graph_key"]


def graph_key(obj: GraphKeyed, kernel: str, backend: str) -> tuple[Any, ...]:
    """The kernel, the backend and the identity and version counter of every other tensor.

    The other tensors are the model's non-selected parameters, its buffers and, for one
    batch, the tensors of the batch: a batch written in place, a training step on a
    non-selected parameter or a replaced tensor changes the key. The selected parameters
    are the objective's own copies (a step on the model does not move them); they are
    recognised by the objects the model held at the first key, so a selected parameter
    replaced later counts as another tensor (one rebuild, never a stale graph). The
    modules are walked directly (no names built): this runs before every kept product.
    """
    selected = obj._selected_objects  # held by the objective, so their ids stay theirs
    if selected is None:
        selected = [t for n, t in obj.model.named_parameters() if n in obj.params]
        obj._selected_objects = selected
    skip = {id(t) for t in selected}
    tensors: list[Tensor] = []
    for module in _modules(obj.model):
        tensors += [p for p in module._parameters.values() if p is not None and id(p) not in skip]
        tensors += [b for b in module._buffers.values() if b is not None]
    if obj.single_batch:
        tensors += _tensors(obj.data)
    return (kernel, backend, tuple(id(t) for t in tensors), tuple(t._version for t in tensors))


def _modules(module: nn.Module) -> Iterator[nn.Module]:
    yield module
    for child in module._modules.values():
        if child is not None:
            yield from _modules(child)


def _tensors(data: Any) -> list[Tensor]:
    """The tensors of a batch (nested tuples, lists and dicts)."""
    if isinstance(data, Tensor):
        return [data]
    if isinstance(data, Mapping):
        data = list(data.values())
    if isinstance(data, (tuple, list)):
        return [t for item in data for t in _tensors(item)]
    return []
