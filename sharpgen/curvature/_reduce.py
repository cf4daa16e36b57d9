"""The one reduction point of every dataset quantity, and its finiteness check."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sharpgen._distributed import reduce_partials, resolve_process_group

__all__ = ["check_finite", "dataset_reduce"]


def dataset_reduce(
    partials: list[Tensor], count: int, reduction: str, process_group: Any = None
) -> tuple[list[Tensor], int]:
    r"""Turn per-process partial sums into the dataset quantity (the one reduction point).

    Every dataset quantity of `ModelObjective` goes through this function. The partial sums
    are the caller's accumulators and are reduced and divided in place.

    Args:
        partials: Per-process sums: $\sum_b n_b q_b$ for ``reduction="mean"``, $\sum_b q_b$
            for ``reduction="sum"``.
        count: Number of samples this process visited.
        reduction: ``"mean"`` (divide by the total count) or ``"sum"``.
        process_group: ``None``: no communication (the data seen by this process is the
            dataset). Otherwise a ``torch.distributed`` process group (for example
            ``torch.distributed.group.WORLD``; ``"auto"``: the default group if
            initialized) over which partial sums and the count are summed in ONE
            all-reduce before dividing.

    Returns:
        The dataset quantities (same shapes as ``partials``) and the total count.
    """
    group = resolve_process_group(process_group)
    if group is not None:  # sharpgen._distributed: one all-reduce, count included
        partials, count = reduce_partials(list(partials), count, group)
    if reduction == "mean":
        return [p.div_(count) for p in partials], count
    return list(partials), count


def check_finite(tensors: list[Tensor], what: str) -> None:
    """Raise `FloatingPointError` if a tensor holds NaN or Inf (``what`` names the quantity)."""
    for t in tensors:
        lo, hi = torch.aminmax(t.reshape(-1))  # NaN propagates; cheaper than isfinite
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise FloatingPointError(
                f"the {what} is not finite (NaN or Inf); check the data for NaN/Inf, the "
                "model for overflow (try float64) and the parameters."
            )
