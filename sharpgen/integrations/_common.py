"""What the framework callbacks share.

The schedule, the data on the model's device, the guard that keeps the trainer's randomness
and data order untouched, and the record -> scalar metrics conversion (so every integration
logs the same keys).
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen.sharpness import SharpnessTracker
from sharpgen.sharpness._export import scalar_metrics

__all__ = [
    "MeasureCore",
    "as_pair",
    "check_schedule",
    "preserve_randomness",
    "scalar_metrics",
    "to_device",
]


def as_pair(batch: Any) -> Any:
    """A dict batch (a Hugging Face batch, the labels inside) -> ``(inputs, None)``."""
    return (dict(batch), None) if isinstance(batch, Mapping) else batch


def check_schedule(every_n_steps: int | None, every_n_epochs: int | None) -> tuple[str, int]:
    """Validate the schedule: exactly one of the two counts, a positive int."""
    if (every_n_steps is None) == (every_n_epochs is None):
        raise ValueError(
            f"give exactly one of every_n_steps and every_n_epochs, got every_n_steps="
            f"{every_n_steps!r} and every_n_epochs={every_n_epochs!r}; e.g. every_n_steps=100."
        )
    unit, value = (
        ("steps", every_n_steps) if every_n_steps is not None else ("epochs", every_n_epochs)
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"every_n_{unit} must be an int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"every_n_{unit} must be an int >= 1, got {value}.")
    return unit, int(value)


def check_prefix(prefix: object) -> str:
    """Validate the metric-name prefix."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str such as 'sharpness/', got {type(prefix).__name__}.")
    return prefix


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested tuple/list/dict) batch to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class _MappedBatches:
    """A re-iterable view of an iterable of batches with ``fn`` applied to each batch."""

    def __init__(self, source: Iterable[Any], fn: Callable[[Any], Any]) -> None:
        self.source = source
        self._fn = fn

    def __iter__(self) -> Iterator[Any]:
        # A generator function: the source is iterated only when batches are asked for.
        for batch in self.source:
            yield self._fn(batch)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The generators a DataLoader (or its samplers) draws its order from, if any."""
    found: list[torch.Generator] = []
    candidates = [
        getattr(data, "generator", None),
        getattr(getattr(data, "sampler", None), "generator", None),
        getattr(getattr(getattr(data, "batch_sampler", None), "sampler", None), "generator", None),
    ]
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


@contextmanager
def preserve_randomness(data: Any = None) -> Iterator[None]:
    """Restore every random state a measurement might touch, also after an exception.

    The global torch RNG (CPU and, when CUDA is initialized, every CUDA device), Python's
    ``random`` and numpy's global RNG, and the generators of ``data`` when it is a
    ``DataLoader`` (its own, its sampler's and its batch sampler's sampler's): iterating the
    trainer's own loader inside the block does not change the order the trainer sees.
    """
    import numpy as np

    gens = _loader_generators(data)
    gen_states = [g.get_state() for g in gens]
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global state)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for g, s in zip(gens, gen_states, strict=True):
            g.set_state(s)
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


class MeasureCore:
    """The framework-independent part of a sharpness callback.

    Holds the tracker options, checks them at construction (before any training), builds the
    `SharpnessTracker` once it knows the model and its device, and measures under
    `preserve_randomness`.
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        data: Any,
        *,
        prefix: str,
        tracker_options: Mapping[str, Any],
        batch_fn: Callable[[Any], Any] | None = as_pair,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, targets) (or None: the loss "
                f"the model returns), got {type(loss_fn).__name__}."
            )
        if getattr(data, "persistent_workers", False) and getattr(data, "num_workers", 0) > 0:
            raise ValueError(
                "data is a DataLoader with persistent_workers=True; iterating it inside a "
                "callback resets its shared iterator (the trainer's, if it is the training "
                "loader). Pass a DataLoader without persistent workers or a held batch."
            )
        self.loss_fn = loss_fn
        self.data = data
        self.prefix = check_prefix(prefix)
        self.tracker_options = dict(tracker_options)
        self._batch_fn = batch_fn
        # Validate measures / options / the kind of data now (the model is checked when the
        # tracker is built, at the start of training: `tracker_for`).
        with preserve_randomness(data):
            stand_in = self._placed(torch.device("cpu"), check=True)
            SharpnessTracker.check_arguments(loss_fn, stand_in, **self.tracker_options)
        self.tracker: SharpnessTracker | None = None
        self._device: torch.device | None = None

    def _placed(self, device: torch.device, *, check: bool = False) -> Any:
        """``data`` mapped through ``batch_fn`` and moved to ``device`` (lazily for loaders)."""

        def fn(batch: Any) -> Any:
            if self._batch_fn is not None:
                batch = self._batch_fn(batch)
            return batch if check else to_device(batch, device)

        if self._is_one_batch():
            return fn(self.data)
        return _MappedBatches(self.data, fn)

    def _is_one_batch(self) -> bool:
        data = self.data if self._batch_fn is None else self._batch_fn(self.data)
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            return False
        inputs = data[0]
        return isinstance(inputs, (Tensor, Mapping)) or (
            isinstance(inputs, (tuple, list)) and all(isinstance(t, Tensor) for t in inputs)
        )

    @staticmethod
    def device_of(model: nn.Module) -> torch.device:
        """The device of the model's parameters (a clear error for a model without any)."""
        for p in model.parameters():
            return p.device
        raise ValueError(
            f"the model ({type(model).__name__}) has no parameters; sharpness is measured with "
            "respect to the parameters, so pass the model being trained."
        )

    def tracker_for(self, model: nn.Module, device: torch.device) -> SharpnessTracker:
        """The tracker of ``model`` (built on first use, rebuilt for another model/device)."""
        if self.tracker is None or self.tracker.model is not model or self._device != device:
            old = self.tracker
            with preserve_randomness(self.data):
                self.tracker = SharpnessTracker(
                    model, self.loss_fn, self._placed(device), every=1, **self.tracker_options
                )
            if old is not None:  # keep the history of earlier fits
                self.tracker.load_state_dict(old.state_dict())
            self._device = device
        return self.tracker

    def measure(self, model: nn.Module, device: torch.device, step: int) -> dict[str, float]:
        """Measure now, record under ``step`` and return the prefixed scalar metrics."""
        tracker = self.tracker_for(model, device)
        with preserve_randomness(self.data):
            record = tracker.measure(step)
        return scalar_metrics(record, self.prefix)
