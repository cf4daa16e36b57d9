r"""Traces of the Hessian's diagonal blocks, from streamed probe blocks under the memory plan.

Hutchinson's per-block estimates need, of each probe $z_j$ and its product $Hz_j$, only the
per-parameter dot products $z_{j,b}^\top (Hz_j)_b$: a block of $B$ probes is drawn, multiplied
and reduced to $B$ numbers per parameter, then dropped before the next block is drawn. The
call holds the kept gradient graph and $2B$ parameter-sized vectors, with $B$ chosen by
`sharpgen.curvature.plan_memory` (reported as ``result.memory``); nothing of size
$p \times m$ is kept. With the same probe blocks (the same $B$) the probes and estimates are
those of drawing all $m$ probes at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._validation import check_bool, check_choice, check_generator, check_int
from sharpgen.curvature import ModelObjective
from sharpgen.curvature._auto_micro import micro_plan_fields
from sharpgen.curvature._plan import MemoryPlan, check_memory_budget, plan_memory
from sharpgen.linalg import LinearOperator
from sharpgen.linalg._diagonal import exact_diagonal
from sharpgen.linalg._hutchinson import column_dots
from sharpgen.linalg._operator import as_linear_operator
from sharpgen.linalg._probes import draw_probes
from sharpgen.sharpness._blocks import Blocks, check_blocks, resolve_blocks
from sharpgen.sharpness._common import MeasureSource, kept_graph, product_bytes_of, progress_bar

__all__ = ["BlockTraces", "block_traces", "probe_sums"]


@dataclass(frozen=True, repr=False)
class BlockTraces:
    r"""Traces of the diagonal blocks of the Hessian, from the same products as the total.

    Attributes:
        traces: Block name -> $\operatorname{tr} H_{bb}$.
        stderr: Block name -> standard error (0 when exact).
        total: $\sum_b \operatorname{tr} H_{bb}$ (the trace of $H$ when the blocks cover
            every selected parameter).
        total_stderr: Standard error of ``total`` (from the per-probe totals).
        blocks: Block name -> parameter names.
        num_matvecs: Hessian-vector products spent.
        method: ``"exact"`` or ``"hutchinson"``.
        memory: The memory plan the call followed (`sharpgen.curvature.MemoryPlan`:
            probes per block, the formula's bytes), or None.
    """

    traces: dict[str, float]
    stderr: dict[str, float]
    total: float
    total_stderr: float
    blocks: dict[str, list[str]]
    num_matvecs: int
    method: str
    memory: MemoryPlan | None = None

    def __repr__(self) -> str:
        parts = ", ".join(f"{k or '<root>'}: {v:.4g}" for k, v in self.traces.items())
        return (
            f"BlockTraces(total={self.total:.6g} ± {self.total_stderr:.2g}, {parts}, "
            f"method={self.method!r}, num_matvecs={self.num_matvecs})"
        )

    def plot(self, ax: Any = None) -> Any:
        """Bar chart of the block traces with ± 2 standard errors."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(max(4, 0.6 * len(self.traces)), 3.5))
        names = [k or "<root>" for k in self.traces]
        ax.bar(names, list(self.traces.values()),
               yerr=[2 * v for v in self.stderr.values()], capsize=3)  # fmt: skip
        ax.set_ylabel("tr H_bb")
        ax.tick_params(axis="x", rotation=45)
        return ax.figure


def probe_sums(
    op: LinearOperator | Tensor,
    sizes: list[int],
    *,
    num_probes: int,
    block: int,
    generator: torch.Generator | None,
    bar: Any = None,
) -> Tensor:
    r"""$S_{ij} = z_{j,(i)}^\top (A z_j)_{(i)}$ for the pieces $(i)$ of sizes ``sizes``.

    ``num_probes`` Rademacher probes in blocks of ``block`` (the last one narrower), each
    block drawn from ``generator``, multiplied, reduced and dropped before the next: one
    block of probes and its products alive at a time. Returns ``(len(sizes), num_probes)``
    in float64 (the pieces' sums add up to Hutchinson's samples $z_j^\top A z_j$).

    Examples:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> S = probe_sums(A, [1, 2], num_probes=4, block=3, generator=torch.Generator())
        >>> S.tolist()  # exact for a diagonal matrix with Rademacher probes
        [[1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]]
    """
    op = as_linear_operator(op)
    n = op.shape[0]
    cols: list[Tensor] = []
    drawn = 0
    while drawn < num_probes:
        b = min(block, num_probes - drawn)
        Z = draw_probes(n, b, distribution="rademacher", generator=generator,
                        dtype=op.dtype, device=op.device)  # fmt: skip
        AZ = op.matmat(Z)
        cols.append(_piece_dots(Z, AZ, sizes))
        del Z, AZ  # before the next block is drawn
        drawn += b
        if bar is not None:
            bar.update(b)
    return torch.cat(cols, 1)


def _piece_dots(Z: Tensor, AZ: Tensor, sizes: list[int]) -> Tensor:
    """``(len(sizes), b)`` float64: the column dots of every piece of rows."""
    pieces = zip(Z.split(sizes), AZ.split(sizes), strict=True)
    return torch.stack([column_dots(z, az) for z, az in pieces]).to(torch.float64)


def block_traces(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    blocks: Blocks = "module",
    method: str = "auto",
    num_matvecs: int = 100,
    exact_threshold: int = 2000,
    generator: torch.Generator | None = None,
    progress: bool = False,
    memory_budget: int | str | None = "auto",
    **objective_options: Any,
) -> BlockTraces:
    r"""Traces of the Hessian's diagonal blocks (per layer), which sum to the trace.

    Hutchinson with Rademacher probes $z_j$ gives every block from the same products:
    $\widehat{\operatorname{tr}} H_{bb} = \frac1m\sum_j z_{j,b}^\top (H z_j)_b$, unbiased
    since $\mathbb{E}[z_b z_{b'}^\top] = 0$ for $b \ne b'$; the block estimates add up to
    the Hutchinson estimate of $\operatorname{tr} H$ exactly, each with its own standard
    error. ``"exact"`` sums the exact diagonal ($p$ products); ``"auto"`` is exact up to
    ``exact_threshold`` parameters.

    **Memory.** The probes are streamed in blocks of $B$ (`sharpgen.curvature.plan_memory`,
    reported as ``result.memory``): the call holds the kept gradient graph and $2B$
    parameter-sized vectors (a block and its products), and of each probe only its
    per-parameter sums. A small model takes all its probes in one block (the estimates
    of one $p \times m$ draw, as before); a large one, one probe at a time.

    Args:
        model: Any ``nn.Module`` or a ready `sharpgen.ModelObjective`.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        blocks: ``"module"`` (parameters grouped by the module that owns them, default),
            ``"parameter"`` (one block per tensor) or a dict block name -> names.
        method: ``"auto"``, ``"exact"`` or ``"hutchinson"``.
        num_matvecs: Probes of ``"hutchinson"``.
        exact_threshold: Largest parameter count ``"auto"`` treats exactly.
        generator: Source of the probes.
        progress: A tqdm bar over the products.
        memory_budget: Bytes the call may hold beyond what the process holds: ``"auto"``
            (default, 80% of what the device has free), None (no limit) or an int; the
            plan narrows the probe block to fit (see `sharpgen.curvature.plan_memory`).
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout``, ``reduction``, ``backend``, ``process_group``,
            ``func_mode``, ``vectorize``, ``micro_batch_size`` (``"auto"``: the largest
            micro-batch whose graph fits ``memory_budget`` beside one probe and its
            product, None where the whole batch fits), ``graphs``.

    Returns:
        A `BlockTraces` (``.plot()`` draws a bar chart; ``.memory`` the plan).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> data = (x, torch.zeros(2, 1, dtype=torch.float64))
        >>> res = block_traces(model, torch.nn.functional.mse_loss, data, blocks="parameter")
        >>> res.traces, res.total  # H = (2/n) sum [x;1][x;1]^T
        ({'weight': 10.0, 'bias': 2.0}, 12.0)
    """
    method = check_choice("method", method, ("auto", "exact", "hutchinson"))
    num_matvecs = check_int("num_matvecs", num_matvecs, minimum=2)
    exact_threshold = check_int("exact_threshold", exact_threshold, minimum=0)
    check_bool("progress", progress)
    generator = check_generator(generator)
    check_blocks(blocks)
    memory_budget = check_memory_budget(memory_budget)
    source = MeasureSource(model, loss_fn, data, objective_options, where="block_traces",
                           memory_budget=memory_budget, reserve_vectors=2)  # fmt: skip
    keep = objective_options.get("backend", "auto") != "func"
    obj = source.objective(keep_first_graph=keep, share=True)
    groups = resolve_blocks(obj.params, blocks)
    p, device = obj.numel, obj.device
    if method == "auto":
        method = "exact" if p <= exact_threshold else "hutchinson"
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    H = source.hessian()
    graph = kept_graph(H, device, held)  # built now and counted, on every device
    total = p if method == "exact" else num_matvecs
    fields = micro_plan_fields(obj, graph, min(64 if method == "exact" else num_matvecs, total))
    plan = plan_memory(
        "block_traces", numel=p, dtype=obj.accum_dtype, device=device, memory_budget=memory_budget,
        process_group=obj.process_group,
        product_bytes=product_bytes_of(H, p, fields["graph_bytes"]), **fields,
    )  # fmt: skip
    names = list(obj.params)
    sizes = [t.numel() for t in obj.params.values()]
    with progress_bar(progress, total=total, desc="block_traces", unit="matvec") as bar:
        if method == "exact":
            diag = exact_diagonal(H, block_size=plan.block_width, bar=bar).values
            per_param = torch.stack([d.sum() for d in diag.split(sizes)])[:, None]
        else:
            per_param = probe_sums(H, sizes, num_probes=num_matvecs, block=plan.block_width,
                                   generator=generator, bar=bar)  # fmt: skip
    row = {n: per_param[i] for i, n in enumerate(names)}
    per_block = {b: _add_up([row[n] for n in members]) for b, members in groups.items()}
    totals = _add_up(list(per_block.values()))
    m = per_param.shape[1]

    def se(v: Tensor) -> float:
        return 0.0 if method == "exact" else float(v.std() / math.sqrt(m))

    return BlockTraces(
        traces={b: float(v.mean()) for b, v in per_block.items()},
        stderr={b: se(v) for b, v in per_block.items()},
        total=float(totals.mean()), total_stderr=se(totals), blocks=groups,
        num_matvecs=total, method=method, memory=plan.with_peak(device),
    )  # fmt: skip


def _add_up(terms: list[Tensor]) -> Tensor:
    """``terms[0] + terms[1] + ...`` in order (as the built-in ``sum``, typed)."""
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out
