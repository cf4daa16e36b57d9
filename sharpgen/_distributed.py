r"""Low-level `torch.distributed` helpers shared by every layer (private).

Policy for the ``process_group`` argument of the curvature operators and the sharpness
measures (`resolve_process_group`):

* ``"auto"`` (the default everywhere): when `torch.distributed` is initialized and the group
  has more than one process, use the model's group if it is wrapped in
  `torch.nn.parallel.DistributedDataParallel`, else the default (WORLD) group; otherwise no
  communication. Every process of the group must then make the same calls (they are
  collectives). Replicated data (every rank holds the whole dataset) still gives the right
  value: the sample-weighted mean of identical means is that mean.
* ``None``: no communication; the data this process sees is the whole dataset (use this to
  measure on one rank only, e.g. under ``if rank == 0:``).
* A process group (``torch.distributed.new_group(...)``, ``dist.group.WORLD``): use it.

Collectives go through `all_reduce_`, which turns a backend failure into a `ConnectionError`
(a peer crashed or exited) or a `TimeoutError` saying which collective failed and what to
check (deliberately not a `RuntimeError`, which the curvature operators catch to fall back
from `torch.func` to double backward). The timeout
is the one of the process group (``init_process_group(timeout=...)`` /
``new_group(timeout=...)``) unless one is given explicitly.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AUTO",
    "all_reduce_",
    "average_gradients_",
    "check_generator_agrees",
    "check_ranks_agree",
    "collective_device",
    "empty_with_count_room",
    "global_means",
    "group_rank_size",
    "is_initialized",
    "reduce_partials",
    "resolve_process_group",
    "unwrap_model",
]

AUTO = "auto"
_FLOAT32_LIMB = 2048  # count limbs summed exactly in float32 for fewer than 8192 processes
_FLOAT32_LIMBS = 3  # counts up to 2048**3 (8.6e9) samples
_SAMPLE = 65536  # elements of a tensor fingerprinted by the agreement check


def is_initialized() -> bool:
    """Whether `torch.distributed` is available and a default group is initialized."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def unwrap_model(model: Any) -> Any:
    """The module inside `DistributedDataParallel` / `DataParallel` wrappers (else ``model``).

    Functional calls (`torch.func.functional_call`) must go to the wrapped module: the
    wrapper's forward adds gradient-synchronization hooks and buffer broadcasts, and its
    parameter names carry a ``module.`` prefix.
    """
    wrappers: tuple[type, ...] = (nn.DataParallel,)
    try:
        from torch.nn.parallel import DistributedDataParallel

        wrappers = (*wrappers, DistributedDataParallel)
    except ImportError:  # torch built without distributed support
        pass
    while isinstance(model, wrappers):
        model = getattr(model, "module")  # noqa: B009 - typed as a Module attribute
    return model


