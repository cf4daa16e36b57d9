r"""The memory plan of a measure: what it holds, as a formula, and the choices that fit a budget.

A measure asks for its plan once, before its first product, with the size of its
parameter-sized vectors and what it knows of its graphs, and follows it. With $p$ the
number of selected parameters and $b$ the bytes per number (4 in float32) a
parameter-sized vector takes $v = p\,b$ bytes, and the measure holds beyond the model

$$ \text{planned} = \max\bigl(G + P + (w + 2B)\,v,\ r\,v + h\bigr) + m_{\mathrm{mem}}\, v, $$

with $G$ the kept gradient graph (counted, see **Graph** below), $P$ what one product holds
beyond its result while it runs (see **Product** below), $w$ the working vectors
of the measure (Lanczos: the two latest basis rows, held so that a step never reads the
basis, and the product, which is orthogonalized in place and becomes the next row), $B$
the probe block width (a trace estimator holds the block and its product, $2B$), $r$ the
vectors of the result (the eigenvectors, formed after the graph is freed) and
$m_{\mathrm{mem}}$ the Lanczos basis vectors held in memory (0 when the basis is in a file).

**Budget.** ``memory_budget`` is the bytes the measure may hold beyond what the process
holds already: an int, or ``"auto"`` (default): 80% of what the device has free now
(CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of ``/proc/meminfo``), or
``None``: no limit (the defaults of `sharpgen.linalg.lanczos`).

**Several processes.** The ranks that ``torchrun`` starts on one host share its memory:
``"auto"`` divides the free memory by the processes that share the device
(``LOCAL_WORLD_SIZE``, which ``torchrun`` sets: all of them for the CPU, those per GPU
for CUDA), so two ranks on one machine do not both claim 80% of it. Over a process group
the plan's inputs are made to agree (one all-reduce: the smallest budget, the largest
graph, the smallest free disk), so every rank chooses the same basis and blocks and their
collectives stay in step.

**Lanczos basis.** The most products are saved by the first few basis vectors: on the
tests' spectra a basis of $k + 3$ vectors needs 1.1-1.3x the products of an unrestarted
run, with the same results and certificate. The plan gives the basis at most
`BASIS_SHARE` of the budget left after the graph and the working vectors, and on a CPU at
most `BASIS_CPU_BYTES` (256 MiB: a basis beside the graph and the working vectors is what
made a measure cost several gradient steps' memory): the largest
$m \le \max(2k + 20, 40)$ that fits, at least $k + 3$; when even $k + 3$ does not fit,
the basis of $k + 3$ vectors goes to host memory (CUDA). On a CPU, when fewer than
$2k + 6$ fit, a basis of $2k + 6$ vectors goes to a temporary file (where the disk has
room for twice its bytes), where it costs time, not resident memory (with partial
reorthogonalization a step writes one row and reads none; restarts, reorthogonalizations and
the end read the file): on Hugging Face GPT-2 (``benchmarks/bench_gpt2_time.py``) a basis of
$k + 3 = 4$ vectors restarted every second step and took 1.7x the products of 8 vectors
(49 against 29; 27 unrestarted), far more than the passes over 4 more rows cost.

**Probe blocks.** A block of $B$ probes and its $B$ products ($2B\,v$) buys time, not
accuracy: the products of a block share one pass over the data (or over the kept graph),
and on a CPU its columns go through the graph one at a time anyway. So the block may
take at most `BLOCK_BYTES` (64 MiB), or `BLOCK_SHARE` of the graph where the graph is
estimated, whatever the budget, and never more than the budget leaves after the graph
and the working vectors:

$$ B = \max\Bigl(1,\ \min\Bigl(B_{\mathrm{asked}},\
    \Bigl\lfloor \frac{\max(\mathtt{BLOCK\_BYTES},\ \mathtt{BLOCK\_SHARE}\cdot G)}{2v}
    \Bigr\rfloor,\ \Bigl\lfloor \frac{\text{budget} - G - w\,v}{2v} \Bigr\rfloor
    \Bigr)\Bigr). $$

A small model keeps the block it asked for; a model whose vectors are large against its
graph multiplies one probe at a time (GPT-2 small: 0.5 GB a vector), since every
further probe adds two vectors to a peak that a gradient step does not have. (Before, a
block filled 80% of the free memory: 3 probes on GPT-2 small, 4.5x a gradient step.)

**Graph.** A measure that keeps its gradient graph (`top_eigenvalues`) builds it before
asking for the plan and counts it while it is built, on every device: the bytes of the
distinct storages autograd saves (``saved_tensors_hooks``, in the forward pass and in the
gradient's backward pass), less the model's own parameters and buffers, which the graph
saves but the process holds anyway, plus the gradient the graph ends in
(`sharpgen.curvature._columns.SavedBytes`); on CUDA the allocated bytes around the build
where they are more. A measure whose graphs are not kept passes ``graph_bytes=0``.
Keeping or recomputing graphs and micro-batches are objective options (``graphs``,
``micro_batch_size`` of `sharpgen.curvature.ModelObjective`); the plan reports the
micro-batch size. With ``micro_batch_size="auto"`` the measure's objective chooses it
within the same budget (`sharpgen.curvature._auto_micro`), and $G$ is the larger of the
kept graph and the estimated graph of one micro-batch, which every product holds.

**Product.** A product's backward pass through the graph holds, beside its result, the
parts of a parameter's product before they are added into it and the intermediate
values of the pass (``product_bytes``, $P$). The measures that count their graph pass
`product_transient`: the largest parameter (one part at a time, `sharpgen.curvature._into`)
plus the graph's saved values beyond its gradient, which bounded the pass's intermediates
on GPT-2 (2026-12-07, see the Memory guide).

**Result.** Vectors of the result (``result_vectors``, $r$: the eigenvectors) are
formed after the products, when a measure that built its own objective has freed the
graph and its working vectors: the planned peak is
$\max(G + P + (w + 2B)\,v,\ r\,v + h) + m_{\mathrm{mem}}\,v$; $h = G + P$ on a CPU, whose
C heap keeps much of what was freed (GPT-2 small, $k = 5$: $6.3\,v$), 0 elsewhere.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from sharpgen._distributed import all_reduce_, collective_device
from sharpgen._validation import is_int

__all__ = [
    "BASIS_CPU_BYTES",
    "BASIS_SHARE",
    "BLOCK_BYTES",
    "BLOCK_SHARE",
    "DISK_BASIS_EXTRA",
    "MARGIN",
    "MemoryPlan",
    "available_bytes",
    "check_memory_budget",
    "local_processes",
    "plan_memory",
    "probe_block",
    "product_transient",
]

#: Share of the free memory that ``memory_budget="auto"`` gives a measure.
MARGIN = 0.8
#: Share of the budget (after the graph and working vectors) the Lanczos basis may take.
BASIS_SHARE = 0.1
#: Most bytes of a Lanczos basis in CPU memory (beyond: a smaller basis, or a file).
BASIS_CPU_BYTES = 256 * 2**20
#: Bytes a probe block and its products may always take (``2 B v``), whatever the graph.
BLOCK_BYTES = 64 * 2**20
#: Share of the estimated graph bytes a probe block and its products may take beyond that.
BLOCK_SHARE = 0.5
#: A basis in a file has $2k$ + this many vectors (at least $k + 3$, at most the largest).
DISK_BASIS_EXTRA = 6


def available_bytes(device: torch.device) -> int | None:
    """Free bytes of ``device`` now (CUDA: free device memory; CPU: ``MemAvailable``).

    None where it cannot be read (a CPU without ``/proc/meminfo``, other devices).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def local_processes(device: torch.device) -> int:
    """Processes of this host that share the memory of ``device`` (1 outside ``torchrun``).

    ``LOCAL_WORLD_SIZE`` (set by ``torchrun``) processes run on this host; on the CPU they
    all share its memory, on CUDA they are spread over its devices (at least one each).
    """
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1
    if device.type == "cuda":
        return max(1, math.ceil(local / max(1, torch.cuda.device_count())))
    return local


