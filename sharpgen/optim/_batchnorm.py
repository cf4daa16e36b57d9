"""Keep BatchNorm running statistics out of the perturbed pass of SAM."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["disable_running_stats"]


@contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Forward passes inside the block do not update running statistics.

    Every normalization module with running statistics (`torch.nn.BatchNorm1d/2d/3d`,
    `torch.nn.SyncBatchNorm`, the lazy variants and `InstanceNorm` with
    ``track_running_stats=True``) that is in training mode has ``track_running_stats`` set to
    ``False`` for the duration of the block: it still normalizes with the statistics of the
    current batch (so the forward pass computes exactly what a training forward pass computes),
    but ``running_mean``, ``running_var`` and ``num_batches_tracked`` are not updated (they
    are also saved on entry and copied back on exit, which covers `torch.nn.InstanceNorm1d`,
    whose functional form updates them regardless of the flag). Modules in eval mode are left
    alone (they keep using their running statistics). Flags and buffers are restored on exit,
    also when the block raises.

    Use it around the second (perturbed) forward pass of SAM, so that the statistics are
    updated once per step, at the unperturbed weights, as with the base optimizer.

    Args:
        model: Any module; its submodules are searched.

    Yields:
        The model.

    Raises:
        TypeError: ``model`` is not an `torch.nn.Module`.

    Examples:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> with disable_running_stats(bn):
        ...     _ = bn(torch.randn(4, 3))
        >>> int(bn.num_batches_tracked), bn.running_mean.tolist()
        (0, [0.0, 0.0, 0.0])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    changed = [
        m
        for m in model.modules()
        if isinstance(m, _NormBase) and m.training and m.track_running_stats
    ]
    # InstanceNorm passes its running buffers to F.instance_norm whatever the flag says, so
    # the buffers are also saved and copied back: the guarantee does not depend on the flag.
    saved = [
        (buf, buf.detach().clone())
        for m in changed
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    try:
        for m in changed:
            m.track_running_stats = False
        yield model
    finally:
        for m in changed:
            m.track_running_stats = True
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
