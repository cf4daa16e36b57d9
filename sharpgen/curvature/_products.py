r"""Dataset curvature products: a kernel applied batch by batch, weighted and reduced.

`product` runs one `~sharpgen.curvature._kernels.Kernel` over the data of a
`ModelObjective` with the backend fallbacks of `sharpgen.curvature._backend`;
`block_product` is one pass for one backend, accumulating every batch's product straight
into one ``(n, k)`` buffer (no extra copies) with the weights of the dataset loss and
reducing it at the objective's one reduction point. The graph cache keeps every batch's
``apply`` (and so its gradient graph) between products, memory permitting.

**Memory.** Let $P$ be the bytes of the selected parameters, $k$ the columns of a block
and $S_b$ the bytes autograd saves while building batch (or micro-batch) $b$'s gradient
graph for a double backward (the forward's activations and the gradient's own graph;
counted by `~sharpgen.curvature._columns.SavedBytes`). Besides the model and the data, a
product of one block holds

* its result, $kP$ (the block is read in place, one column copied at a time);
* recomputed graphs (objective option ``graphs="recompute"``, an operator's
  ``cache_graph=False``, or a point other than the base point): one batch's graph at a
  time, $\max_b S_b$ plus one column's backward pass (the loop) or a chunk's (batched),
  freed when the product returns: nothing is held between products;
* kept graphs (``cache_graph`` ``"auto"``/``True`` with ``graphs="auto"`` or ``"keep"``):
  $\sum_b S_b$ from the first product until `ModelObjective.clear_cache`, at most
  `GRAPH_CACHE_BYTES` for several batches (above it nothing is kept). Each product is
  then one backward pass per batch and no forward pass.

``micro_batch_size`` $m$ divides each $S_b$ by about $n_b / m$; with ``graphs="auto"`` the
micro-batches' graphs are recomputed, so a product holds about $(m / n_b)\, S_b$.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

from sharpgen._distributed import check_ranks_agree, empty_with_count_room
from sharpgen._precision import full_precision
from sharpgen.curvature._backend import prefer_double_backward, run_with_fallback
from sharpgen.curvature._columns import SavedBytes, column_plan, held_tensors, probes
from sharpgen.curvature._data import num_samples
from sharpgen.curvature._ggn_reverse import route_kernel
from sharpgen.curvature._graph_key import graph_key
from sharpgen.curvature._interface import Objective
from sharpgen.curvature._kernels import BatchProduct, ColumnProduct, Kernel, accumulate

__all__ = [
    "block_product",
    "block_views",
    "build_kept",
    "kept_gradient",
    "kept_graph_bytes",
    "kept_matvec",
    "product",
    "release_gradients",
]


def block_views(buf: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Views ``(k, *shape)`` into the rows of an ``(n, k)`` buffer, one per entry of like."""
    k = buf.shape[1]
    out, offset = {}, 0
    for name, t in like.items():
        size = t.numel()
        out[name] = buf[offset : offset + size].T.view(k, *t.shape)
        offset += size
    return out


def _check_block(obj: Objective, V: Mapping[str, Tensor]) -> int:
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
    obj: Objective,
    kernel: Kernel,
    V: Mapping[str, Tensor],
    params: Mapping[str, Tensor] | None,
    *,
    backend: str,
    cache: bool | str,
    owner: str,
    check_finite: bool = True,
) -> tuple[Tensor, str]:
    """The dataset product of ``kernel`` with the block ``V``, with backend fallbacks.

    Returns the ``(n, k)`` buffer and the backend that computed it; the objective
    remembers the ``func_mode`` that worked. ``check_finite=False`` leaves the NaN/Inf
    check to the caller (a `LinearOperator` checks every product it returns).
    """
    kernel = route_kernel(obj, kernel, owner)  # ops without a second derivative
    obj.check_second_order(owner)

    def run(b: str, m: str) -> Tensor:
        return block_product(obj, kernel, V, params, backend=b, mode=m, cache=cache,
                             check_finite=check_finite)  # fmt: skip

    backend = prefer_double_backward(backend, kernel.name, obj.device)
    with full_precision():  # the caller's autocast never reaches the sums
        buf, used, mode = run_with_fallback(run, backend, obj._func_mode, owner=owner)
    if used == "func":
        obj._func_mode = mode
    return buf, used


