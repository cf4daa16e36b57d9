"""Run several experiments, in parallel worker processes, with progress and checkpoints."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sharpgen.experiments._progress import Progress, resolve_mode
from sharpgen.experiments._spec import ExperimentSpec
from sharpgen.experiments._trainer import RunResult, check_checkpoint, train

__all__ = ["run_experiments", "check_resumable"]


_PROGRESS: Any = None  # a worker process's progress queue (set by _init_worker)


def _init_worker(progress_queue: Any, threads: int) -> None:
    global _PROGRESS
    _PROGRESS = progress_queue
    torch.set_num_threads(threads)


def _train_one(
    spec: ExperimentSpec,
    seeds: Sequence[int],
    options: dict[str, Any],
    keep_going: bool,
    progress: Callable[[int], None] | None,
) -> RunResult:
    """`train` one experiment; with ``keep_going`` a divergence becomes a failed `RunResult`."""
    start = time.perf_counter()
    try:
        return train(spec, seeds, progress=progress, **options)
    except FloatingPointError as exc:
        if not keep_going:
            raise
        wall = time.perf_counter() - start
        return RunResult(spec, tuple(seeds), (), {}, (), wall, 0, error=str(exc))


def _worker(spec_dict: dict, seeds: list[int], options: dict[str, Any], keep_going: bool) -> dict:
    spec = ExperimentSpec.from_dict(spec_dict)

    def progress(k: int) -> None:
        _PROGRESS.put((spec.name, k))

    return _train_one(spec, seeds, options, keep_going, progress).to_dict()


def run_experiments(
    specs: Sequence[ExperimentSpec],
    seeds: Sequence[int],
    *,
    device: str = "cpu",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    jobs: int = 1,
    progress: bool | str = True,
    on_result: Callable[[RunResult], None] | None = None,
    compile: bool = False,
    keep_going: bool = False,
) -> list[RunResult]:
    """Train every experiment (each with all seeds batched) and return results in order.

    Args:
        specs: The experiments.
        seeds: Seeds, one run per seed in every experiment.
        device: ``"cpu"`` or ``"cuda"``.
        checkpoint_dir: Directory for one checkpoint per experiment (``<name>.pt``).
        resume: Continue from existing checkpoints.
        jobs: Experiments trained at the same time in separate processes (CPU only; each
            gets ``max(1, cpu_count // jobs)`` threads). ``jobs=1`` trains in this process.
        progress: ``True``: on a terminal (``sys.stderr.isatty()``, tqdm installed) one tqdm
            bar per experiment, in epochs; otherwise one plain line on stderr per finished
            phase and per finished experiment. ``"bars"`` or ``"lines"`` force one of them;
            ``False`` shows nothing.
        on_result: Called with each result as soon as it is complete.
        compile: Passed to `train`: the fused 1-SAM step of the no-bias, bias and
            simplified-LayerNorm nets through `torch.compile` (compiled once per process;
            the Sim-BN step is never compiled).
        keep_going: An experiment that diverges (`train` raises `FloatingPointError`) comes
            back as a `RunResult` whose ``error`` says why, without metrics, and the other
            experiments still train; without it the error propagates at once.

    Raises:
        CheckpointError: With ``resume``, if an existing checkpoint is unreadable or belongs to
            another experiment or other seeds (checked for every experiment before training).
        FloatingPointError: Without ``keep_going``, for the first experiment that diverges.

    Returns:
        One `RunResult` per experiment, in the order of ``specs``.
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be >= 1")
    seeds = tuple(int(s) for s in seeds)
    check_resumable(specs, seeds, checkpoint_dir, resume)
    shown = Progress(specs, resolve_mode(progress, sys.stderr))

    def options(spec: ExperimentSpec) -> dict[str, Any]:
        """The keyword arguments of `train` for ``spec``, but ``progress``."""
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{spec.name}.pt"
        return {"device": device, "checkpoint": ckpt, "resume": resume, "compile": compile}

    results: dict[str, RunResult] = {}
    try:
        if jobs == 1 or device != "cpu" or len(specs) == 1:
            for spec in specs:
                update = functools.partial(shown.update, spec.name)
                res = _train_one(spec, seeds, options(spec), keep_going, update)
                results[spec.name] = res
                shown.finished(res)
                if on_result is not None:
                    on_result(res)
        else:
            _run_pool(specs, seeds, options, keep_going, jobs, shown, results, on_result)
    finally:
        shown.close()
    return [results[s.name] for s in specs]


def check_resumable(
    specs: Sequence[ExperimentSpec],
    seeds: Sequence[int],
    checkpoint_dir: str | Path | None,
    resume: bool,
) -> None:
    """With ``resume``, check every existing checkpoint before any training starts.

    Raises:
        CheckpointError: For the first checkpoint that is unreadable or belongs to another
            experiment or other seeds.
    """
    if not resume or checkpoint_dir is None:
        return
    for spec in specs:
        path = Path(checkpoint_dir) / f"{spec.name}.pt"
        if path.exists():
            check_checkpoint(path, spec, seeds)


def _run_pool(specs, seeds, options, keep_going, jobs, shown, results, on_result) -> None:
    """Train the experiments in ``jobs`` spawned processes.

    Progress comes back over one ``multiprocessing`` queue handed to the workers when they
    start (no manager process: nothing is left for the interpreter to wait for at exit). On any
    exception (Ctrl-C) the workers are terminated at once; their last checkpoints are intact
    because checkpoints are written atomically.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()

    def update_bars(block: bool) -> bool:
        try:
            name, k = q.get(timeout=0.2) if block else q.get_nowait()
        except queue.Empty:
            return False
        shown.update(name, k)
        return True

    # the longest experiments first, so the pool ends together
    order = sorted(specs, key=lambda s: -s.epochs * s.steps_per_epoch * _cost(s))
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(q, threads)
    )
    try:
        with _sigint_ignored():  # the workers inherit it: Ctrl-C is the main process's job
            pending = {
                pool.submit(_worker, s.to_dict(), list(seeds), options(s), keep_going)
                for s in order
            }
        while pending:
            update_bars(block=True)
            finished = [f for f in pending if f.done()]
            while finished and update_bars(block=False):  # its last epochs come first
                pass
            for fut in finished:
                pending.discard(fut)
                res = RunResult.from_dict(fut.result())
                results[res.spec.name] = res
                shown.finished(res)
                if on_result is not None:
                    on_result(res)
        while update_bars(block=False):  # drain the last progress messages
            pass
    except BaseException:
        workers = getattr(pool, "_processes", None) or {}
        for proc in list(workers.values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown()
    finally:
        q.close()
        q.cancel_join_thread()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while worker processes start, so that they inherit the ignoring.

    Only in the main thread (where Python handles signals); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _cost(spec: ExperimentSpec) -> float:
    """Rough relative cost of one step, for ordering and spreading experiments.

    Calibrated on measured batched step times (R = 3, one thread, d = 30, m = 500): a fused
    1-SAM step on one example costs about 0.27 ms (Sim-LN 0.4 ms), a full-batch GD step on
    100 examples 3 ms and a Sim-BN step, which touches the whole training set, 2.3 ms; the
    constant term is the per-step launch overhead.
    """
    size = spec.width * (spec.d + 1)
    if spec.arch == "simplified_bn":
        per = 0.03 * size * spec.n * 4
    else:
        per = 0.15 * size * spec.batch_size
    if spec.arch == "simplified_ln":
        per += 10_000
    if spec.method == "sgd":
        per /= 2  # no ascent step
    return float(per + 20_000)