def check_memory_budget(memory_budget: object) -> int | str | None:
    """``"auto"``, None or a positive int of bytes; else a `ValueError`/`TypeError`."""
    if memory_budget is None or memory_budget == "auto":
        return memory_budget
    if isinstance(memory_budget, str):
        raise ValueError(
            f"memory_budget must be 'auto', None or a number of bytes, got {memory_budget!r}; "
            "pass e.g. memory_budget=4 * 2**30 for 4 GiB."
        )
    if not is_int(memory_budget) or int(memory_budget) <= 0:  # type: ignore[call-overload]
        raise TypeError(
            f"memory_budget must be 'auto', None or a positive int of bytes, got "
            f"{memory_budget!r}; pass e.g. memory_budget=4 * 2**30 for 4 GiB."
        )
    return int(memory_budget)  # type: ignore[call-overload]


@dataclass(frozen=True)
class MemoryPlan:
    r"""What a measure holds beyond the model, and the choices it made to fit its budget.

    Attributes:
        measure: The measure that made the plan.
        budget: Bytes it was allowed (None: no limit).
        vector_bytes: One parameter-sized vector, $v = p\,b$.
        graph_bytes: The kept gradient graph's bytes as estimated (0: not estimated).
        product_bytes: What one product holds beyond its result while it runs ($P$).
        work_vectors: Parameter-sized working vectors ($w$).
        result_vectors: Parameter-sized vectors of the result ($r$, e.g. ``k``
            eigenvectors), formed after the graph and working vectors are freed.
        block_width: Probes per product block ($B$; its products are as many again).
        basis_vectors: Lanczos basis vectors (0 for measures without one).
        basis_storage: ``"device"``, ``"host"`` or ``"disk"``.
        basis_dtype: Stored dtype of the basis (None: the parameters').
        planned_bytes: $\max(G + P + (w + 2B)\,v,\ r\,v + h) + m_{\mathrm{mem}}\,v$,
            the formula's total.
        peak_bytes: The peak measured around the call: on CUDA
            ``torch.cuda.max_memory_allocated`` after it (the process's peak, model
            included); None on CPU, where only the process-wide ``ru_maxrss`` exists
            (``benchmarks/bench_memory.py`` reads it for a call in its own process).
        graphs: The objective's graph keeping (``"auto"``: the objective's default).
        micro_batch_size: The objective's micro-batch size (None: whole batches).
        micro_batch_auto: Whether the objective chose it (``micro_batch_size="auto"``,
            `sharpgen.curvature._auto_micro`; its graph is then in ``graph_bytes``).
    """

    measure: str
    budget: int | None
    vector_bytes: int
    graph_bytes: int
    work_vectors: int
    block_width: int
    basis_vectors: int
    basis_storage: str
    basis_dtype: torch.dtype | None
    planned_bytes: int
    peak_bytes: int | None = None
    graphs: str = "auto"
    micro_batch_size: int | None = None
    result_vectors: int = 0
    micro_batch_auto: bool = False
    product_bytes: int = 0

    def with_peak(self, device: torch.device) -> MemoryPlan:
        """This plan with ``peak_bytes`` read from ``device`` (CUDA only)."""
        if device.type != "cuda":
            return self
        from dataclasses import replace

        return replace(self, peak_bytes=int(torch.cuda.max_memory_allocated(device)))

    def __repr__(self) -> str:
        gib = 2.0**30
        budget = "none" if self.budget is None else f"{self.budget / gib:.2f} GiB"
        parts = [
            f"{self.measure}: planned {self.planned_bytes / gib:.2f} GiB of budget {budget}",
            f"vector {self.vector_bytes / gib:.3f} GiB",
            f"graph {self.graph_bytes / gib:.2f} GiB",
            f"product {self.product_bytes / gib:.2f} GiB",
            f"work {self.work_vectors}",
            f"block {self.block_width}",
        ]
        if self.basis_vectors:
            parts.append(f"basis {self.basis_vectors} on {self.basis_storage}")
        if self.micro_batch_size is not None or self.micro_batch_auto:
            m = self.micro_batch_size
            micro = "whole batches" if m is None else f"micro-batch {m}"
            parts.append(micro + (" (auto)" if self.micro_batch_auto else ""))
        if self.peak_bytes is not None:
            parts.append(f"peak {self.peak_bytes / gib:.2f} GiB")
        return "MemoryPlan(" + ", ".join(parts) + ")"