def block_product(
    obj: Objective,
    kernel: Kernel,
    V: Mapping[str, Tensor],
    params: Mapping[str, Tensor] | None,
    *,
    backend: str,
    mode: str,
    cache: bool | str,
    check_finite: bool = True,
) -> Tensor:
    r"""One pass over the data: $\sum_b w_b\, K_b V$ reduced like the loss, as ``(n, k)``."""
    p = obj.resolve(params)
    k = _check_block(obj, V)
    if obj.process_group is not None and not obj._tangents_checked:
        block = torch.cat([V[n].reshape(-1) for n in p])
        what = {"the first block of vectors (same probes/seed?)": block}
        check_ranks_agree(obj.process_group, what, where=f"ModelObjective.{kernel.name}")
        obj._tangents_checked = True
        del block, what  # a copy of the whole block: not held through the product
    # the block as given (views): a column is copied when a backward pass needs it, so a
    # product holds one column's copy at a time, not a copy of the whole block
    # (a float32 block of a bfloat16/float16 model is rounded to the model's dtype once)
    W = {n: V[n].to(obj.dtype) for n in p}
    # over a group: room for the count after the block, all-reduced in place (no copy)
    shape, empty = (obj.numel, k), torch.empty
    if obj.process_group is not None:
        empty = empty_with_count_room  # type: ignore[assignment]
    buf = empty(shape, dtype=obj.accum_dtype, device=obj.device)
    acc = block_views(buf, p)
    count = 0
    # a kept func graph is reverse-over-reverse: "auto" leaves func_mode="forward" as asked
    func_ok = kernel.func_keeps and (cache is True or mode == "rev")
    keep = _may_keep(obj, cache, params, backend) and (backend != "func" or func_ok)
    key = _cache_key(obj, kernel, backend) if keep else None
    kept = _kept(obj, key)
    if kept:  # backward passes through kept graphs only: the model is not touched
        for apply, n in kept:
            accumulate(acc, apply(W), obj._weight(n), count == 0)
            count += n
    else:
        with obj.state():
            others = obj._others()
            # () marks graphs too large to keep for this key: build them per pass
            batches = _build(obj, kernel, None if kept == () else key, others, p, backend, mode)
            for apply, n in batches:
                out = apply(W)
                accumulate(acc, out, obj._weight(n), count == 0)
                del out, apply
                count += n
    (buf,) = obj._finish([buf], count, kernel.what, check=check_finite)
    return buf


def kept_matvec(obj: Objective, kernel: Kernel, v: Tensor, backend: str) -> Tensor | None:
    """One flat vector through the kept double-backward graphs, or None where there are none.

    The lean single-vector path of a kept graph: per batch one ``torch.autograd.grad``
    through the kept graph seeded with ``v`` itself (the Hessian's kept graph ends in the
    concatenated gradient, see ``_flat_product`` in `sharpgen.curvature._kernels`; other
    kernels split ``v`` into per-parameter views) and one ``torch.cat``, without the block
    machinery of
    `block_product` (views of ``(n, k)`` buffers, per-column dicts). It applies only where
    `block_product` would use the same kept graphs (same cache key, so a changed buffer or
    non-selected parameter is noticed; no process group) and gives the same product; the
    caller checks finiteness. None: take `product`.
    """
    cached = obj._graph_cache
    if cached is None or obj.process_group is not None or not cached[1]:
        return None
    store = cached[1]
    if not isinstance(store[0][0], ColumnProduct):
        return None
    backend = prefer_double_backward(backend, kernel.name, obj.device)
    if cached[0] != _cache_key(obj, kernel, backend):
        return None
    out: Tensor | None = None
    count = 0
    v = v.to(obj.dtype)  # products in the model's dtype, sums in the accumulation dtype
    # `into` adds into the leaves' .grad, which must have the model's dtype
    direct = obj.accum_dtype == obj.dtype
    with full_precision():  # the caller's autocast never reaches the sums
        for apply, n in store:
            w = obj._weight(n)
            if out is None and direct and apply.flat is None and apply.into is not None and w == 1:
                # the first batch at weight 1 writes straight into the result (one vector)
                out = torch.zeros_like(v)
                apply.into(_views(obj, v), out)
                count += n
                continue
            flat = apply.flat(v) if apply.flat is not None else _single(obj, apply, v)
            if flat is not None:
                if out is None:
                    out = flat.to(obj.accum_dtype)  # flat is this product's own tensor
                    out = out if w == 1.0 else out.mul_(w)
                else:
                    out.add_(flat, alpha=w)
            count += n
    if out is None:
        out = torch.zeros(obj.numel, dtype=obj.accum_dtype, device=obj.device)
    return obj._finish([out], count, kernel.what, check=False)[0]


