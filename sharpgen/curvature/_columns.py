r"""How the ``k`` columns of a block go through one batch's double-backward graph.

A block product $K_b [v_1, \dots, v_k]$ on a gradient graph (``backend="autograd"``) is
either a *loop* of ``k`` backward passes or *batched* backward passes, each taking a chunk
of columns at once (``torch.autograd.grad(..., is_grads_batched=True)``, a ``vmap`` over
the backward). Both give the same products to float rounding. Which is faster depends on
the model and the machine: on the CPU benchmark (``benchmarks/bench_kernels.py``) the loop
was faster on a small conv net (a batched convolution backward-of-backward costs 2x per
column) and the two were within noise on a small MLP, while a batched backward holds every
column of its chunk at once (8-40x the loop's memory there).

On a CPU the columns therefore loop (`PROBE_ON_CPU` is off): the rule the benchmark
supports, and it keeps products bit-for-bit reproducible from one objective (and run) to the
next. On accelerators, where a batched backward saves a kernel launch per column and per
op, the choice is measured, once per objective and kernel: the first block of at least
`PROBE_COLUMNS` columns takes two columns by the loop and one chunk batched, timing both
(the probe's products are part of the block's result), and the faster per column is kept,
the batched one only when it is at least `1 / MARGIN` times faster (the two paths agree to
float rounding, not bit for bit, so which one ran can change the last bits of a product).
The probe times the wall clock after synchronizing on CUDA (other accelerators: the wall
clock; not measured here, no accelerator was available) and, with `PROBE_ON_CPU`, the
process's CPU time, which a loaded machine disturbs less than the wall clock.

A chunk holds at most `BATCHED_BYTES` of estimated extra memory: one column of a batched
backward is estimated at twice the bytes the batch's graph saves (measured while it is
built; a column took about 1.0-1.3x those bytes in the benchmark), so a model whose graph
saves more than half of `BATCHED_BYTES` always loops.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "BATCHED_BYTES",
    "MARGIN",
    "PROBE_COLUMNS",
    "PROBE_ON_CPU",
    "ColumnPlan",
    "PlanOwner",
    "SavedBytes",
    "column_plan",
    "held_tensors",
    "probes",
    "take_columns",
]

#: Most bytes of estimated extra memory one batched backward may take (sets its chunk).
BATCHED_BYTES = 1 << 27
#: Smallest block that is probed (narrower blocks loop until a wide one decides).
PROBE_COLUMNS = 8
#: The batched backward is kept only when its time per column is below MARGIN x the loop's.
MARGIN = 0.9
#: Probe on the CPU too (off: the CPU loops, see the module note).
PROBE_ON_CPU = False

#: ``column(v, retain, batched) -> products``: one column (``v`` entries shaped like the
#: parameters) or a chunk (``batched=True``, entries ``(m, *shape)``) through the graph.
Column = Callable[[list[Tensor], bool, bool], list[Tensor]]


@dataclass
class ColumnPlan:
    """The measured choice for one objective and kernel (see the module note).

    Attributes:
        choice: ``None`` until a block is probed, then ``"loop"`` or ``"batched"``.
        column_bytes: Estimated extra bytes of one more column in a batched backward (0:
            not measured yet).
        loop_seconds: The probe's time per column of the loop.
        batched_seconds: The probe's time per column of the batched backward.
    """

    choice: str | None = None
    column_bytes: int = 0
    loop_seconds: float | None = None
    batched_seconds: float | None = None

    def chunk(self, k: int) -> int:
        """Columns per batched backward: as many as `BATCHED_BYTES` allows, at most ``k``."""
        if self.column_bytes <= 0:
            return 1
        return max(1, min(k, BATCHED_BYTES // self.column_bytes))


def probes(plan: ColumnPlan, device: torch.device) -> bool:
    """Whether ``plan`` is still to be probed on ``device`` (its graphs' bytes are needed)."""
    return plan.choice is None and (device.type != "cpu" or PROBE_ON_CPU)


class PlanOwner(Protocol):
    """What holds the plans: an objective (`sharpgen.curvature._interface`)."""

    @property
    def _column_plans(self) -> dict[str, ColumnPlan]: ...


def column_plan(owner: PlanOwner, kernel: str) -> ColumnPlan:
    """The `ColumnPlan` of ``owner`` (an objective) for the kernel named ``kernel``."""
    return owner._column_plans.setdefault(kernel, ColumnPlan())


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves while a graph is built.

    Use ``pack`` as the pack hook of ``torch.autograd.graph.saved_tensors_hooks``.
    ``bytes`` counts every saved storage; ``new_bytes`` only those not among the storages
    of ``held`` (the model's parameters and buffers: saved by the graph, but held by the
    process anyway), which is what keeping the graph adds to the process's memory.

    ``pack`` returns the tensor detached: a saved *output* returned as it is would hold
    its own ``grad_fn``, a cycle through C++ that no garbage collection frees (a graph
    built and never backpropagated without ``retain_graph``, as a kept graph is, then
    outlived `ModelObjective.clear_cache`); autograd restores the ``grad_fn`` on unpack,
    so detaching loses nothing (the ``saved_tensors_hooks`` notes of PyTorch).
    """

    def __init__(self, held: Iterable[Tensor] = ()) -> None:
        self.bytes = 0
        self.new_bytes = 0
        self._seen: dict[int, int] = {}
        self._held = {t.untyped_storage().data_ptr() for t in held}

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        self._add(storage.data_ptr(), storage.nbytes())
        return t.detach()

    def _add(self, ptr: int, nbytes: int) -> None:
        if ptr not in self._seen:
            self._seen[ptr] = nbytes
            self.bytes += nbytes
            if ptr not in self._held:
                self.new_bytes += nbytes

    def absorb(self, other: SavedBytes) -> None:
        """Count the storages ``other`` saw (another part of the same graph) once more here."""
        for ptr, nbytes in other._seen.items():
            self._add(ptr, nbytes)

    def saved(self, t: Tensor) -> bool:
        """Whether the storage of ``t`` was saved (seen by ``pack``) or is a held one."""
        ptr = t.untyped_storage().data_ptr()
        return ptr in self._seen or ptr in self._held


class HoldsModel(Protocol):
    """What `held_tensors` reads of an objective."""

    @property
    def params(self) -> dict[str, Tensor]: ...

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def single_batch(self) -> bool: ...

    @property
    def data(self) -> object: ...


def held_tensors(obj: HoldsModel) -> list[Tensor]:
    """What the process holds anyway: the parameters, buffers and the tensors of one batch."""
    from torch.utils._pytree import tree_leaves

    batch = tree_leaves(obj.data) if obj.single_batch else []
    return [*obj.params.values(), *obj.model.parameters(), *obj.model.buffers(),
            *(t for t in batch if isinstance(t, Tensor))]  # fmt: skip


def _clock(device: torch.device) -> float:
    """Seconds: the process's CPU time on a CPU, else the wall clock after a device sync."""
    if device.type == "cpu":
        return time.process_time()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _batched(column: Column, chunk: list[Tensor], retain: bool) -> list[Tensor] | None:
    """A batched backward, or None where ``vmap`` has no rule for an op of the graph."""
    try:
        with warnings.catch_warnings():  # the slow per-column fallback of vmap, timed anyway
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            return column(chunk, retain, True)
    except RuntimeError:
        return None


def take_columns(
    plan: ColumnPlan, V: list[Tensor], column: Column, keep: bool
) -> list[list[Tensor]]:
    """The ``k`` products of the columns of ``V`` (entries ``(k, *shape)``), by the plan.

    Undecided, a block of at least `PROBE_COLUMNS` columns is probed: columns 0-2 by the
    loop (column 0 untimed), one chunk batched, then the rest by the faster. The graph is
    freed by the last backward unless ``keep``.

    Returns:
        One list of product tensors per column (in the order of ``V``'s entries).
    """
    k = V[0].shape[0]
    out: list[list[Tensor]] = []
    device = V[0].device

    def loop(j: int) -> None:
        out.append(column([v[j] for v in V], keep or j < k - 1, False))

    def batched(j0: int, j1: int) -> bool:
        # the graph is retained: a failed batched backward must leave it for the loop
        res = _batched(column, [v[j0:j1] for v in V], True)
        if res is None:
            plan.choice = "loop"
            return False
        out.extend([r[i] for r in res] for i in range(j1 - j0))
        return True

    chunk = plan.chunk(k)
    if not probes(plan, device) or (chunk < 2 and plan.column_bytes > 0):
        plan.choice = plan.choice or "loop"  # the CPU's rule, or a chunk of one column
    if plan.choice is None and k >= PROBE_COLUMNS and chunk >= 2:
        loop(0)
        t0 = _clock(device)
        loop(1)
        loop(2)
        t1 = _clock(device)
        stop = min(k, 3 + chunk)
        if batched(3, stop):
            t2 = _clock(device)
            plan.loop_seconds = (t1 - t0) / 2
            plan.batched_seconds = (t2 - t1) / (stop - 3)
            fast = plan.batched_seconds < MARGIN * plan.loop_seconds
            plan.choice = "batched" if fast else "loop"
    j = len(out)
    while j < k:
        if plan.choice == "batched" and k - j >= 2:
            stop = min(k, j + chunk)
            if batched(j, stop):
                j = stop
                continue
        loop(j)
        j += 1
    return out