def _ddp_group(model: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.process_group
    return None


def resolve_process_group(process_group: Any = AUTO, model: Any = None) -> Any:
    """Resolve a ``process_group`` argument to a group or ``None`` (no communication).

    Args:
        process_group: ``"auto"``, ``None`` or a `torch.distributed` process group (see the
            module docstring for the policy).
        model: The model, whose `DistributedDataParallel` group ``"auto"`` prefers.

    Returns:
        A process group with more than one process, or ``None``.

    Raises:
        TypeError: ``process_group`` is none of the accepted kinds.
        ValueError: a process group is given but `torch.distributed` is not initialized.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != AUTO:
            raise ValueError(
                f"process_group must be 'auto', None or a torch.distributed process group, got "
                f"the string {process_group!r}."
            )
        if not is_initialized():
            return None
        import torch.distributed as dist

        group = _ddp_group(model) if model is not None else None
        if group is None:
            group = dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be 'auto' (use the initialized default group, if any), None "
            "(no communication) or a torch.distributed.ProcessGroup such as "
            f"torch.distributed.group.WORLD, got {type(process_group).__name__}."
        )
    if not dist.is_initialized():
        raise ValueError(
            "a process group was passed but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) first, or pass process_group=None."
        )
    return process_group


def group_rank_size(group: Any) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size."""
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def collective_device(group: Any, hint: torch.device | None = None) -> torch.device:
    """Device for small bookkeeping tensors: the current CUDA device for NCCL, else ``hint``/CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return hint if hint is not None else torch.device("cpu")


def _failure(what: str, group: Any, exc: BaseException) -> OSError:
    """The error raised when a collective fails: `TimeoutError` or `ConnectionError`.

    Deliberately not a `RuntimeError`, so that code catching backend errors of `torch.func`
    (to fall back to another backend) does not retry a broken collective.
    """
    try:
        rank, size = group_rank_size(group)
        where = f"rank {rank} of {size}"
    except Exception:  # the group itself may be broken
        where = "this rank"
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    timed_out = "timed out" in text.lower() or "timeout" in text.lower()
    cls = TimeoutError if timed_out else ConnectionError
    return cls(
        f"sharpgen: the collective for {what} failed on {where}: {first}. Another process of "
        "the group probably raised (see its traceback), exited, or did not make the same call "
        "(every rank must call the measure with the same arguments; to measure on this rank "
        "alone pass process_group=None). The timeout is the process group's "
        "(init_process_group(timeout=...) or new_group(timeout=...))."
    )


def all_reduce_(
    tensor: Tensor, group: Any, *, what: str, timeout: timedelta | None = None, op: Any = None
) -> Tensor:
    """Sum ``tensor`` over ``group`` in place; a failure or timeout raises a clear error.

    Args:
        tensor: The tensor to sum (in place).
        group: The process group.
        what: What is being reduced, for the error message.
        timeout: Wait at most this long (default: the group's timeout).
        op: A `torch.distributed.ReduceOp` other than the sum (e.g. ``ReduceOp.MAX``).

    Returns:
        ``tensor``.

    Raises:
        TimeoutError: The collective timed out (a peer is alive but not calling).
        ConnectionError: The collective failed (a peer crashed or exited).
    """
    import torch.distributed as dist

    try:
        op = dist.ReduceOp.SUM if op is None else op
        work = dist.all_reduce(tensor, op=op, group=group, async_op=True)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=timeout)
    except RuntimeError as exc:
        raise _failure(what, group, exc) from exc
    return tensor


def _all_gather(tensor: Tensor, group: Any, *, what: str) -> list[Tensor]:
    import torch.distributed as dist

    _, size = group_rank_size(group)
    out = [torch.empty_like(tensor) for _ in range(size)]
    try:
        dist.all_gather(out, tensor, group=group)
    except RuntimeError as exc:
        raise _failure(what, group, exc) from exc
    return out


# -- one all-reduce per dataset quantity ---------------------------------------------------------
def _count_parts(count: int, dtype: torch.dtype) -> list[float] | None:
    """The count as numbers whose sum over processes is exact in ``dtype`` (None: not possible)."""
    if dtype == torch.float64:
        return [float(count)]
    if dtype == torch.float32:
        parts = []
        for _ in range(_FLOAT32_LIMBS):
            parts.append(float(count % _FLOAT32_LIMB))
            count //= _FLOAT32_LIMB
        if count:
            return None
        return parts
    return None


def _join_count(parts: Tensor) -> int:
    values = [round(float(v)) for v in parts.tolist()]
    if len(values) == 1:
        return values[0]
    return sum(v * _FLOAT32_LIMB**i for i, v in enumerate(values))


def empty_with_count_room(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """An empty tensor with room after it for the count (see `reduce_partials`)."""
    numel = math.prod(shape)
    return torch.empty(numel + _FLOAT32_LIMBS, dtype=dtype, device=device)[:numel].view(shape)


def _in_place(partials: Sequence[Tensor], tail: int) -> Tensor | None:
    """The partial and its count room as one flat tensor (see `empty_with_count_room`)."""
    p = partials[0] if len(partials) == 1 else None
    if p is None or not p.is_contiguous() or p.storage_offset() != 0 or tail > _FLOAT32_LIMBS:
        return None
    storage = p.untyped_storage()
    if storage.nbytes() != (p.numel() + _FLOAT32_LIMBS) * p.element_size():
        return None
    return torch.empty(0, dtype=p.dtype, device=p.device).set_(
        storage, 0, (p.numel() + tail,), (1,)
    )


def reduce_partials(
    partials: Sequence[Tensor], count: int, group: Any, *, what: str = "dataset sums"
) -> tuple[list[Tensor], int]:
    r"""Sum per-process partial sums and the sample count over ``group`` in ONE all-reduce.

    The partial sums are flattened into one buffer (in their promoted dtype) and the count is
    appended to it: as one number in float64, as three base-2048 limbs in float32 (exact for
    fewer than 8192 processes and $8.6 \cdot 10^9$ samples). In half precision the count goes
    through a second, integer all-reduce. A single partial made by `empty_with_count_room`
    is reduced in place (the count in the room after it), without the concatenated copy.

    Args:
        partials: Tensors on one device (may be empty).
        count: Number of samples this process visited.
        group: The process group.
        what: What is being reduced, for error messages.

    Returns:
        The summed tensors (same shapes) and the total count.
    """
    if partials:
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in partials])
        device = partials[0].device
    else:
        dtype, device = torch.float64, collective_device(group)
    parts = _count_parts(count, dtype)
    if parts is None:  # low precision: an exact integer all-reduce for the count
        counts = torch.tensor([count], dtype=torch.int64, device=collective_device(group, device))
        all_reduce_(counts, group, what=f"the sample count of {what}")
        out = []
        if partials:
            flat = _in_place(partials, 0)
            if flat is None:
                flat = torch.cat([p.reshape(-1).to(dtype) for p in partials])
            all_reduce_(flat, group, what=what)
            out = _split(flat, partials)
        return out, int(counts.item())
    tail = torch.tensor(parts, dtype=dtype, device=device)
    flat = _in_place(partials, len(parts))
    if flat is not None:
        flat[-len(parts) :] = tail
    else:
        flat = torch.cat([*(p.reshape(-1).to(dtype) for p in partials), tail])
    all_reduce_(flat, group, what=what)
    n = flat.numel() - tail.numel()
    return _split(flat[:n], partials), _join_count(flat[n:])


def global_means(values: Sequence[Tensor], group: Any, *, what: str) -> list[float]:
    """Means over the entries of all ranks of 1-d tensors (equal lengths on one rank).

    One all-reduce of the local sums and the local length; used for per-chunk statistics
    (m-sharpness), where ranks may hold different numbers of chunks.
    """
    length = int(values[0].numel())
    sums = torch.stack([v.to(torch.float64).sum().cpu() for v in values])
    (total,), count = reduce_partials([sums.to(collective_device(group))], length, group, what=what)
    return [float(t) / count for t in total.cpu()]


def _split(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for p in like:
        out.append(flat[offset : offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()
    return out


# -- agreement checks ----------------------------------------------------------------------------
def _fingerprint(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int) and abs(value) < 2**53:
        return float(value)
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, Tensor):
        flat = value.detach().reshape(-1)
        if flat.numel() > _SAMPLE:  # a strided sample keeps the check cheap for big blocks
            flat = flat[:: flat.numel() // _SAMPLE]
        data = flat.to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        return float(zlib.crc32(data))
    return float(zlib.crc32(repr(value).encode()))


def check_ranks_agree(group: Any, values: Mapping[str, Any], *, where: str) -> None:
    """Raise `ValueError` on every rank unless all ranks of ``group`` passed equal ``values``.

    One small all-gather; numbers are compared exactly, other values (strings, tensors) by a
    CRC32 fingerprint. Every rank raises the same error, so none is left waiting.

    Args:
        group: The process group.
        values: Name -> value (int, float, str, tensor, anything with a stable ``repr``).
        where: The function or object being checked, for the message.

    Raises:
        ValueError: Some rank passed a different value; the message lists the values per rank.
    """
    names = list(values)
    local = torch.tensor(
        [_fingerprint(values[n]) for n in names],
        dtype=torch.float64,
        device=collective_device(group),
    )
    gathered = _all_gather(local, group, what=f"the consistency check of {where}")
    table = torch.stack(gathered).cpu()
    rank, _ = group_rank_size(group)
    for j, name in enumerate(names):
        column = table[:, j]
        if not bool((column == column[0]).all()):
            shown = values[name]
            per_rank = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(column.tolist()))
            raise ValueError(
                f"{where}: the processes of the group disagree on {name} (this is rank {rank} "
                f"with {shown!r}; per rank: {per_rank}). Every rank must pass the same model "
                "architecture, parameter selection, options and generator seed; only the data "
                "differs between ranks."
            )


def _rng_state(generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is not None:
        return generator.get_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def check_generator_agrees(
    generator: torch.Generator | None, group: Any, device: torch.device, *, where: str
) -> None:
    """Check that every rank will draw the same random numbers (same generator state).

    Without a generator the global RNG of ``device`` is compared (read, not advanced).

    Raises:
        ValueError: The states differ; pass ``generator=torch.Generator().manual_seed(s)``
            with the same ``s`` on every rank.
    """
    state = _rng_state(generator, device)
    source = "generator" if generator is not None else "global random state (generator=None)"
    try:
        check_ranks_agree(group, {f"the {source}": state}, where=where)
    except ValueError as exc:
        raise ValueError(
            f"{exc} Random probes must be identical on every rank: pass "
            "generator=torch.Generator().manual_seed(seed) with the same seed everywhere."
        ) from None


# -- gradients (SAM under DDP) -------------------------------------------------------------------
@torch.no_grad()
def average_gradients_(params: Iterable[Tensor], group: Any, *, what: str = "gradients") -> None:
    """Average ``.grad`` over ``group`` in one bucketed all-reduce per (dtype, device).

    Gradients are flattened into one buffer together with a has-gradient flag per
    parameter, so a parameter with ``grad=None`` on some ranks is handled (zeros there) and
    one that has no gradient on any rank keeps ``grad=None``. The result is the mean over
    the processes, as `DistributedDataParallel` computes it.
    """
    params = [p for p in params if p.requires_grad]
    _, size = group_rank_size(group)
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        buckets.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), ps in buckets.items():
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
        flags = torch.tensor([float(p.grad is not None) for p in ps], dtype=dtype, device=device)
        flat = torch.cat([*pieces, flags])
        all_reduce_(flat, group, what=what)
        offset = 0
        had = flat[-len(ps) :].tolist()
        for p, flag in zip(ps, had, strict=True):
            g = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if flag > 0:
                g = g.div(size)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