def _views(obj: Objective, v: Tensor) -> list[Tensor]:
    """Per-parameter views of the flat ``v``."""
    return [piece.view(t.shape) for piece, t in zip(v.split(obj.sizes), obj.params.values(),
                                                        strict=True)]  # fmt: skip


def _single(obj: Objective, apply: ColumnProduct, v: Tensor) -> Tensor | None:
    """`ColumnProduct.single` on per-parameter views of ``v``, flattened (None: zero)."""
    grads = apply.single(_views(obj, v))
    return None if grads is None else torch.cat([g.reshape(-1) for g in grads])


def kept_gradient(obj: Objective, kernel: Kernel, backend: str) -> Tensor | None:
    """The flat dataset gradient read off the kept double-backward graphs, built if needed.

    The ``create_graph`` backward that builds a kept graph computes the batch gradient on
    the way, so with the graphs kept (or about to be) the gradient costs nothing extra.
    None where no graph would be kept for ``backend`` (then a gradient is a pass of its own).
    """
    backend = prefer_double_backward(backend, kernel.name, obj.device)
    if backend != "autograd" or not _may_keep(obj, True, None, backend):
        return None
    kernel = route_kernel(obj, kernel, "HessianOperator")
    obj.check_second_order("HessianOperator")
    key = _cache_key(obj, kernel, backend)
    kept = _kept(obj, key)
    out = torch.zeros(obj.numel, dtype=obj.accum_dtype, device=obj.device)
    count = 0
    with nullcontext() if kept else obj.state(), full_precision():
        # () marks graphs too large to keep: build them one by one for their gradients
        batches = kept or _build(obj, kernel, None if kept == () else key, obj._others(),
                                 obj.params, backend, "rev")  # fmt: skip
        for apply, n in batches:
            gradient = apply.gradient if isinstance(apply, ColumnProduct) else None
            if gradient is None:
                return None
            w, offset = obj._weight(n), 0
            for g in gradient:  # piece by piece: no concatenated copy beside ``out``
                out[offset : offset + g.numel()].add_(g.reshape(-1), alpha=w)
                offset += g.numel()
            count += n
            del apply
    return obj._finish([out], count, "gradient")[0]


#: Most bytes the kept gradient graphs of all batches may hold (tensors saved for the
#: backward passes, counted while the graphs are built); above it nothing is kept.
GRAPH_CACHE_BYTES = 1 << 30


def _may_keep(
    obj: Objective, cache: bool | str, params: Mapping[str, Tensor] | None, backend: str
) -> bool:
    """Whether graphs may be kept (at the base point; see `_build`).

    For several batches (or micro-batches) only when every pass sees the same function
    (BatchNorm on running statistics, no dropout). ``cache="auto"`` (the operators'
    default) keeps them where ``True`` would, except with dropout (whose every product
    draws new masks). The objective's ``graphs`` option overrules: ``"recompute"`` keeps
    nothing, ``"auto"`` no micro-batch's graph.
    """
    if not cache or params is not None or (cache == "auto" and obj.dropout):
        return False
    if obj.graphs == "recompute" or (obj.graphs == "auto" and obj.micro_batch_size is not None):
        return False
    # torch.func refuses the hooks that measure a graph's memory: one batch only
    several = backend == "autograd" and obj.bn == "eval" and not obj.dropout
    return _one_batch(obj) or several


def _one_batch(obj: Objective) -> bool:
    """Whether every pass is one batch, evaluated whole (not split into micro-batches)."""
    return obj.single_batch and obj.micro_batch_size is None


def _kept(obj: Objective, key: tuple[Any, ...] | None) -> Any:
    """The kept ``(apply, num_samples)`` of every batch while ``key`` still matches.

    ``()`` when they were too large to keep, None when nothing is kept for ``key``.
    """
    cached = obj._graph_cache
    if key is None or cached is None or cached[0] != key:
        return None
    return cached[1]


def _unpack(t: Tensor) -> Tensor:
    return t


