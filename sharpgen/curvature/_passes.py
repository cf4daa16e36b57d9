r"""First-order passes over the data: the dataset loss, and the loss with its gradient.

Each batch $b$ (or micro-batch, where the objective splits its batches) adds
$w_b\,\ell_b$ and $w_b \nabla \ell_b$ to its accumulators, with the weights $w_b$ of the
objective (`sharpgen.curvature._interface.Objective`), and the objective's one reduction
point turns the sums into the dataset quantities. The accumulators are in the objective's
``accum_dtype`` (float32 for a bfloat16/float16 model): each batch's loss and gradient is
computed in the model's precision and rounded once into them. A gradient pass holds one
batch's graph at a time: it is freed by the backward pass that reads the batch's gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from sharpgen.curvature._data import num_samples
from sharpgen.curvature._interface import Objective

__all__ = ["dataset_loss", "dataset_loss_and_gradient"]


def dataset_loss(obj: Objective, p: Mapping[str, Tensor]) -> Tensor:
    """The dataset loss at ``p`` (checked, see `Objective`), without any graph."""
    total = torch.zeros((), dtype=obj.accum_dtype, device=obj.device)
    count = 0
    with obj.state(), torch.no_grad():
        others = obj._others()
        for inputs, targets in obj._iter():
            n = num_samples(inputs)
            loss = obj.batch_loss(p, inputs, targets, others=others)
            total = total + obj._weight(n) * loss.to(total.dtype)
            count += n
    return obj._finish([total], count, "loss")[0]


def dataset_loss_and_gradient(
    obj: Objective, p: Mapping[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """The dataset loss and its gradient at ``p`` in one pass (zeros for unused entries)."""
    total = torch.zeros((), dtype=obj.accum_dtype, device=obj.device)
    acc = {n: torch.zeros_like(t, dtype=obj.accum_dtype) for n, t in p.items()}
    count = 0
    names = list(p)
    with obj.state(), torch.enable_grad():
        others = obj._others()
        for inputs, targets in obj._iter():
            n = num_samples(inputs)
            w = obj._weight(n)
            preq = {k: t.detach().requires_grad_(True) for k, t in p.items()}
            loss = obj.batch_loss(preq, inputs, targets, others=others)
            grads = torch.autograd.grad(
                loss, [preq[k] for k in names], allow_unused=True, materialize_grads=True
            )
            total = total + w * loss.detach().to(total.dtype)
            for k, g in zip(names, grads, strict=True):
                acc[k].add_(g, alpha=w)
            count += n
    out = obj._finish([total, *acc.values()], count, "loss or its gradient")
    return out[0], dict(zip(names, out[1:], strict=True))
