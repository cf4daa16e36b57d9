"""`run_study`: train a study's models stack by stack, measure them, analyse, write a report."""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sharpgen.experiments._checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    restart_hint,
    save_checkpoint,
    spec_differences,
)
from sharpgen.experiments._progress import resolve_mode
from sharpgen.study._data import StudyData, derive_seed, load_data
from sharpgen.study._spec import HYPERPARAMETERS, StudySpec
from sharpgen.study._stacked import module_of
from sharpgen.study._train import (
    Stack,
    checkpoint_path,
    model_name,
    plan_stacks,
    stack_cost,
    train_one_stack,
)

__all__ = ["StudyResult", "run_study", "train_study"]


@dataclass(frozen=True)
class StudyResult:
    """What `run_study` produced.

    Attributes:
        spec: The study.
        models: The `TrainedModel` records of the models that met the stopping rule.
        excluded: One dict per model left out of the analysis (``name``, ``hparams``,
            ``reason``): it did not reach the stopping rule within the step cap, or diverged.
        table: The `StudyTable` of `measure_models` (None with ``measure=False``), also
            written to ``table.csv``.
        analysis: The `StudyAnalysis` (None with ``measure=False`` or fewer than two
            models).
        out_dir: Where the files are.
        trained: Keys of the stacks this call trained (the others came from checkpoints).
        train_seconds: Training time of every stack, this call's or the checkpoint's.
    """

    spec: StudySpec
    models: tuple[Any, ...]
    excluded: tuple[dict[str, Any], ...]
    table: Any
    analysis: Any
    out_dir: Path
    trained: tuple[str, ...]
    train_seconds: float


def _resolve(spec_or_preset: StudySpec | str) -> StudySpec:
    if isinstance(spec_or_preset, StudySpec):
        return spec_or_preset
    if isinstance(spec_or_preset, str):
        from sharpgen.study._presets import get_study

        return get_study(spec_or_preset)
    raise TypeError(
        "spec_or_preset must be a StudySpec or the name of a preset (see "
        f"sharpgen.study.STUDY_PRESETS), got {type(spec_or_preset).__name__}."
    )


def _load_matching(path: Path, spec: StudySpec, seed: int, stack: Stack) -> dict[str, Any]:
    """A stack checkpoint, checked to belong to this study, seed and stack."""
    state = load_checkpoint(path)
    saved = state.get("spec")
    if isinstance(saved, dict):  # the description is free text, not part of the study
        saved = {k: v for k, v in saved.items() if k != "description"}
    current = {k: v for k, v in spec.to_dict().items() if k != "description"}
    diff = spec_differences(saved, current)
    if diff or state.get("seed") != seed or state.get("indices") != list(stack.indices):
        what = ", ".join(diff) if diff else "seed or models"
        raise CheckpointError(
            f"checkpoint {path} belongs to another study (differs in {what}); {restart_hint(path)}"
        )
    return state


def _bar(progress: bool | Callable[[int], Any], total: int) -> tuple[Any, Callable[[int], Any]]:
    """A tqdm bar on a terminal; otherwise no bar (plain lines are printed per stack)."""
    if callable(progress):
        return None, progress
    if not progress or resolve_mode(True, sys.stderr) != "bars":
        return None, lambda k: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="training", unit="step", leave=True)
    return bar, bar.update


def _line(progress: bool | Callable[[int], Any], text: str) -> None:
    """One plain line on stderr when ``progress is True`` and stderr is not a terminal."""
    if progress is True and resolve_mode(True, sys.stderr) == "lines":
        print(text, file=sys.stderr, flush=True)


def train_study(
    spec: StudySpec,
    out_dir: str | Path,
    *,
    seed: int = 0,
    resume: bool = True,
    progress: bool | Callable[[int], Any] = True,
    data: StudyData | None = None,
) -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """Train every stack of ``spec`` not already checkpointed in ``out_dir/checkpoints``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the stacks are spread over the processes (largest
    first to the least loaded one); each trains and checkpoints its own, then all wait for the
    others. Every process returns all states (read back from the checkpoints).

    Returns:
        ``(states by stack key, keys of the stacks trained by this call)``.
    """
    data = load_data(spec) if data is None else data
    stacks = plan_stacks(spec, data.X.shape[1])
    states: dict[str, dict[str, Any]] = {}
    pending = []
    for stack in stacks:
        path = checkpoint_path(Path(out_dir), stack)
        if resume and path.exists():
            states[stack.key] = _load_matching(path, spec, seed, stack)
        else:
            pending.append(stack)
    world, rank = _world()
    if world > 1:
        mine = _assign(spec, pending, data.X.shape[0], world)[rank]
        pending = [pending[i] for i in mine]
        progress = progress if rank == 0 else False
    bar, update = _bar(progress, sum(spec.stop.max_steps for _ in pending))
    start = time.perf_counter()
    try:
        for i, stack in enumerate(pending):
            done = [0]

            def step(k: int, done: list[int] = done) -> None:
                done[0] += k
                update(k)

            state = train_one_stack(spec, stack, data, seed, progress=step)
            update(spec.stop.max_steps - done[0])  # a stack that stopped early
            save_checkpoint(state, checkpoint_path(Path(out_dir), stack))
            states[stack.key] = state
            _line(
                progress,
                f"training: stack {i + 1}/{len(pending)} ({stack.key}) done "
                f"[{time.perf_counter() - start:.0f} s]",
            )
    finally:
        if bar is not None:
            bar.close()
    trained = tuple(s.key for s in pending)
    if world > 1:
        trained = _gather_after_training(trained)
        for stack in stacks:
            if stack.key not in states:
                path = checkpoint_path(Path(out_dir), stack)
                states[stack.key] = _load_matching(path, spec, seed, stack)
    return states, trained


