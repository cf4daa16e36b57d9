"""Dataset curvature products: a kernel applied batch by batch, weighted and reduced.

`product` runs one `~sharpgen.curvature._kernels.Kernel` over the data of a
`ModelObjective` with the backend fallbacks of `sharpgen.curvature._backend`;
`block_product` is one pass for one backend, accumulating every batch's product straight
into one ``(n, k)`` buffer (no extra copies) with the weights of the dataset loss and
reducing it at the objective's one reduction point. The graph cache keeps one batch's
``apply`` (and so its gradient graph) between products.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sharpgen._distributed import check_ranks_agree
from sharpgen.curvature._backend import run_with_fallback
from sharpgen.curvature._data import num_samples
from sharpgen.curvature._kernels import BatchProduct, Kernel, accumulate

if TYPE_CHECKING:
    from sharpgen.curvature._objective import ModelObjective

__all__ = ["block_product", "block_views", "product"]


def block_views(buf: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Views ``(k, *shape)`` into the rows of an ``(n, k)`` buffer, one per entry of like."""
    k = buf.shape[1]
    out, offset = {}, 0
    for name, t in like.items():
        size = t.numel()
        out[name] = buf[offset : offset + size].T.view(k, *t.shape)
        offset += size
    return out


def _check_block(obj: ModelObjective, V: Mapping[str, Tensor]) -> int:
    if set(V) != set(obj.params):
        raise ValueError(f"V must have the selected names {list(obj.params)}, got {list(V)}.")
    ks = {V[n].shape[0] for n in obj.params}
    for n, ref in obj.params.items():
        if tuple(V[n].shape[1:]) != tuple(ref.shape):
            raise ValueError(
                f"V[{n!r}] must have shape (k, *{tuple(ref.shape)}), got {tuple(V[n].shape)}."
            )
    if len(ks) != 1:
        raise ValueError(f"the blocks of V have different leading sizes {sorted(ks)}.")
    return ks.pop()


def product(
    obj: ModelObjective,
    kernel: Kernel,
    V: Mapping[str, Tensor],
    params: Mapping[str, Tensor] | None,
    *,
    backend: str,
    cache: bool,
    owner: str,
) -> tuple[Tensor, str]:
    """The dataset product of ``kernel`` with the block ``V``, with backend fallbacks.

    Returns the ``(n, k)`` buffer and the backend that computed it; the objective
    remembers the ``func_mode`` that worked.
    """
    obj.check_second_order(owner)

    def run(b: str, m: str) -> Tensor:
        return block_product(obj, kernel, V, params, backend=b, mode=m, cache=cache)

    buf, used, mode = run_with_fallback(run, backend, obj._func_mode, owner=owner)
    if used == "func":
        obj._func_mode = mode
    return buf, used


def block_product(
    obj: ModelObjective,
    kernel: Kernel,
    V: Mapping[str, Tensor],
    params: Mapping[str, Tensor] | None,
    *,
    backend: str,
    mode: str,
    cache: bool,
) -> Tensor:
    r"""One pass over the data: $\sum_b w_b\, K_b V$ reduced like the loss, as ``(n, k)``."""
    p = obj.resolve(params)
    k = _check_block(obj, V)
    if obj.process_group is not None and not obj._tangents_checked:
        block = torch.cat([V[n].reshape(-1) for n in p])
        what = {"the first block of vectors (same probes/seed?)": block}
        check_ranks_agree(obj.process_group, what, where=f"ModelObjective.{kernel.name}")
        obj._tangents_checked = True
    W = {n: V[n] for n in p}
    buf = torch.empty((obj.numel, k), dtype=obj.dtype, device=obj.device)
    acc = block_views(buf, p)
    count = 0
    use_cache = cache and params is None and obj.single_batch
    with obj.state():
        others = obj._others()
        for inputs, targets in obj.batches():
            n = num_samples(inputs)
            key = _cache_key(obj, kernel, backend, others) if use_cache else None
            apply = _batch_apply(obj, kernel, key, others, p, inputs, targets, backend, mode)
            out = apply(W)
            if key is not None:
                obj._graph_cache = (key, apply)
            accumulate(acc, out, obj._weight(n), count == 0)
            del out, apply
            count += n
    (buf,) = obj._finish([buf], count, kernel.what)
    return buf


def _cache_key(
    obj: ModelObjective, kernel: Kernel, backend: str, others: dict[str, Tensor]
) -> tuple[Any, ...]:
    """What a kept graph depends on: the kernel, the backend, the model's other tensors."""
    tensors = [*others.values(), *obj.model.buffers()]
    return (kernel.name, backend, tuple(id(t) for t in tensors), tuple(t._version for t in tensors))


def _batch_apply(
    obj: ModelObjective,
    kernel: Kernel,
    key: tuple[Any, ...] | None,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    inputs: Any,
    targets: Any,
    backend: str,
    mode: str,
) -> BatchProduct:
    """One batch's ``apply``: built afresh, or the kept one while ``key`` still matches.

    A kept graph is built reverse-over-reverse (for ``backend="func"`` its ``vjp``
    closure holds the graph).
    """
    if key is None:
        return kernel.build(obj, others, p, inputs, targets, backend=backend, mode=mode,
                            keep=False)  # fmt: skip
    cached = obj._graph_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    obj._graph_cache = None  # free the old graph before building the new one
    return kernel.build(obj, others, p, inputs, targets, backend=backend, mode="rev", keep=True)