def _build(
    obj: Objective,
    kernel: Kernel,
    key: tuple[Any, ...] | None,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    backend: str,
    mode: str,
) -> Iterator[tuple[BatchProduct, int]]:
    """Yield every batch's ``apply``; with a ``key``, keep them (memory permitting).

    A kept graph is built reverse-over-reverse (for ``backend="func"`` its ``vjp`` closure
    holds the graph; one batch only). For several batches the bytes autograd saves are
    counted while the graphs are built; above `GRAPH_CACHE_BYTES` they are dropped and the
    objective remembers not to keep them for this ``key``. While the objective's
    `~sharpgen.curvature._columns.ColumnPlan` is undecided, the first batch's saved bytes
    size its batched backward (double backward only: ``torch.func`` refuses the hooks).
    """
    if key is not None:
        obj._graph_cache = None  # free old graphs before building new ones
    store: list[tuple[BatchProduct, int]] | None = [] if key is not None else None
    counter = SavedBytes(held_tensors(obj))
    plan = column_plan(obj, kernel.name)
    # the saved bytes size the batched backward of an undecided plan (first batch only)
    measure = backend == "autograd" and probes(plan, obj.device)
    for inputs, targets in obj._iter():
        n = num_samples(inputs)
        keep = store is not None
        # a kept double-backward graph is counted (its bytes are the memory plan's G)
        count = measure or (keep and backend == "autograd")
        before = counter.new_bytes
        with saved_tensors_hooks(counter.pack, _unpack) if count else nullcontext():
            apply = kernel.build(obj, others, p, inputs, targets, backend=backend,
                                 mode="rev" if keep else mode, keep=keep)  # fmt: skip
        if measure:
            plan.column_bytes, measure = max(2 * counter.bytes, 1), False
        if count and isinstance(apply, ColumnProduct):
            if apply.forward_saved is not None:  # built on the validation's forward
                counter.absorb(apply.forward_saved)
            apply.account(counter, counter.new_bytes - before)
        if store is not None:
            store.append((apply, n))
            if not _one_batch(obj) and counter.bytes > GRAPH_CACHE_BYTES:
                store = None
        yield apply, n
        del apply  # else this frame holds the batch's graph while the next one is built
    if key is not None:
        obj._graph_cache = (key, store if store is not None else ())


def kept_graph_bytes(obj: Objective) -> int | None:
    """Bytes the kept gradient graphs hold beyond the model (None: none kept or not counted).

    Counted while they were built (`~sharpgen.curvature._columns.SavedBytes`): the
    tensors the forward and the gradient's backward saved, less the model's own
    parameters and buffers, plus the gradient the graph ends in.
    """
    cached = obj._graph_cache
    if cached is None or not cached[1]:
        return None
    applies = [apply for apply, _ in cached[1]]
    if not all(isinstance(a, ColumnProduct) and a.graph_bytes for a in applies):
        return None
    return sum(a.graph_bytes for a in applies)


def build_kept(obj: Objective, kernel: Kernel, backend: str) -> int | None:
    """Build the kept graphs now if they are to be kept and are not yet; their bytes.

    For a measure that plans its memory before its first product: the same graphs the
    first product would build (`kept_graph_bytes` of them; None where nothing is kept).
    """
    backend = prefer_double_backward(backend, kernel.name, obj.device)
    if backend != "autograd" or not _may_keep(obj, True, None, backend):
        return None
    kernel = route_kernel(obj, kernel, "HessianOperator")
    obj.check_second_order("HessianOperator")
    key = _cache_key(obj, kernel, backend)
    if _kept(obj, key) is None:
        with obj.state():
            for _ in _build(obj, kernel, key, obj._others(), obj.params, backend, "rev"):
                pass
    return kept_graph_bytes(obj)


def release_gradients(obj: Objective) -> int:
    """Free the gradient values at the ends of the kept graphs (`ColumnProduct.release_gradient`).

    Returns the bytes freed. Products through the graphs are unchanged; the gradient is
    then a pass of its own (`kept_gradient` returns None).
    """
    cached = obj._graph_cache
    if cached is None or not cached[1]:
        return 0
    return sum(a.release_gradient() for a, _ in cached[1] if isinstance(a, ColumnProduct))


def _cache_key(obj: Objective, kernel: Kernel, backend: str) -> tuple[Any, ...]:
    """What a kept graph depends on (see `sharpgen.curvature._graph_key.graph_key`)."""
    return graph_key(obj, kernel.name, backend)
