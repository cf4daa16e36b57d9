r"""``micro_batch_size="auto"``: the largest micro-batch whose graph fits the memory budget.

When an objective is built with ``micro_batch_size="auto"`` it measures, before its
validation pass, what the gradient graph of a product costs per sample, and chooses the
micro-batch size from that and a budget. The graphs of slices of the first 1 and 2
samples of the first batch are built as a product builds them (forward pass, gradient
with ``create_graph=True``) and counted like a kept graph
(`sharpgen.curvature._columns.SavedBytes`: the distinct storages autograd saves, less
the model's parameters and buffers and the slice itself, plus the gradient the graph
ends in; on CUDA the allocated bytes around the build where they are more): $G_1$ and
$G_2$. The graph of a micro-batch of $m$ samples is then estimated as

$$ G(m) = f + c\,s\,m, \qquad s = G_2 - G_1, \quad f = \max(G_1 - s,\ 0), $$

a part $f$ that does not grow with the samples (the gradient, what the graph saves of
the parameters) and $s$ per sample, with $c$ = `DOUBLE_BACKWARD` for what a product
allocates beside the saved tensors (the forward's and the double backward's
temporaries, and what the allocator keeps of them). The factor is measured, not
derived: on Hugging Face GPT-2 (4 layers of width 256, 8 x 128 tokens, CPU,
``benchmarks/bench_memory.py``) the peak of a 3-product `hessian_trace` above the
resident set before it was $f + r\,v + 2.3\,s\,m$ for micro-batches of 2 and 4 samples
and $f + r\,v + 2.6\,s\,n$ for the whole batch's kept graph ($s$ = 110 MB, $f$ = 65 MB,
$v$ = 65 MB); $c = 2.75$ covers both. With the budget $M$ (bytes, as
``memory_budget`` of the measures: ``"auto"`` is 80% of the free memory, see
`sharpgen.curvature.plan_memory`) and $r$ parameter-sized vectors of $v$ bytes that the
measure holds beside the graph (its working vectors and one probe block and its
product; `DEFAULT_RESERVE` outside a measure), the choice is

$$ m^\star = \Bigl\lfloor \frac{M - r\,v - f}{c\,s} \Bigr\rfloor, \qquad
   \texttt{micro\_batch\_size} = \begin{cases} \text{None (whole batches)} & m^\star \ge n \\
   \max(1, m^\star) & \text{otherwise,} \end{cases} $$

with $n$ the samples of the first batch (counted as for the sample weights,
`sharpgen.curvature._data.num_samples`; later batches are taken to be no larger, as a
``DataLoader``'s are). A batch of one sample, or no budget (``memory_budget=None``), is
taken whole without a probe; a batch of two is probed on one sample only, with
$s = G_1$ and $f = 0$ (an overestimate: the probe would otherwise be the whole batch).

**Deterministic and agreed.** For a given int budget the choice depends only on the
counted bytes, which depend only on the model and the first batch's shapes. Over a
process group the ranks agree on the inputs before they choose, as the memory plan
does (one MAX all-reduce: the smallest room, the largest $s$ and $f$, the largest
first batch), so every rank takes the same size.

**Side effects.** None: the probes run in the objective's model state (restored), on
copies of the slices, with the global random streams restored afterwards (dropout
draws in a probe are not seen by the caller's later draws).

**Refused** like an int size: BatchNorm on batch statistics (``bn="batch"``), see
`sharpgen.curvature._micro`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_leaves, tree_map

from sharpgen._distributed import all_reduce_, collective_device
from sharpgen._precision import refuse_missing_kernel
from sharpgen.curvature._columns import SavedBytes, held_tensors
from sharpgen.curvature._data import (
    _global_rng_state,
    _set_global_rng_state,
    check_devices,
    num_samples,
)
from sharpgen.curvature._micro import _slice
from sharpgen.curvature._plan import BLOCK_BYTES, _resolve, check_memory_budget

if TYPE_CHECKING:
    from sharpgen.curvature._interface import Objective

__all__ = [
    "DEFAULT_RESERVE",
    "DOUBLE_BACKWARD",
    "MicroBatchChoice",
    "choose_micro_batch",
    "fit_micro_batch",
    "micro_batch_budget",
    "micro_plan_fields",
]

#: Factor $c$ on the counted per-sample graph bytes: a product's peak per sample.
DOUBLE_BACKWARD = 2.75
#: Parameter-sized vectors kept beside the graph by an objective built outside a measure.
DEFAULT_RESERVE = 4

#: (memory_budget, reserved vectors) of the objective built now (`micro_batch_budget`).
_BUDGET: ContextVar[tuple[int | str | None, int]] = ContextVar(
    "sharpgen_micro_batch_budget", default=("auto", DEFAULT_RESERVE)
)


@contextmanager
def micro_batch_budget(memory_budget: int | str | None, reserve_vectors: int) -> Iterator[None]:
    """Context: objectives built inside choose ``"auto"`` within ``memory_budget``.

    A measure builds its objective inside it with its own ``memory_budget`` and the
    parameter-sized vectors it holds beside the graph (its plan's working vectors and one
    probe block of one probe and its product).
    """
    token = _BUDGET.set((memory_budget, reserve_vectors))
    try:
        yield
    finally:
        _BUDGET.reset(token)


@dataclass(frozen=True)
class MicroBatchChoice:
    r"""What ``micro_batch_size="auto"`` measured and chose (see the module docstring).

    Attributes:
        size: The chosen micro-batch size (None: whole batches).
        samples: Samples of the first batch, $n$ (the largest over a process group).
        per_sample_bytes: $s$, the graph's bytes per sample (0: not probed).
        fixed_bytes: $f$, the graph's bytes that do not grow with the samples.
        budget: The budget $M$ in bytes (None: no limit).
        reserve_bytes: $r\,v$, the vectors held beside the graph.
    """

    size: int | None
    samples: int
    per_sample_bytes: int
    fixed_bytes: int
    budget: int | None
    reserve_bytes: int

    def graph_bytes(self) -> int:
        """$G(m)$ for the chosen size (or the whole first batch), 0 when not probed."""
        if not self.per_sample_bytes:
            return 0
        m = self.samples if self.size is None else self.size
        return int(self.fixed_bytes + math.ceil(DOUBLE_BACKWARD * self.per_sample_bytes * m))


def fit_micro_batch(n: int, per_sample: int, fixed: int, room: int | None) -> int | None:
    r"""The micro-batch size for ``n`` samples: None where the whole batch fits ``room``.

    ``room`` is the budget less the reserved vectors, $M - r\,v$ (None: no limit).

    Examples:
        >>> fit_micro_batch(8, 100, 50, 2500)  # the whole batch: 50 + 2.75 * 100 * 8 = 2250
        >>> fit_micro_batch(8, 100, 50, 1000)  # floor((1000 - 50) / 275)
        3
        >>> fit_micro_batch(8, 100, 50, 100)  # not even one sample fits: one at a time
        1
    """
    if room is None or n <= 1 or per_sample <= 0:
        return None
    m = math.floor((room - fixed) / (DOUBLE_BACKWARD * per_sample))
    return None if m >= n else max(1, m)


def _graph_bytes(obj: Objective, inputs: Any, targets: Any) -> int:
    """Bytes of the gradient graph of one slice, built as a product builds it, then freed."""
    batch = [t for t in tree_leaves((inputs, targets)) if isinstance(t, Tensor)]
    counter = SavedBytes([*held_tensors(obj), *batch])
    cuda = obj.device.type == "cuda"
    before = torch.cuda.memory_allocated(obj.device) if cuda else 0
    with obj.state(), torch.enable_grad():
        p = {n: t.detach().requires_grad_(True) for n, t in obj.params.items()}
        with saved_tensors_hooks(counter.pack, _unpack):
            loss = obj.batch_loss(p, inputs, targets)
            if not loss.requires_grad:  # the validation pass says so, clearly
                return 0
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True,
                                        allow_unused=True)  # fmt: skip
        ends = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes()
                for g in grads if g is not None and not counter.saved(g)}  # fmt: skip
        counted = counter.new_bytes + sum(ends.values())
        if cuda:
            counted = max(counted, torch.cuda.memory_allocated(obj.device) - before)
    return int(counted)


def _unpack(t: Tensor) -> Tensor:
    return t


def _copy_slice(x: Any, stop: int, n: int) -> Any:
    """The first ``stop`` samples of ``x`` as copies (their storages hold only them)."""
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, _slice(x, 0, stop, n))


def _probe(obj: Objective, inputs: Any, targets: Any, n: int) -> tuple[int, int]:
    """$(s, f)$ from the graphs of the first one and two samples (one only for ``n = 2``)."""
    rng = _global_rng_state()
    try:
        g1 = _graph_bytes(obj, _copy_slice(inputs, 1, n), _copy_slice(targets, 1, n))
        if n == 2:
            return g1, 0
        g2 = _graph_bytes(obj, _copy_slice(inputs, 2, n), _copy_slice(targets, 2, n))
    except RuntimeError as err:  # e.g. a model that needs more than one sample
        refuse_missing_kernel(err, obj.dtype, obj.autocast, obj.device)
        raise ValueError(
            "micro_batch_size='auto' measures the gradient graph of the first 1 and 2 "
            f"samples of the first batch, and the model failed on them ({err}); pass an int "
            "micro_batch_size that the model accepts, or None."
        ) from err
    finally:
        _set_global_rng_state(rng)
    s = max(g2 - g1, 0)
    if s == 0:  # nothing grows with the samples: sized as one sample per sample
        return g1, 0
    return s, max(g1 - s, 0)


def _agree(
    room: int | None, s: int, f: int, n: int, group: Any
) -> tuple[int | None, int, int, int]:
    """The smallest room, the largest $s$, $f$ and $n$ over ``group`` (one all-reduce)."""
    import torch.distributed as dist

    values = [-math.inf if room is None else -float(room), float(s), float(f), float(n)]
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    all_reduce_(t, group, what="the micro-batch size", op=dist.ReduceOp.MAX)
    low, s_max, f_max, n_max = t.tolist()
    return (None if low == -math.inf else int(-low)), int(s_max), int(f_max), int(n_max)


def choose_micro_batch(obj: Objective) -> MicroBatchChoice:
    """Measure and choose the micro-batch size of ``obj`` (``micro_batch_size="auto"``).

    Reads the budget of the enclosing `micro_batch_budget` (default: ``"auto"`` and
    `DEFAULT_RESERVE` vectors). Called by `ModelObjective` before its validation pass;
    with a process group every rank must call it (one all-reduce).
    """
    memory_budget, reserve = _BUDGET.get()
    budget = _resolve(check_memory_budget(memory_budget), obj.device)
    v = obj.numel * torch.empty((), dtype=obj.accum_dtype).element_size()
    room = None if budget is None else budget - reserve * v
    inputs, targets = obj._batches.first()
    check_devices(inputs, targets, 0, obj.device)
    n = num_samples(inputs)
    s = f = 0
    if room is not None and n > 1:
        s, f = _probe(obj, inputs, targets, n)
    if obj.process_group is not None:
        room, s, f, n = _agree(room, s, f, n, obj.process_group)
        budget = None if room is None else room + reserve * v
    return MicroBatchChoice(size=fit_micro_batch(n, s, f, room), samples=n,
                            per_sample_bytes=s, fixed_bytes=f, budget=budget,
                            reserve_bytes=reserve * v)  # fmt: skip


def micro_plan_fields(obj: Any, graph_bytes: int, block_width: int = 0) -> dict[str, Any]:
    """The graph, block and micro-batch keywords of `plan_memory` for a measure's objective.

    ``graph_bytes`` is what the measure counted of a kept graph; an objective that chose
    its micro-batches holds, inside every product, the estimated graph of one micro-batch
    (`MicroBatchChoice.graph_bytes`), the larger of the two is planned. Its room was
    reserved for one probe and its product, so the probe block asked for
    (``block_width``) is then at most `BLOCK_BYTES` (not a share of the graph: on
    GPT-2 the micro-batch's graph made room for a block of 2, whose peak passed the budget).
    """
    choice = getattr(obj, "micro_batch_choice", None)
    if choice is not None and choice.size is not None:
        graph_bytes = max(graph_bytes, choice.graph_bytes())
        v = obj.numel * torch.empty((), dtype=obj.accum_dtype).element_size()
        block_width = min(block_width, max(1, BLOCK_BYTES // (2 * v)))
    return {
        "graph_bytes": graph_bytes,
        "block_width": block_width,
        "micro_batch_size": getattr(obj, "micro_batch_size", None),
        "micro_batch_auto": choice is not None,
    }
