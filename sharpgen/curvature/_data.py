"""Normalizing the ``data`` argument: one batch or any re-iterable of batches.

A *batch* is a pair ``(inputs, targets)``, or a Hugging Face batch: a dict of tensors with
the labels inside, taken as ``(batch, None)`` (the model is called as ``model(**batch)`` and
computes its own loss, see `model_loss`). ``inputs`` is a tensor (the model is called as
``model(inputs)``), a tuple or list of tensors (``model(*inputs)``) or a dict of tensors
(``model(**inputs)``). ``targets`` is handed to ``loss_fn(outputs, targets)`` unchanged.
The number of samples of a batch is the leading dimension of its (first) input tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sized
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["Batches", "PrivateRNG", "as_batches", "call_model", "check_devices", "num_samples"]

_T = TypeVar("_T")
_END = object()


def _is_inputs(x: Any) -> bool:
    if isinstance(x, Tensor):
        return True
    if isinstance(x, Mapping):
        return len(x) > 0 and all(isinstance(v, Tensor) for v in x.values())
    if isinstance(x, (tuple, list)):
        return len(x) > 0 and all(isinstance(v, Tensor) for v in x)
    return False


def is_dict_batch(x: Any) -> bool:
    """Whether ``x`` is a Hugging Face style batch: a non-empty mapping of tensors."""
    return isinstance(x, Mapping) and _is_inputs(x)


def _is_single_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and _is_inputs(data[0])
        and (isinstance(data[1], Tensor) or data[1] is None)
    )


def num_samples(inputs: Any) -> int:
    """Number of samples of a batch: the leading dimension of its first input tensor.

    Args:
        inputs: A tensor, a tuple/list of tensors or a dict of tensors.

    Returns:
        ``inputs.shape[0]`` for a tensor, else that of the first tensor.

    Raises:
        ValueError: If the tensor is 0-dimensional.
        TypeError: If ``inputs`` is none of the accepted kinds.

    Examples:
        >>> import torch
        >>> num_samples({"x": torch.zeros(5, 3), "mask": torch.ones(5)})
        5
    """
    if isinstance(inputs, Tensor):
        first = inputs
    elif isinstance(inputs, Mapping) and len(inputs) > 0:
        first = next(iter(inputs.values()))
    elif isinstance(inputs, (tuple, list)) and len(inputs) > 0:
        first = inputs[0]
    else:
        raise TypeError(
            "inputs must be a tensor, a non-empty tuple of tensors or a non-empty dict of "
            f"tensors, got {type(inputs).__name__}."
        )
    if not isinstance(first, Tensor):
        raise TypeError(f"the first input must be a tensor, got {type(first).__name__}.")
    if first.ndim == 0:
        raise ValueError(
            "the first input tensor is 0-dimensional, so it has no batch dimension; give "
            "inputs a leading sample dimension (e.g. x.unsqueeze(0))."
        )
    return int(first.shape[0])


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: ``model(x)``, ``model(*xs)`` or ``model(**kw)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _check_batch(batch: Any, index: int) -> tuple[Any, Any]:
    if is_dict_batch(batch):  # the labels are inside: model(**batch), targets None
        return dict(batch), None
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = (
            f"a {type(batch).__name__} of length {len(batch)}"
            if isinstance(batch, (tuple, list))
            else f"a {type(batch).__name__}"
        )
        raise ValueError(
            f"data batch {index} is {what}, not an (inputs, targets) pair; make every batch a "
            "pair, e.g. ((x1, x2), y) for a model with two inputs, or wrap the dataset so it "
            "yields (inputs, targets)."
        )
    inputs, targets = batch
    if not _is_inputs(inputs):
        raise TypeError(
            f"the inputs of data batch {index} are a {type(inputs).__name__}; they must be a "
            "tensor, a tuple of tensors (model(*inputs)) or a dict of tensors "
            "(model(**inputs))."
        )
    return inputs, targets


def _global_rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_global_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class PrivateRNG:
    """Run the user's data code on a private copy of the global random stream.

    A `torch.utils.data.DataLoader` draws a base seed from the global CPU RNG each time it
    is iterated (even with ``shuffle=False``), a shuffling sampler draws one more, and a
    dataset may draw for augmentation. `Batches` runs every such call (``iter`` and each
    ``next``) through `call`: the call sees a random stream that starts where the global one
    stood when the pass began and continues from call to call, so the batches and their
    order are exactly those the user's loop would get at that point; after each call the
    global CPU (and, where initialized, CUDA) states are put back, so the caller's later
    random draws are unchanged. The restore happens after every call, also when it raises.
    """

    def __init__(self) -> None:
        self._state = _global_rng_state()

    def call(self, fn: Callable[[], _T]) -> _T:
        """Return ``fn()`` run on the private stream; the global RNG is left as it was."""
        outside = _global_rng_state()
        _set_global_rng_state(self._state)
        try:
            return fn()
        finally:
            self._state = _global_rng_state()
            _set_global_rng_state(outside)


class Batches:
    """A re-iterable view of ``data`` that yields validated ``(inputs, targets)`` pairs.

    Iterating it never moves the global random number generators (see `PrivateRNG`): each
    pass over a shuffling `DataLoader` visits the batches in the order a loop written by the
    caller at that moment would, and every pass of one call visits them in the same order.

    Attributes:
        single: Whether ``data`` was one batch.
    """

    def __init__(self, source: Iterable[Any], single: bool) -> None:
        self._source = source
        self.single = single

    def _raw(self) -> Iterator[Any]:
        if isinstance(self._source, (tuple, list)):  # plain containers run no user code
            yield from self._source
            return
        rng = PrivateRNG()
        it = rng.call(lambda: iter(self._source))
        while (batch := rng.call(lambda: next(it, _END))) is not _END:
            yield batch

    def __iter__(self) -> Generator[tuple[Any, Any], None, None]:
        empty = True
        for index, batch in enumerate(self._raw()):
            empty = False
            yield _check_batch(batch, index)
        if empty:
            raise ValueError(
                "data yielded no batches; pass one (inputs, targets) batch or a non-empty "
                "iterable of batches (check the DataLoader's dataset and drop_last)."
            )

    def first(self) -> tuple[Any, Any]:
        """Return the first batch (validated) without a full pass."""
        it = iter(self)
        try:
            return next(it)
        finally:
            it.close()


def as_batches(data: Any) -> Batches:
    """Normalize one batch or an iterable of batches into a re-iterable `Batches`.

    ``data`` counts as ONE batch when it is a pair ``(inputs, targets)`` whose ``inputs``
    is a tensor, a tuple/list of tensors or a dict of tensors and whose ``targets`` is a
    tensor or ``None``, or when it is a dict of tensors (a Hugging Face batch with the
    ``labels`` inside, taken as ``(data, None)``; so is every such batch of an iterable).
    Anything else is taken as an iterable of batches (a list, a
    ``DataLoader``), which must be re-iterable: curvature products pass over the data once
    per product. A one-shot iterator or generator is consumed into a list (with a
    ``UserWarning``: its batches are then held in memory); pass a list or a ``DataLoader``
    to avoid that.

    Args:
        data: One batch or an iterable of batches.

    Returns:
        A `Batches` object; iterating it yields ``(inputs, targets)`` pairs and raises
        ``ValueError`` for a batch that is not a pair or for data without batches.

    Raises:
        ValueError: If ``data`` is an empty list/tuple or has ``len() == 0``.
        TypeError: If ``data`` is not iterable.

    Examples:
        >>> import torch
        >>> x, y = torch.zeros(4, 3), torch.zeros(4)
        >>> len(list(as_batches((x, y))))
        1
        >>> len(list(as_batches([(x, y), (x, y)])))
        2
        >>> as_batches({"input_ids": x, "labels": y}).first()[1] is None
        True
    """
    if isinstance(data, Batches):
        return data
    if _is_single_batch(data):
        return Batches((tuple(data),), single=True)
    if is_dict_batch(data):
        return Batches(((dict(data), None),), single=True)
    if isinstance(data, (Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be one (inputs, targets) batch or an iterable of such batches "
            f"(a list or a DataLoader), got {type(data).__name__}."
        )
    if isinstance(data, Sized) and len(data) == 0:
        raise ValueError(
            "data is empty; pass one (inputs, targets) batch or a non-empty iterable of batches."
        )
    if isinstance(data, Iterator):
        warnings.warn(
            "data is a one-shot iterator (e.g. a generator); its batches are collected into "
            "a list held in memory so that they can be visited once per product. Pass a list "
            "or a DataLoader to avoid this.",
            UserWarning,
            stacklevel=3,
        )
        one_shot = data
        data = PrivateRNG().call(lambda: list(one_shot))
        if len(data) == 0:
            raise ValueError("data is an exhausted or empty iterator; it yielded no batches.")
    return Batches(data, single=False)


def _tensors_in(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [v for v in x.values() if isinstance(v, Tensor)]
    if isinstance(x, (tuple, list)):
        return [v for v in x if isinstance(v, Tensor)]
    return []


def check_devices(inputs: Any, targets: Any, index: int, device: torch.device) -> None:
    """Raise `ValueError` if a tensor of batch ``index`` is not on ``device``."""
    for t in _tensors_in(inputs) + _tensors_in(targets):
        if t.device != device:
            raise ValueError(
                f"data batch {index} holds a tensor on {t.device} but the parameters are "
                f"on {device}; move the data to {device} (e.g. in the DataLoader "
                "loop or with a collate_fn)."
            )
