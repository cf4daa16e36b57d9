"""A study's models grouped into stacks, each trained by the stacked trainer and saved.

A *stack* is the models of a `StudySpec` that share an architecture, batch size, training-set
size and optimizer (`STACK_KEYS`); they differ in learning rate, momentum, weight decay, SAM
radius, dropout, label noise and seed, and train together (`sharpgen.study._stacked`). A
stack's result (final and initial parameters, stop steps, metrics) is one checkpoint file, so
an interrupted study resumes at the first unfinished stack.

Randomness, all derived from the study ``seed`` with `derive_seed`: model seed ``s`` fixes the
initialization (``("init", seed, s)``), the training subset (``("subset", ...)``), the label
noise (``("noise", ...)``) and the data order (``("order", ...)``), each on its own generator,
so models with the same seed share them wherever their shapes allow; dropout masks come from
the stack's generator ``("dropout", seed, stack key)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sharpgen.study._data import StudyData, corrupt_labels, seeded, train_subset
from sharpgen.study._spec import STACK_KEYS, StudySpec
from sharpgen.study._stacked import Arch, StackedTrainer, init_stack, train_stack

__all__ = ["Stack", "plan_stacks", "train_one_stack", "stack_cost"]

PER_MODEL = ("lr", "momentum", "weight_decay", "rho", "dropout")


@dataclass(frozen=True)
class Stack:
    """Models trained together: their grid indices and shared settings.

    Attributes:
        key: File-name-safe identifier, e.g. ``"w64-d1-bias-b32-nall-sgd"``.
        arch: The shared architecture.
        shared: The `STACK_KEYS` values.
        indices: Grid indices of the models (into `StudySpec.grid`).
    """

    key: str
    arch: Arch
    shared: dict[str, Any]
    indices: tuple[int, ...]


def model_name(index: int) -> str:
    """The name of grid model ``index`` (``"m007"``)."""
    return f"m{index:03d}"


def plan_stacks(spec: StudySpec, d: int) -> list[Stack]:
    """The stacks of ``spec`` (input size ``d``), in the order of their first model."""
    groups: dict[tuple, list[int]] = {}
    grid = spec.grid()
    for i, hp in enumerate(grid):
        groups.setdefault(tuple(hp[k] for k in STACK_KEYS), []).append(i)
    out = []
    for values, idx in groups.items():
        sh = dict(zip(STACK_KEYS, values, strict=True))
        n = "all" if sh["train_size"] is None else sh["train_size"]
        key = (
            f"w{sh['width']}-d{sh['depth']}-{'bias' if sh['bias'] else 'nobias'}-"
            f"b{sh['batch_size']}-n{n}-{sh['optimizer']}"
        )
        arch = Arch(spec.model, d, sh["width"], sh["depth"], spec.classes, sh["bias"])
        out.append(Stack(key, arch, sh, tuple(idx)))
    return out


def stack_cost(spec: StudySpec, stack: Stack, pool: int) -> float:
    """Rough work of a stack (for spreading stacks over processes): models x steps x size."""
    sizes = [stack.arch.d] + [stack.arch.width] * stack.arch.depth + [stack.arch.outputs]
    flops = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))
    batch = min(stack.shared["batch_size"], stack.shared["train_size"] or pool)
    factor = 1.0 if stack.shared["optimizer"] == "sgd" else 2.0
    return len(stack.indices) * spec.stop.max_steps * (batch * flops * factor + 2000.0)


def train_one_stack(
    spec: StudySpec,
    stack: Stack,
    data: StudyData,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train one stack; returns its checkpoint state (tensors, lists and numbers only)."""
    grid = spec.grid()
    hps = [grid[i] for i in stack.indices]
    dtype = getattr(torch, spec.dtype)
    subset = torch.stack(
        [train_subset(data, hp["train_size"], seeded("subset", seed, hp["seed"])) for hp in hps]
    )
    X = data.X[subset]
    Y = torch.stack(
        [
            corrupt_labels(
                data.y[idx], hp["label_noise"], data.classes, seeded("noise", seed, hp["seed"])
            )
            for idx, hp in zip(subset, hps, strict=True)
        ]
    )
    params = init_stack(stack.arch, [seeded("init", seed, hp["seed"]) for hp in hps], dtype)
    init = {k: v.clone() for k, v in params.items()}
    per = {k: torch.tensor([float(hp[k]) for hp in hps], dtype=dtype) for k in PER_MODEL}
    trainer = StackedTrainer(
        stack.arch, params, X, Y, optimizer=stack.shared["optimizer"],
        generator=seeded("dropout", seed, stack.key), **per,
    )  # fmt: skip
    start = time.perf_counter()
    outcome = train_stack(
        trainer,
        [seeded("order", seed, hp["seed"]) for hp in hps],
        batch_size=stack.shared["batch_size"],
        metric=spec.stop.metric,
        threshold=spec.stop.threshold,
        max_steps=spec.stop.max_steps,
        check_every=spec.stop.check_every,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    train_loss, train_error = trainer.evaluate(X, Y)
    R = X.shape[0]
    Xt = data.X_test.expand(R, *data.X_test.shape)
    Yt = data.y_test.expand(R, *data.y_test.shape)
    test_loss, test_error = trainer.evaluate(Xt, Yt)
    return {
        "spec": spec.to_dict(),
        "seed": seed,
        "key": stack.key,
        "indices": list(stack.indices),
        "params": params,
        "init": init,
        "subset": subset,
        "Y": Y,
        "stop_step": outcome.stop_step,
        "diverged": outcome.diverged,
        "steps": outcome.steps,
        "metrics": {
            "train_loss": train_loss,
            "train_error": train_error,
            "test_loss": test_loss,
            "test_error": test_error,
        },
        "seconds": seconds,
    }


def checkpoint_path(out_dir: Path, stack: Stack) -> Path:
    """Where a stack's checkpoint lives."""
    return Path(out_dir) / "checkpoints" / f"{stack.key}.pt"
