"""Sharding data over `torch.distributed` processes: exact shards, no padded samples.

`shard_indices` cuts a dataset into contiguous shards; `without_sampler_padding` drops the
samples a `DistributedSampler` repeats for padding, so that sums over the processes count
every sample once (`ModelObjective` applies it to every ``data`` it gets).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from sharpgen._distributed import AUTO, group_rank_size, resolve_process_group
from sharpgen._validation import is_int
from sharpgen.curvature._data import num_samples

__all__ = ["UnpaddedLoader", "shard_indices", "without_sampler_padding"]


def shard_indices(
    n: int, rank: int | None = None, world_size: int | None = None, *, process_group: Any = AUTO
) -> range:
    """The contiguous block of ``range(n)`` that process ``rank`` of ``world_size`` owns.

    The first ``n % world_size`` ranks get one sample more; nothing is padded or repeated, so
    the shards partition the dataset exactly (uneven shards are fine: the measures weight by
    the global sample count). Use ``torch.utils.data.Subset(dataset, shard_indices(len(dataset)))``.

    Args:
        n: Dataset size, ``>= 0``.
        rank: This process's rank (default: from ``process_group``; 0 without one).
        world_size: Number of processes (default: from ``process_group``; 1 without one).
        process_group: Where ``rank``/``world_size`` come from when not given (see the
            ``process_group`` policy: ``"auto"``, ``None`` or a group).

    Returns:
        A ``range`` of indices.

    Raises:
        ValueError: ``n < 0``, ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.

    Examples:
        >>> [list(shard_indices(10, r, 3)) for r in range(3)]
        [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    """
    if not is_int(n) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the dataset size), got {n!r}.")
    if rank is None or world_size is None:
        group = resolve_process_group(process_group)
        r, w = group_rank_size(group) if group is not None else (0, 1)
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}.")
    if not is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}.")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _padding_sampler(data: Any) -> Any:
    """The `DistributedSampler` of a DataLoader that pads (repeats samples), else None."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(data, DataLoader):
        return None
    candidates = [getattr(data, "sampler", None)]
    batch_sampler = getattr(data, "batch_sampler", None)
    if batch_sampler is not None:
        candidates.append(getattr(batch_sampler, "sampler", None))
    for sampler in candidates:
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            if sampler.total_size > len(sampler.dataset):  # type: ignore[arg-type]
                return sampler
    return None


def _take(x: Any, k: int, index: int) -> Any:
    if x is None:
        return None
    if isinstance(x, Tensor):
        return x[:k]
    if isinstance(x, Mapping):
        return {key: _take(v, k, index) for key, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_take(v, k, index) for v in x)
    raise TypeError(
        f"batch {index} holds a {type(x).__name__}, which cannot be cut to drop the samples "
        "DistributedSampler repeats; use tensors (or tuples/dicts of tensors), or shard the "
        "data without padding (sharpgen.shard_indices)."
    )


class UnpaddedLoader:
    """A DataLoader over a padding `DistributedSampler`, without the repeated samples.

    `torch.utils.data.distributed.DistributedSampler` (``drop_last=False``) pads the index
    list to a multiple of the number of processes by repeating its first indices; the
    padded positions are the last ones of the global order, i.e. the trailing samples of
    some ranks. This wrapper yields the loader's batches with those trailing samples cut off
    (the batch containing the boundary is sliced, later batches are skipped), so the shards
    partition the dataset exactly. The padding is recomputed from the sampler on every pass.
    """

    def __init__(self, loader: Any, sampler: Any) -> None:
        self.loader = loader
        self.sampler = sampler

    def num_valid(self) -> int:
        """Number of this rank's samples that are not padding."""
        s = self.sampler
        n, w, r = len(s.dataset), s.num_replicas, s.rank
        return max(0, -(-(n - r) // w))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        left = self.num_valid()
        for index, batch in enumerate(self.loader):
            if left <= 0:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                yield batch  # let the objective's batch check explain the problem
                return
            inputs, targets = batch
            n = num_samples(inputs)
            if n > left:
                pair = (_take(inputs, left, index), _take(targets, left, index))
                batch = list(pair) if isinstance(batch, list) else pair
                n = left
            left -= n
            yield batch


def without_sampler_padding(data: Any) -> Any:
    """Drop the samples a `DistributedSampler` repeats for padding (else return ``data``).

    For a `torch.utils.data.DataLoader` whose sampler is a
    `torch.utils.data.distributed.DistributedSampler` with ``drop_last=False`` and a dataset
    size not divisible by the number of processes, return an `UnpaddedLoader` that yields
    the same batches without the repeated samples; the per-process shards then partition the
    dataset, and sums over the processes count every sample once. Any other ``data`` is
    returned unchanged. (With ``drop_last=True`` the sampler drops the tail of the dataset
    instead; the result is then the quantity on the remaining samples.)

    Args:
        data: One batch, an iterable of batches or a DataLoader.

    Returns:
        ``data`` or an `UnpaddedLoader`.

    Examples:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from torch.utils.data.distributed import DistributedSampler
        >>> ds = TensorDataset(torch.arange(5.0), torch.arange(5.0))
        >>> sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
        >>> [x.tolist() for x, _ in DataLoader(ds, batch_size=2, sampler=sampler)]
        [[1.0, 3.0], [0.0]]
        >>> loader = without_sampler_padding(DataLoader(ds, batch_size=2, sampler=sampler))
        >>> [x.tolist() for x, _ in loader]
        [[1.0, 3.0]]
    """
    sampler = _padding_sampler(data)
    if sampler is None:
        return data
    return UnpaddedLoader(data, sampler)
