r"""Evaluate the loss (and a metric) at many parameter points in vectorized chunks.

The points are $\theta + \sum_k c_{mk} d_k$ for a coefficient matrix $C$ (``(M, K)``) and
$K$ directions. Chunks of points go through ``torch.func.vmap`` over
``torch.func.functional_call``: the model is never written to, and one forward pass per
chunk and batch evaluates every point of the chunk. The data is visited once; every chunk
is evaluated on each batch and the batch values are combined with the objective's weights
(sample-weighted mean, or sum), so any batching gives the full-data value.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sharpgen._precision import upcast_outputs
from sharpgen.curvature import ModelObjective, dataset_reduce
from sharpgen.curvature._data import num_samples
from sharpgen.landscape._fastseq import FastPoints, compile_rest, is_plain_sequential
from sharpgen.sharpness._common import progress_bar

__all__ = ["DEFAULT_MEMORY", "evaluate_points", "points_per_chunk"]

DEFAULT_MEMORY = 256 * 2**20  # bytes per chunk of points (parameters + activations)
FAST_CHUNK = 64  # points per progress-bar update on the point-by-point fast path


def _call(model: nn.Module, full: dict[str, Tensor], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return functional_call(model, full, (), dict(inputs))
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, full, tuple(inputs))
    return functional_call(model, full, (inputs,))


def _activation_numel(obj: ModelObjective) -> int:
    """Elements of every module output in one forward pass on the first batch."""
    total = [0]

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            total[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in obj.model.modules()]
    try:
        with obj.state(), obj.precision(), torch.no_grad():
            inputs, _ = next(iter(obj.batches()))
            others = {n: p.detach() for n, p in obj.model.named_parameters()}
            _call(obj.model, {**others, **obj.params}, inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def points_per_chunk(obj: ModelObjective, memory: int) -> int:
    """How many parameter points fit into ``memory`` bytes (at least 1).

    Per point: the perturbed parameters plus twice the activations of one forward pass on
    the first batch (inputs and outputs of every layer, roughly).
    """
    per_point = (obj.numel + 2 * _activation_numel(obj)) * (torch.finfo(obj.dtype).bits // 8)
    return max(1, int(memory // max(per_point, 1)))


def _affine_split(model: nn.Module, buffers: Any) -> tuple[str, nn.Module, nn.Module] | None:
    r"""``(name, first, rest)`` when ``model`` is a plain Sequential starting with an affine layer.

    The first layer of a Sequential is then affine in its parameters given the inputs,
    $f(x; W_0 + \sum_k c_k D_k) = f(x; W_0) + \sum_k c_k f(x; D_k)$ (bias included in
    $D_k$), so its output at every grid point is a combination of $K + 1$ outputs computed
    once per batch, and only the rest of the network runs per point. Running the layers
    one by one is ``model(x)`` only for a plain Sequential (`is_plain_sequential`: its own
    class, no hooks, no layer used twice, no shared parameters); any other model is None.
    """
    if not is_plain_sequential(model) or len(model) < 2 or buffers:
        return None
    name, first = next(iter(model.named_children()))
    affine = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if type(first) not in affine:
        return None
    if isinstance(first, nn.modules.conv._ConvNd) and first.padding_mode != "zeros":
        return None
    return name, first, model[1:]


class _Evaluator:
    """Loss (and metric) of one batch at a chunk of points; vmap over the chunk."""

    def __init__(
        self,
        obj: ModelObjective,
        others: dict[str, Tensor],
        theta: dict[str, Tensor],
        D: dict[str, Tensor],
        inputs: Any,
        targets: Any,
        metric: Callable[[Any, Any], Tensor] | None,
        split: tuple[str, nn.Module, nn.Module] | None,
        vmap_ok: list[bool] | None = None,
    ) -> None:
        self.vmap_ok = [True] if vmap_ok is None else vmap_ok  # shared by the batches
        self.obj, self.theta, self.D, self.targets, self.metric = obj, theta, D, targets, metric
        self.others = others
        self.inputs = inputs
        self.split = split if isinstance(inputs, Tensor) else None
        self.head: Tensor | None = None
        self.fast: FastPoints | None = None
        if self.split is not None:
            prefix, first, _ = self.split
            local = {n.split(".", 1)[1]: n for n, _ in first.named_parameters(prefix=prefix)}
            base = {k: theta[n] if n in theta else others[n] for k, n in local.items()}
            self.head = functional_call(first, base, (inputs,))
            k = next(iter(D.values())).shape[0]
            moved = [n for n in local.values() if n in theta]
            steps = [
                functional_call(first, {m: D[n][j] for m, n in local.items()}, (inputs,))
                if moved else torch.zeros_like(self.head)
                for j in range(k)
            ]  # fmt: skip
            self.steps = torch.stack(steps)  # (K, *head.shape)
            self.names = [n for n in theta if n not in local.values()]
            self.others = {n: t for n, t in others.items() if n not in local.values()}
            self._compile(theta, others, D)
        else:
            self.names = list(theta)
        self.batched = torch.func.vmap(self._one)

    def _compile(self, theta: dict[str, Tensor], others: dict[str, Tensor],
                 D: dict[str, Tensor]) -> None:  # fmt: skip
        """The point-by-point fast path of `_fastseq` when every later layer allows it.

        CPU only: it was measured there (forward passes are the cost, batching points does
        not pay); on an accelerator a small model is launch-bound and the batched ``vmap``
        path, whose chunk size is tuned, is kept.
        """
        assert self.split is not None and self.head is not None
        if self.head.device.type != "cpu":
            return
        steps = compile_rest(self.split[2], "", self.head, {**others, **theta})
        if steps is not None:
            self.fast = FastPoints(steps, theta, others, D, self.head, self.steps, self._loss)

    def _loss(self, out: Any) -> Any:
        if self.obj._loss_upcast:  # the objective's float32 loss of low-precision outputs
            out = upcast_outputs(out)
        loss = self.obj.loss_fn(out, self.targets).reshape(())
        if self.metric is None:
            return (loss,)
        return loss, torch.as_tensor(self.metric(out, self.targets)).reshape(()).to(loss.dtype)

    def _one(self, p: dict[str, Tensor], h: Any) -> Any:
        if self.split is not None:
            rest = self.split[2]
            out = functional_call(rest, {**self.others, **p}, (h,))
        else:
            out = _call(self.obj.model, {**self.others, **p}, self.inputs)
        return self._loss(out)

    def __call__(self, c: Tensor, buffers: Any) -> Any:
        if self.fast is not None and not buffers:
            return self.fast(c)
        pts = {n: self.theta[n].unsqueeze(0) + torch.tensordot(c, self.D[n], dims=([1], [0]))
               for n in self.names}  # fmt: skip
        for name, (base, delta) in (buffers or {}).items():
            shape = (-1,) + (1,) * base.ndim
            pts[name] = base.unsqueeze(0) + c[:, 0].reshape(shape).to(base.dtype) * delta
        h = None
        if self.head is not None:
            h = self.head.unsqueeze(0) + torch.tensordot(c, self.steps, dims=([1], [0]))
        if c.shape[0] == 1 or not self.vmap_ok[0]:  # no vmap: plain functional calls
            rows = [self._one({k: t[i] for k, t in pts.items()}, None if h is None else h[i])
                    for i in range(c.shape[0])]  # fmt: skip
            return [torch.stack(v) for v in zip(*rows, strict=True)]
        try:
            if h is None:
                return torch.func.vmap(self._one, in_dims=(0, None))(pts, None)
            return self.batched(pts, h)
        except RuntimeError as exc:  # torch.func cannot trace the model: point by point
            self.vmap_ok[0] = False
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            warnings.warn(
                f"landscape: torch.func.vmap could not trace the model ({type(exc).__name__}: "
                f"{first}); the grid points are evaluated one at a time (same values, slower).",
                RuntimeWarning,
                stacklevel=2,
            )
            return self(c, buffers)


class _Plan:
    """Chunk boundaries: fixed, or tuned by timing growing chunks on the first batch.

    Tuning evaluates chunks of 1, 4, 16, ... points (at most an eighth of the grid and
    ``max_chunk``) and stops growing once a size is 20% slower per point than the best so
    far; the fastest size is used for the rest. Every timed chunk is a real grid chunk.
    """

    def __init__(self, total: int, chunk_size: int | None, max_chunk: int) -> None:
        self.total, self.fixed = total, chunk_size
        cap = max(1, min(max_chunk, total // 8))
        self.trials: list[int] = []
        size = 1
        while size <= cap and chunk_size is None:
            self.trials.append(size)
            size *= 4
        self.timings: dict[int, float] = {}
        self.frozen: list[tuple[int, int]] | None = None

    def _best(self) -> int:
        return min(self.timings, key=self.timings.__getitem__) if self.timings else 1

    def _next_trial(self, trials: list[int]) -> int | None:
        if not trials:
            return None
        if self.timings:
            last = max(self.timings)
            if self.timings[last] > 1.2 * self.timings[self._best()]:
                trials.clear()  # growing further only gets slower
                return None
        return trials.pop(0)

    def chunks(self) -> Any:
        if self.frozen is not None:
            yield from self.frozen
            return
        done: list[tuple[int, int]] = []
        start = 0
        trials = list(self.trials)
        while start < self.total:
            trial = None if self.fixed is not None else self._next_trial(trials)
            size = self.fixed or trial or self._best()
            stop = min(self.total, start + size)
            done.append((start, stop))
            yield start, stop
            start = stop
        self.frozen = done

    def record(self, size: int, seconds: float) -> None:
        if self.fixed is None and size in self.trials and size not in self.timings:
            self.timings[size] = seconds / size


def evaluate_points(
    obj: ModelObjective,
    directions: list[dict[str, Tensor]],
    coefficients: Tensor,
    *,
    metric: Callable[[Any, Any], Tensor] | None = None,
    chunk_size: int | None,
    max_chunk: int = 1024,
    progress: bool = False,
    desc: str = "landscape",
    buffers: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""Loss (and metric) at $\theta + \sum_k C_{mk} d_k$ for every row $m$ of ``coefficients``.

    Args:
        obj: The objective (its base point $\theta$, data, state policy and reduction).
        directions: ``K`` dicts shaped like ``obj.params``.
        coefficients: ``(M, K)`` tensor.
        metric: ``metric(outputs, targets)`` returning a scalar per batch, combined over
            batches like the loss; or None.
        chunk_size: Points per vectorized forward pass (a model ``torch.func.vmap`` cannot
            trace, e.g. with a classic ``autograd.Function``, is evaluated point by point
            after a `RuntimeWarning`), or None: tuned on the first
            batch (chunks of 1, 4, 16, ... points up to ``max_chunk`` are timed while they
            are evaluated; the fastest per point is used for the rest). One point is a
            plain ``functional_call`` without ``vmap``.
        max_chunk: Largest chunk the tuning tries (memory bound, see `points_per_chunk`).
        progress: A tqdm bar over chunk-batch evaluations.
        desc: Label of the bar.
        buffers: Name -> ``(base, delta)`` of buffers moved along the first coefficient
            (``base + C[m, 0] * delta``), for interpolating BatchNorm statistics.

    Returns:
        ``(loss, metric)``: float64 CPU tensors of shape ``(M,)`` (metric None if not asked).

    Raises:
        FloatingPointError: Never; non-finite values are returned as they are (a landscape
            may leave the region where the loss is finite).
    """
    theta = obj.params
    C = coefficients.to(dtype=obj.dtype, device=obj.device)
    M = C.shape[0]
    D = {n: torch.stack([d[n] for d in directions]) for n in theta}  # (K, *shape)
    acc = obj.accum_dtype  # float32 sums for a bfloat16/float16 model
    loss_acc = torch.zeros(M, dtype=acc, device=obj.device)
    metric_acc = torch.zeros(M, dtype=acc, device=obj.device) if metric else None
    count = 0
    single = obj.single_batch and obj.process_group is None
    plan: _Plan | None = None
    with (
        obj.state(),
        obj.precision(),  # no graph here: the whole evaluation under the objective's autocast
        torch.no_grad(),
        progress_bar(progress, total=M if single else None, desc=desc, unit="point") as bar,
    ):
        others = {n: p.detach() for n, p in obj.model.named_parameters() if n not in theta}
        split = _affine_split(obj.model, buffers)
        vmap_ok = [True]
        for inputs, targets in obj.batches():
            n = num_samples(inputs)
            w = 1.0 if single else (float(n) if obj.reduction == "mean" else 1.0)
            ev = _Evaluator(obj, others, theta, D, inputs, targets, metric, split, vmap_ok)
            if plan is None:  # the fast path needs no tuning: no vmap, one point at a time
                fixed = FAST_CHUNK if ev.fast is not None and chunk_size is None else chunk_size
                plan = _Plan(M, fixed, max_chunk)
            for start, stop in plan.chunks():
                c = C[start:stop]
                tic = time.perf_counter()
                out = ev(c, buffers)
                plan.record(stop - start, time.perf_counter() - tic)
                loss_acc[start:stop].add_(out[0], alpha=w)
                if metric_acc is not None:
                    metric_acc[start:stop].add_(out[1], alpha=w)
                bar.update(stop - start)
            count += n
    parts = [loss_acc] if metric_acc is None else [loss_acc, metric_acc]
    if not single:
        parts, count = dataset_reduce(parts, count, obj.reduction, obj.process_group)
    cpu = [t.to(device="cpu", dtype=torch.float64) for t in parts]
    return cpu[0], (cpu[1] if len(cpu) > 1 else None)