def _resolve(memory_budget: int | str | None, device: torch.device) -> int | None:
    if memory_budget == "auto":
        free = available_bytes(device)
        return None if free is None else int(MARGIN * free) // local_processes(device)
    return memory_budget  # type: ignore[return-value]


def _agree(budget: int | None, graph: int, disk: int, group: Any) -> tuple[int | None, int, int]:
    """The smallest budget, the largest graph and the smallest free disk over ``group``."""
    # one MAX all-reduce of (-budget, graph, -disk); no budget (no limit) is -inf there
    values = [-math.inf if budget is None else -float(budget), float(graph), -float(disk)]
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    import torch.distributed as dist

    all_reduce_(t, group, what="the memory plan", op=dist.ReduceOp.MAX)
    low, graph_max, disk_min = t.tolist()
    return (None if low == -math.inf else int(-low)), int(graph_max), int(-disk_min)


def plan_memory(
    measure: str,
    *,
    numel: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_budget: int | str | None = "auto",
    graph_bytes: int = 0,
    work_vectors: int = 0,
    block_width: int = 0,
    k: int = 0,
    max_basis: int | None = None,
    basis_storage: str | None = None,
    basis_dtype: torch.dtype | None = None,
    process_group: Any = None,
    result_vectors: int = 0,
    micro_batch_size: int | None = None,
    micro_batch_auto: bool = False,
    product_bytes: int = 0,
) -> MemoryPlan:
    """The plan of one measure call (see the module docstring for the rules).

    Args:
        measure: Name of the measure (reported).
        numel: Parameters in a parameter-sized vector, $p$.
        dtype: Their dtype.
        device: Their device.
        memory_budget: ``"auto"``, None or bytes (checked by `check_memory_budget`).
        graph_bytes: Estimate of the kept gradient graph, 0 when unknown.
        work_vectors: Parameter-sized working vectors the measure holds.
        block_width: Probes per product block a trace estimator asks for; the plan
            narrows it by `probe_block` (at least 1).
        k: Eigenpairs wanted (0: no Lanczos basis).
        max_basis: A basis size the caller fixed (the plan then only reports it).
        basis_storage: A storage the caller fixed.
        basis_dtype: A stored basis dtype the caller fixed.
        process_group: None, or the resolved group of the measure: the ranks then agree
            on the budget (smallest), the graph (largest) and the free disk (smallest)
            in one all-reduce, so that they all make the same plan.
        result_vectors: Parameter-sized vectors of the result, formed once the graph and
            the working vectors are freed (`top_eigenvalues`: its ``k`` eigenvectors).
        micro_batch_size: The objective's micro-batch size (reported).
        micro_batch_auto: Whether the objective chose it (reported).
        product_bytes: What one product holds beyond its result while it runs ($P$,
            e.g. `product_transient`; 0: not counted).

    Returns:
        A `MemoryPlan`.

    Example:
        >>> import torch
        >>> from sharpgen.curvature import plan_memory
        >>> plan = plan_memory("top_eigenvalues", numel=10**8, dtype=torch.float32,
        ...                    device=torch.device("cpu"), memory_budget=8 * 2**30,
        ...                    work_vectors=4, k=1)
        >>> plan.basis_vectors, plan.basis_storage  # too many for 10%: 2k + 6 in a file
        (8, 'disk')
        >>> plan_memory("top_eigenvalues", numel=10**6, dtype=torch.float32,
        ...             device=torch.device("cpu"), memory_budget=8 * 2**30, k=1).basis_vectors
        40
    """
    budget = _resolve(check_memory_budget(memory_budget), device)
    disk = None
    if process_group is not None:
        disk = _disk_free() if device.type == "cpu" else 0
        budget, graph_bytes, disk = _agree(budget, graph_bytes, disk, process_group)
    itemsize = torch.empty((), dtype=dtype).element_size()
    v = numel * itemsize
    if block_width > 1:
        block_width = probe_block(block_width, v, graph_bytes, work_vectors, budget)
    fixed = graph_bytes + product_bytes + (work_vectors + 2 * block_width) * v
    heap = graph_bytes + product_bytes if result_vectors and device.type == "cpu" else 0
    m, storage = 0, basis_storage or "device"
    if k:
        m_min = min(numel, k + 3)
        m_max = min(numel, max(2 * k + 20, 40))
        b = v if basis_dtype is None else numel * torch.empty((), dtype=basis_dtype).element_size()
        if max_basis is not None:
            m = max_basis
        elif budget is None:
            m = m_max
        else:
            share = BASIS_SHARE * max(budget - fixed, 0)
            if device.type == "cpu":
                share = min(share, BASIS_CPU_BYTES)
            fits = int(share // b) if b else m_max
            m = max(m_min, min(m_max, fits))
            wide = min(m_max, max(m_min, 2 * k + DISK_BASIS_EXTRA))
            if basis_storage is None and device.type == "cpu" and fits < wide:
                # a file costs no resident memory: a wider basis there restarts less often
                if _off_device(device, wide * b, disk) == "disk":
                    m, storage = wide, "disk"
                elif fits < m_min:
                    storage = _off_device(device, m * b, disk)
            elif basis_storage is None and fits < m_min:
                storage = _off_device(device, m * b, disk)
        in_memory = 0 if storage == "disk" else m * b
        if storage == "host" and device.type == "cuda":
            in_memory = 0  # on the host, not the device
    else:
        in_memory = 0
    return MemoryPlan(
        measure=measure,
        budget=budget,
        vector_bytes=v,
        graph_bytes=graph_bytes,
        work_vectors=work_vectors,
        block_width=block_width,
        basis_vectors=m,
        basis_storage=storage,
        basis_dtype=basis_dtype,
        planned_bytes=int(max(fixed, result_vectors * v + heap) + in_memory),
        result_vectors=result_vectors,
        micro_batch_size=micro_batch_size,
        micro_batch_auto=micro_batch_auto,
        product_bytes=product_bytes,
    )


def product_transient(graph_bytes: int, gradient_bytes: int, params: Any) -> int:
    r"""$P$ of a product through a counted graph: the largest parameter and the graph's values.

    ``graph_bytes`` is the counted graph $G$, ``gradient_bytes`` the gradient it ends in
    (counted in $G$), ``params`` the selected parameters. One part of the largest
    parameter's product is held at a time (`sharpgen.curvature._into`), and the pass's
    intermediate values are taken as at most the graph's saved values, $G$ less the
    gradient: an estimate, an upper bound of the peaks measured on GPT-2 (Memory guide).

    Example:
        >>> import torch
        >>> product_transient(10_000, 4_000, [torch.zeros(600), torch.zeros(400)])  # 4 * 600 + 6000
        8400
    """
    largest = max((t.numel() * t.element_size() for t in params), default=0)
    return largest + max(graph_bytes - gradient_bytes, 0)


def probe_block(asked: int, v: int, graph_bytes: int, work_vectors: int, budget: int | None) -> int:
    r"""Probes per block: the widest (at most ``asked``, at least 1) the rules allow.

    The block and its products, $2Bv$, take at most ``max(BLOCK_BYTES, BLOCK_SHARE *
    graph_bytes)`` and at most what ``budget`` (None: no limit) leaves after the graph and
    ``work_vectors`` vectors of ``v`` bytes (see the module docstring).

    Examples:
        >>> probe_block(32, 4000, 0, 1, None)  # 4 kB vectors: the block asked for
        32
        >>> probe_block(32, 500 * 10**6, 0, 1, None)  # 0.5 GB vectors: one probe
        1
        >>> probe_block(32, 10**8, 10**10, 1, None)  # a 10 GB graph: 25 probes of 0.1 GB
        25
    """
    if v <= 0:
        return max(1, asked)
    cap = max(BLOCK_BYTES, int(BLOCK_SHARE * graph_bytes)) // (2 * v)
    width = min(asked, cap)
    if budget is not None:
        width = min(width, (budget - graph_bytes - work_vectors * v) // (2 * v))
    return max(1, int(width))


def _disk_free() -> int:
    return shutil.disk_usage(tempfile.gettempdir()).free


def _off_device(device: torch.device, nbytes: int, disk: int | None = None) -> str:
    """Host memory for a CUDA device; a file where the temporary directory has room."""
    if device.type == "cuda":
        return "host"
    free = _disk_free() if disk is None else disk
    return "disk" if free >= 2 * nbytes else "device"