def _world() -> tuple[int, int]:
    """``(world size, rank)``; under ``torchrun`` the default group (gloo) is initialized."""
    try:
        world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        world = 1
    if world == 1:
        return 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        )
    return dist.get_world_size(), dist.get_rank()


def _assign(spec: StudySpec, stacks: Sequence[Stack], pool: int, world: int) -> list[list[int]]:
    """Indices of the stacks of every rank: largest first, to the least loaded rank."""
    load = [0.0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    cost = [stack_cost(spec, s, pool) for s in stacks]
    for i in sorted(range(len(stacks)), key=lambda i: -cost[i]):
        r = min(range(world), key=lambda k: (load[k], k))
        out[r].append(i)
        load[r] += cost[i]
    return out


def _gather_after_training(trained: tuple[str, ...]) -> tuple[str, ...]:
    """Wait for every rank's stacks (their checkpoints are then on disk); all keys trained."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, trained)
    return tuple(k for part in gathered for k in part)


def _records(spec: StudySpec, data: StudyData, states: dict[str, dict[str, Any]], seed: int):
    """TrainedModel records of the converged models and the excluded ones, in grid order."""
    from sharpgen.study._record import TrainedModel

    grid = spec.grid()
    varied = [a for a in HYPERPARAMETERS if len(spec.values(a)) > 1] + ["seed"]
    loss_fn = (
        torch.nn.functional.mse_loss if data.classes == 1 else torch.nn.functional.cross_entropy
    )
    stacks = {s.key: s for s in plan_stacks(spec, data.X.shape[1])}
    rows: list[tuple[int, Any, dict[str, Any] | None, dict[str, Any]]] = []
    for key, state in states.items():
        stack = stacks[key]
        for r, i in enumerate(state["indices"]):
            hp = {a: grid[i][a] for a in varied}
            metrics = {k: float(v[r]) for k, v in state["metrics"].items()}
            stop, diverged = int(state["stop_step"][r]), bool(state["diverged"][r])
            info = {"name": model_name(i), "stack": key, "seed": grid[i]["seed"], **grid[i]}
            info.update(stop_step=stop, diverged=diverged, **metrics)
            if diverged or stop < 0:
                why = (
                    "diverged (non-finite training loss)"
                    if diverged
                    else f"did not reach training {spec.stop.metric} <= {spec.stop.threshold:g} "
                    f"within {spec.stop.max_steps} steps "
                    f"(final {metrics['train_' + spec.stop.metric]:.4g})"
                )
                rows.append((i, None, {"name": model_name(i), "hparams": hp, "reason": why}, info))
                continue
            model = module_of(stack.arch, state["params"], r)
            names = [n for n, _ in model.named_parameters()]
            init_module = module_of(stack.arch, state["init"], r)
            init = {n: p.detach() for n, p in init_module.named_parameters()}
            assert list(init) == names
            X = data.X[state["subset"][r]]
            rec = TrainedModel(
                model_name(i), hp, model, loss_fn, (X, state["Y"][r]),
                (data.X_test, data.y_test), init_params=init, metrics=metrics,
            )  # fmt: skip
            rows.append((i, rec, None, info))
    rows.sort(key=lambda t: t[0])
    models = tuple(rec for _, rec, _, _ in rows if rec is not None)
    excluded = tuple(ex for _, _, ex, _ in rows if ex is not None)
    return models, excluded, [info for _, _, _, info in rows]


def _training_csv(infos: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(infos[0]))
    writer.writeheader()
    writer.writerows(infos)
    return buf.getvalue()


def run_study(
    spec_or_preset: StudySpec | str,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    measures: Any = None,
    measure: bool = True,
) -> StudyResult | None:
    """Train a study, measure every model, rank the measures, write the report.

    1. Trains the grid of ``spec`` stack by stack with `StackedTrainer` (models of one
       architecture, batch size, training-set size and optimizer together), writing one
       checkpoint per finished stack to ``out_dir/checkpoints``; with ``resume`` (default) a
       stack whose checkpoint exists is read instead of trained, so a killed run continues
       where it stopped. Under ``torchrun`` the stacks are spread over the processes.
    2. Writes ``out_dir/training.csv`` (every model: hyperparameters, stop step, metrics).
    3. Leaves out the models that missed the stopping rule (listed in
       ``StudyResult.excluded`` and in ``report.md``), computes every measure on the others
       (`measure_models`), ranks the measures against the generalization gap (`analyze`:
       Kendall's tau, granulated Kendall, conditional mutual information, sign-errors over
       pairs coupled by seed) and writes the report (`write_report`: ``report.md``,
       ``table.csv``, ``analysis.csv``, charts), with a section on training appended.

    The records' ``hparams`` hold the axes the spec varies plus ``"seed"``; the analysis
    groups by the axes and couples models by seed.

    Args:
        spec_or_preset: A `StudySpec` or a preset name (`STUDY_PRESETS`).
        out_dir: Output directory (created).
        resume: Read finished stacks from their checkpoints (False retrains everything).
        progress: Progress bars / lines on stderr.
        seed: The study's seed: initializations, subsets, label noise, data orders, dropout
            and the measures' randomness all derive from it.
        measures: Passed to `measure_models` (None: all of them).
        measure: False stops after training (``table`` and ``analysis`` are None).

    Returns:
        A `StudyResult` (under ``torchrun``, on rank 0; None on the other ranks).

    Raises:
        CheckpointError: A checkpoint in ``out_dir`` belongs to another study or seed (or is
            unreadable), found before anything is trained.

    Example:
        >>> import tempfile
        >>> from sharpgen.study import StopRule, StudySpec
        >>> spec = StudySpec("tiny", "xor", d=4, pool_size=16, seeds=(0, 1),
        ...                  axes={"lr": (0.05, 0.1), "batch_size": (4,)},
        ...                  stop=StopRule("error", 0.0, max_steps=300))
        >>> with tempfile.TemporaryDirectory() as out:
        ...     res = run_study(spec, out, progress=False, measures=["param_norm"])
        >>> len(res.models) + len(res.excluded), res.table.measures
        (4, ('param_norm',))
    """
    spec = _resolve(spec_or_preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(spec)
    import torch.distributed as dist

    own = not (dist.is_available() and dist.is_initialized())
    _, rank = _world()
    try:
        states, trained = train_study(
            spec, out, seed=seed, resume=resume, progress=progress, data=data
        )
    finally:
        if own and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return None
    models, excluded, infos = _records(spec, data, states, seed)
    atomic_write_text(out / "training.csv", _training_csv(infos))
    seconds = sum(float(s["seconds"]) for s in states.values())
    table = analysis = None
    if measure and models:
        from sharpgen.study._analysis import analyze
        from sharpgen.study._measures import measure_models
        from sharpgen.study._report import write_report

        g = torch.Generator().manual_seed(derive_seed("measure", seed))
        table = measure_models(models, measures, generator=g, progress=progress)
        if len(models) >= 2:
            g = torch.Generator().manual_seed(derive_seed("analyze", seed))
            analysis = analyze(table, generator=g)
            write_report(analysis, out)
        else:
            table.to_csv(out / "table.csv")
    _note_excluded(out / "report.md", spec, excluded, len(models))
    return StudyResult(spec, models, excluded, table, analysis, out, trained, seconds)


def _note_excluded(report: Path, spec: StudySpec, excluded: Sequence[dict], kept: int) -> None:
    """Append the stopping rule and the models left out to the report."""
    stop = spec.stop
    lines = [
        "",
        "## Training",
        "",
        f"Study `{spec.name}` ({kept + len(excluded)} models): every model trained until its "
        f"training {stop.metric} was <= {stop.threshold:g} (checked "
        f"{'every epoch' if stop.check_every is None else f'every {stop.check_every} steps'}"
        f", at most {stop.max_steps} steps). Per-model steps and metrics: `training.csv`.",
        "",
    ]
    if excluded:
        lines.append(f"{len(excluded)} models are left out of the analysis:")
        lines.append("")
        lines += [f"- `{e['name']}` {e['hparams']}: {e['reason']}" for e in excluded]
    else:
        lines.append("Every model met the stopping rule; none is left out.")
    text = report.read_text() if report.exists() else ""
    atomic_write_text(report, text + "\n".join(lines) + "\n")
