r"""The batched trainer: many independent runs of one `ExperimentSpec` advance together.

Every run (one per seed) owns a ``torch.Generator`` seeded with its seed, used in this order:
training and test set (`sharpgen.data.xor_cube` / `sharpgen.data.uniform_ball`),
initialization (`sharpgen.models.two_layer_relu`, so a run starts from exactly the
`TwoLayerNet` the same generator would build), then the example indices, drawn at
the start of every epoch (``n`` uniform indices with replacement, or one permutation). A run
therefore does not depend on which other runs share its batch, and a run done alone with
plain autograd on the `TwoLayerNet` takes the same steps (tested to float tolerance).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sharpgen.data import uniform_ball, xor_cube
from sharpgen.experiments._checkpoint import (
    CheckpointError,
    load_checkpoint,
    restart_hint,
    save_checkpoint,
    spec_differences,
)
from sharpgen.experiments._fused import project
from sharpgen.experiments._kernels import Kernels, kernels_for
from sharpgen.experiments._spec import ExperimentSpec
from sharpgen.models import deep_relu, two_layer_relu
from sharpgen.theory import trace_lower_bound

__all__ = ["RunResult", "train", "make_runs", "lower_bound"]

METRICS = (
    "train_loss",
    "test_accuracy",
    "test_mse",
    "trace",
    "trace_gn",
    "trace_ratio",
    "norm_W1",
    "norm_b1",
    "norm_gamma",
    "norm_W2",
)


@dataclass(frozen=True)
class RunResult:
    """Metric histories of the runs of one `ExperimentSpec` (one row per seed).

    Attributes:
        spec: The experiment.
        seeds: One seed per run.
        epochs: The epochs at which metrics were recorded.
        metrics: Metric name -> list (one per seed) of lists (one per recorded epoch). Names:
            ``train_loss``, ``test_accuracy`` (zero-one, sign(f) against y; f = 0 is wrong),
            ``test_mse``, ``trace`` (exact Hessian trace of the training loss, closed form),
            ``trace_gn`` (its Gauss-Newton part, equal to the trace at interpolation),
            ``trace_ratio`` (``trace_gn`` / `lower_bound`, NaN where no bound is known),
            ``norm_W1``, ``norm_b1``, ``norm_gamma``, ``norm_W2`` (Frobenius norms).
        lower_bound: Known lower bound of the trace over interpolators, per seed (NaN if none).
        wall_time_s: Seconds spent training (summed over resumed segments).
        steps: Optimizer steps taken by every run.
        params: Final parameters, stacked over runs (``W1 (R, m, d)``, ``b1``, ``gamma``,
            ``W2 (R, m)``); not part of `to_dict`.
        error: Why the experiment failed (it diverged), or None; a failed result has no
            metrics (``run_experiments(..., keep_going=True)`` returns one).
    """

    spec: ExperimentSpec
    seeds: tuple[int, ...]
    epochs: tuple[int, ...]
    metrics: dict[str, list[list[float]]]
    lower_bound: tuple[float, ...]
    wall_time_s: float
    steps: int
    params: dict[str, Tensor] | None = field(default=None, compare=False, repr=False)
    error: str | None = None

    def final(self, name: str) -> list[float]:
        """The last recorded value of a metric, per seed."""
        return [row[-1] for row in self.metrics[name]]

    def to_dict(self) -> dict:
        """A JSON-serializable dict (``from_dict`` inverts it)."""
        out = {
            "spec": self.spec.to_dict(),
            "seeds": list(self.seeds),
            "epochs": list(self.epochs),
            "metrics": self.metrics,
            "lower_bound": list(self.lower_bound),
            "wall_time_s": self.wall_time_s,
            "steps": self.steps,
        }
        return out if self.error is None else {**out, "error": self.error}

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        """Inverse of `to_dict`."""
        return cls(
            spec=ExperimentSpec.from_dict(data["spec"]),
            seeds=tuple(data["seeds"]),
            epochs=tuple(data["epochs"]),
            metrics=data["metrics"],
            lower_bound=tuple(data["lower_bound"]),
            wall_time_s=data["wall_time_s"],
            steps=data["steps"],
            error=data.get("error"),
        )


def lower_bound(spec: ExperimentSpec, X: Tensor, Y: Tensor) -> float:
    r"""The known lower bound of the Hessian trace over interpolators of one training set.

    `sharpgen.theory.trace_lower_bound` for the MSE loss (Wen, Li & Ma 2023): on xor data
    $4\sqrt d$ (no bias), $4\sqrt{d+1}$ (bias), 4 (simplified BatchNorm, an infimum that is
    not attained) and 2 (simplified LayerNorm); $2D(d+1)^{1/D}$ for depth-$D$ nets with bias
    in the first layer; NaN for the logistic loss and the softplus activation.
    """
    if spec.loss != "mse" or spec.activation != "relu":
        return math.nan
    eps = spec.eps if spec.arch == "simplified_ln" else None
    return float(trace_lower_bound(X, Y, spec.arch, eps=eps, depth=spec.depth))


def make_runs(
    spec: ExperimentSpec, seeds: Sequence[int], device: str | torch.device = "cpu"
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], dict[str, Tensor], list[torch.Generator]]:
    """Data, initial parameters and generators of the runs (one per seed).

    Returns:
        ``(data, params, generators)``: ``data = (X, Y, X_test, Y_test)`` stacked over runs,
        ``params`` the stacked parameter dict ``W1 (R, m, d)``, ``b1``, ``gamma``, ``W2``
        ``(R, m)``, and the per-run generators (on the CPU) positioned after initialization.
    """
    dtype = getattr(torch, spec.dtype)
    kernels = kernels_for(spec)
    data, params, gens = [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        make_data = xor_cube if spec.data == "xor_cube" else uniform_ball
        split = make_data(spec.d, spec.n, generator=g, test_size=spec.test_size, dtype=dtype)
        assert split.X_test is not None and split.y_test is not None  # test_size >= 1
        data.append((split.X, split.y, split.X_test, split.y_test))
        scales = {
            "init_scale": spec.init_scale,
            "first_layer_init_scale": spec.first_layer_init_scale,
            "activation": spec.activation,
            "generator": g,
            "dtype": dtype,
        }
        net: torch.nn.Module
        if spec.depth > 2:
            net = deep_relu(spec.d, [spec.width] * (spec.depth - 1), **scales)
        else:
            net = two_layer_relu(
                spec.d,
                spec.width,
                bias=spec.arch != "no_bias",
                norm=spec.arch if spec.arch.startswith("simplified") else None,
                eps=spec.eps,
                **scales,
            )
        p = {k: v.detach().clone() for k, v in net.named_parameters()}
        params.append(kernels.complete(p))
        gens.append(g)
    X, Y, X_test, Y_test = (torch.stack([run[i] for run in data]).to(device) for i in range(4))
    stacked = (X, Y, X_test, Y_test)
    P = {k: torch.stack([p[k] for p in params]).to(device) for k in params[0]}
    return stacked, P, gens


def _epoch_indices(spec: ExperimentSpec, gens: list[torch.Generator]) -> Tensor:
    """Example indices of one epoch for every run, shape ``(R, steps, batch)``."""
    n, B, S = spec.n, spec.batch_size, spec.steps_per_epoch
    rows = []
    for g in gens:
        if spec.batch_size == n:
            idx = torch.arange(n)
        elif spec.sampling == "uniform":
            idx = torch.randint(0, n, (S * B,), generator=g)
        else:
            idx = torch.randperm(n, generator=g)
        rows.append(idx.reshape(S, B))
    return torch.stack(rows)


def _phase_at(spec: ExperimentSpec, epoch: int):
    start = 0
    for phase in spec.phases:
        if epoch < start + phase.epochs:
            return phase
        start += phase.epochs
    return spec.phases[-1]


def _record(spec, kernels: Kernels, P, data, bounds, history) -> None:
    X, Y, Xt, Yt = data
    idx = torch.arange(spec.n, device=X.device).expand(X.shape[0], -1)
    train_loss, _ = kernels.loss_and_grad(P, X, Y, idx)
    ft = kernels.forward(P, Xt, X)
    acc = (torch.sign(ft) == Yt.sign()).to(X.dtype).mean(1)
    if spec.data != "xor_cube":
        acc = torch.full_like(acc, math.nan)
    mse = (ft - Yt).square().mean(1)
    trace, gn = kernels.trace_terms(P, X, Y)
    names = kernels.names(P)
    values = {
        "train_loss": train_loss,
        "test_accuracy": acc,
        "test_mse": mse,
        "trace": trace,
        "trace_gn": gn,
        "trace_ratio": gn / bounds,
    }
    for k in ("W1", "b1", "gamma", "W2"):
        if k in names:
            values[f"norm_{k}"] = P[k].flatten(1).norm(dim=1)
        else:
            values[f"norm_{k}"] = torch.full_like(train_loss, math.nan)
    for k in history:
        history[k].append(values[k].double().cpu().tolist())


def _sam_step(spec, kernels: Kernels, P, X, Y, idx, lr: float, rho: float) -> None:
    r"""One reference step (1-SAM / projected 1-SAM / SGD with weight decay) on any batch.

    The 1-SAM ascent point is $P + s\,g$ with $s = \rho/\lVert g\rVert$ over the trained
    parameters of each run ($s = 0$ where $g = 0$); the fused epochs use the same formula.
    """
    names = kernels.names(P)
    _, g = kernels.loss_and_grad(P, X, Y, idx)
    if spec.method != "sgd" and rho != 0:
        sq = sum(g[k].flatten(1).square().sum(1) for k in names)
        norm = sq.sqrt()
        scale = torch.where(norm > 0, rho / torch.where(norm > 0, norm, 1.0), 0.0)
        Q = dict(P)
        for k in names:
            Q[k] = P[k] + scale.view(-1, *([1] * (P[k].ndim - 1))) * g[k]
        _, g = kernels.loss_and_grad(Q, X, Y, idx)
    wd = spec.weight_decay if spec.method == "sgd" else 0.0
    for k in names:
        if wd:
            P[k].sub_(lr * (g[k] + wd * P[k]))
        else:
            P[k].sub_(lr * g[k])
    if spec.method == "projected_sam1":
        project(P, spec.projection_radius)


def run_epoch(spec, kernels: Kernels, P, X, Y, indices, lr: float, rho: float) -> None:
    """Advance every run by one epoch (indices ``(R, steps, batch)``), fused where possible."""
    fused = kernels.fused_sam1_epoch()
    if fused is not None:
        fused(P, X, Y, indices, lr, rho)
        return
    for t in range(indices.shape[1]):
        _sam_step(spec, kernels, P, X, Y, indices[:, t], lr, rho)


_STATE_KEYS = (
    "spec",
    "seeds",
    "epoch",
    "params",
    "generators",
    "data",
    "history",
    "epochs",
    "lower_bound",
    "wall_time_s",
)


def check_checkpoint(checkpoint: str | Path, spec: ExperimentSpec, seeds: Sequence[int]) -> dict:
    """The trainer state in ``checkpoint``, checked to belong to ``spec`` and ``seeds``.

    Raises:
        CheckpointError: If the file is unreadable, is not a trainer checkpoint, or belongs
            to another experiment or other seeds; the message says how to proceed.
    """
    seeds = tuple(int(s) for s in seeds)
    state = load_checkpoint(checkpoint)
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not a sharpgen trainer checkpoint (it lacks "
            f"{', '.join(missing[:3])}); {restart_hint(checkpoint)}"
        )
    differ = spec_differences(state["spec"], spec.to_dict())
    if differ or tuple(state["seeds"]) != seeds:
        other = state["spec"].get("name", "?") if isinstance(state["spec"], dict) else "?"
        what = f"; settings that differ: {', '.join(differ)}" if differ else ""
        raise CheckpointError(
            f"checkpoint {checkpoint} belongs to a different experiment or seeds ({other!r}, "
            f"seeds {list(state['seeds'])}, not {spec.name!r}, seeds {list(seeds)}{what}); "
            f"{restart_hint(checkpoint)}"
        )
    return state


def train(
    spec: ExperimentSpec,
    seeds: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    checkpoint_every_s: float = 30.0,
    progress: Callable[[int], None] | None = None,
    stop_after_epochs: int | None = None,
    compile: bool = False,
) -> RunResult:
    r"""Train every seed's run of ``spec`` together, batched along a leading run dimension.

    Args:
        spec: The experiment.
        seeds: One run per seed (distinct integers).
        device: Where to train (``"cpu"`` or ``"cuda"``).
        checkpoint: File to write checkpoints to (atomically, at epoch boundaries, at most
            every ``checkpoint_every_s`` seconds and at the end).
        resume: Continue from ``checkpoint`` if it exists; the result is then bitwise
            identical to an uninterrupted run.
        checkpoint_every_s: Minimum seconds between checkpoints.
        progress: Called with the number of epochs just completed (e.g. ``tqdm.update``);
            on resume first with the number of epochs the checkpoint had done.
        stop_after_epochs: Stop (after checkpointing) once this many epochs are done in
            total; for tests and time-sliced jobs.
        compile: Run the fused 1-SAM step of the no-bias, bias and simplified-LayerNorm nets
            through `torch.compile` (20-50 s to compile on a CPU, then 1.3-1.5x faster per step
            at 30 runs; worth it for runs of an hour or more). Results equal the eager ones to
            float rounding, not bitwise.

    Returns:
        A `RunResult`.

    Raises:
        ValueError: For empty or repeated seeds.
        CheckpointError: (a `ValueError`) for a checkpoint that is unreadable or belongs to
            another experiment or other seeds; nothing is trained.
        FloatingPointError: If a run's parameters become non-finite (divergence).

    Examples:
        >>> from sharpgen.experiments import ExperimentSpec, Phase, train
        >>> spec = ExperimentSpec("tiny", "no_bias", "sam1", (Phase(2, 0.05, 0.05),),
        ...                       d=4, n=8, width=16, test_size=16, eval_every=1)
        >>> result = train(spec, seeds=[0, 1])
        >>> result.epochs, len(result.metrics["trace"])
        ((0, 1, 2), 2)
    """
    seeds = tuple(int(s) for s in seeds)
    kernels = kernels_for(spec, compile=compile)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds!r} must be a non-empty sequence of distinct integers")
    state = None
    if checkpoint is not None and resume and Path(checkpoint).exists():
        state = check_checkpoint(checkpoint, spec, seeds)
    if state is None:
        data, P, gens = make_runs(spec, seeds, device)
        X, Y = data[0], data[1]
        bounds_list = [lower_bound(spec, X[r].cpu(), Y[r].cpu()) for r in range(len(seeds))]
        history: dict[str, list[Any]] = {k: [] for k in METRICS}
        epochs: list[int] = []
        epoch, wall = 0, 0.0
        bounds = torch.tensor(bounds_list, dtype=X.dtype, device=device)
        _record(spec, kernels, P, data, bounds, history)
        epochs.append(0)
    else:
        data = tuple(t.to(device) for t in state["data"])
        P = {k: v.to(device) for k, v in state["params"].items()}
        gens = []
        for s in state["generators"]:
            g = torch.Generator()
            g.set_state(s)
            gens.append(g)
        history, epochs = state["history"], state["epochs"]
        epoch, wall = state["epoch"], state["wall_time_s"]
        bounds_list = state["lower_bound"]
        bounds = torch.tensor(bounds_list, dtype=data[0].dtype, device=device)
    X, Y = data[0], data[1]

    def snapshot():
        return {
            "spec": spec.to_dict(),
            "seeds": list(seeds),
            "epoch": epoch,
            "params": {k: v.cpu() for k, v in P.items()},
            "generators": [g.get_state() for g in gens],
            "data": [t.cpu() for t in data],
            "history": history,
            "epochs": epochs,
            "lower_bound": bounds_list,
            "wall_time_s": wall,
        }

    last_save = time.monotonic()
    total = spec.epochs if stop_after_epochs is None else min(spec.epochs, stop_after_epochs)
    started = time.perf_counter()
    first_epoch, final_wall = epoch, None
    if progress is not None and first_epoch > 0:
        progress(first_epoch)  # resumed: the epochs done before count as done
    with torch.no_grad():
        while epoch < total:
            phase = _phase_at(spec, epoch)
            lr, rho = float(phase.lr), float(phase.rho)
            indices = _epoch_indices(spec, gens).to(device)
            run_epoch(spec, kernels, P, X, Y, indices, lr, rho)
            epoch += 1
            if epoch % spec.eval_every == 0 or epoch == spec.epochs:
                if not all(bool(torch.isfinite(v).all()) for v in P.values()):
                    raise FloatingPointError(
                        f"{spec.name}: parameters became non-finite by epoch {epoch} "
                        f"(lr={lr}, rho={rho}); the run diverged, lower the learning rate"
                    )
                _record(spec, kernels, P, data, bounds, history)
                epochs.append(epoch)
            if progress is not None:
                progress(1)
            if checkpoint is not None and (
                time.monotonic() - last_save >= checkpoint_every_s or epoch == total
            ):
                wall_now = wall + time.perf_counter() - started
                state_now = snapshot()
                state_now["wall_time_s"] = wall_now
                save_checkpoint(state_now, checkpoint)
                last_save = time.monotonic()
                if epoch == total:
                    final_wall = wall_now
    if final_wall is not None:
        wall = final_wall
    elif epoch > first_epoch:
        wall += time.perf_counter() - started
    return RunResult(
        spec=spec,
        seeds=seeds,
        epochs=tuple(epochs),
        metrics={k: [list(row) for row in zip(*v, strict=False)] for k, v in history.items()},
        lower_bound=tuple(bounds_list),
        wall_time_s=wall,
        steps=epoch * spec.steps_per_epoch,
        params={k: v.detach().cpu() for k, v in P.items()},
    )
