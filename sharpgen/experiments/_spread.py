"""Independent experiments spread over ``torchrun`` processes, one report gathered on rank 0.

``torchrun --nproc-per-node P -m sharpgen reproduce ...`` (or several nodes with a shared
``--out`` directory) starts P processes with ``RANK`` / ``WORLD_SIZE`` set. The experiments
are assigned to ranks once, longest first to the least loaded rank; every rank trains its own
experiments exactly as a single process would (all seeds of one experiment batched together,
each with its own checkpoint file, so ``--resume`` works per experiment), and rank 0 gathers
the results with ``torch.distributed.gather_object`` over gloo. Training itself needs no
communication, so the results are bitwise those of a single-process run of the same seeds
(with the same number of threads per process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sharpgen.experiments._checkpoint import CheckpointError
from sharpgen.experiments._runner import _cost, run_experiments
from sharpgen.experiments._spec import ExperimentSpec
from sharpgen.experiments._trainer import RunResult

__all__ = ["launched_world_size", "assign", "run_spread"]


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def assign(specs: Sequence[ExperimentSpec], world: int) -> list[list[int]]:
    """Indices of the experiments of every rank: longest first, to the least loaded rank.

    Examples:
        >>> from sharpgen.experiments import get_preset
        >>> assign(get_preset("tiny"), 2)
        [[4, 1], [3, 0, 2]]
    """
    load = [0.0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    order = sorted(range(len(specs)), key=lambda i: -_work(specs[i]))
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        out[r].append(i)
        load[r] += _work(specs[i])
    return out


def _work(spec: ExperimentSpec) -> float:
    return spec.epochs * spec.steps_per_epoch * _cost(spec)


def run_spread(
    specs: Sequence[ExperimentSpec],
    seeds: Sequence[int],
    *,
    device: str = "cpu",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    compile: bool = False,
    keep_going: bool = False,
) -> list[RunResult] | None:
    """Train ``specs`` over the processes of a ``torchrun`` job; results on rank 0.

    Initializes the default process group (gloo) from the ``torchrun`` environment unless one
    exists, and destroys it at the end if it created it.

    Args:
        specs: The experiments (the same list on every rank).
        seeds: One run per seed in every experiment.
        device: ``"cpu"`` or ``"cuda"`` (rank ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK``).
        checkpoint_dir: Shared directory of the per-experiment checkpoints.
        resume: Continue every experiment from its checkpoint.
        progress: Progress bars (rank 0 only).
        compile: Passed to `run_experiments` (`torch.compile` of the rank-one 1-SAM step).
        keep_going: Passed to `run_experiments`: a diverged experiment comes back as a failed
            `RunResult` and the others still train.

    Returns:
        On rank 0 one `RunResult` per experiment in the order of ``specs``; None elsewhere.

    Raises:
        FloatingPointError, CheckpointError: On rank 0, if any rank's experiment diverged
            (without ``keep_going``) or had a bad checkpoint (the other ranks return None).
    """
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = assign(specs, world)[rank]
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        try:
            results = run_experiments(
                [specs[i] for i in mine],
                seeds,
                device=device,
                checkpoint_dir=checkpoint_dir,
                resume=resume,
                jobs=1,
                progress=progress and rank == 0,
                compile=compile,
                keep_going=keep_going,
            )
            payload: tuple[str, Any] = (
                "ok",
                {i: r.to_dict() for i, r in zip(mine, results, strict=True)},
            )
        except (FloatingPointError, CheckpointError) as exc:
            payload = (type(exc).__name__, str(exc))
        gathered: list | None = [None] * world if rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
    finally:
        if own:
            dist.destroy_process_group()
    if gathered is None:
        return None
    merged: dict[int, dict] = {}
    for kind, data in gathered:
        if kind == "FloatingPointError":
            raise FloatingPointError(data)
        if kind == "CheckpointError":
            raise CheckpointError(data)
        merged.update(data)
    return [RunResult.from_dict(merged[i]) for i in range(len(specs))]
