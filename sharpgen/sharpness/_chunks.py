"""Splitting a dataset into chunks of ``m`` samples (for m-sharpness)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sharpgen.curvature import as_batches, num_samples

__all__ = ["concatenate_batches", "split_chunks"]


def _cat(parts: list[Any], what: str) -> Any:
    first = parts[0]
    if first is None:
        if any(p is not None for p in parts):
            raise ValueError(f"the {what} are None in some batches and not in others.")
        return None
    if isinstance(first, Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts], dim=0) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(torch.cat([p[i] for p in parts], dim=0) for i in range(len(first)))
    raise TypeError(
        f"cannot concatenate {what} of type {type(first).__name__} across batches for "
        "m-sharpness; pass the data as one (inputs, targets) batch of tensors."
    )


def _slice(x: Any, start: int, stop: int) -> Any:
    if x is None:
        return None
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return type(x)(v[start:stop] for v in x)


def concatenate_batches(data: Any) -> tuple[Any, Any]:
    """Return the whole dataset as one ``(inputs, targets)`` batch."""
    batches = list(as_batches(data))
    if len(batches) == 1:
        return batches[0]
    inputs = _cat([b[0] for b in batches], "inputs")
    targets = _cat([b[1] for b in batches], "targets")
    return inputs, targets


def split_chunks(batch: tuple[Any, Any], m: int) -> list[tuple[Any, Any]]:
    """Consecutive chunks of ``m`` samples of one batch (``m`` divides its size)."""
    inputs, targets = batch
    n = num_samples(inputs)
    return [(_slice(inputs, s, s + m), _slice(targets, s, s + m)) for s in range(0, n, m)]
