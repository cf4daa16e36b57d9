r"""Stacked training of a study's models against a loop of separate plain-torch trainings.

The models and sizes of the ``quick`` study preset (digits, 400 training points per model,
batch 32, widths 32 and 128, SGD and SAM stacks): every model takes ``--steps`` steps on the
same batches both ways.

* stacked: `sharpgen.study._stacked.StackedTrainer`, one stack per (width, optimizer);
* loop: per model an ``nn.Sequential`` with ``torch.optim.SGD``, one model after the other,
  the usual ``zero_grad / loss.backward / step`` loop; a SAM step in plain torch (gradient,
  ascent to $w + \rho g/\lVert g\rVert$, second gradient, restore, SGD step) -- the
  cheapest separate training, without `sharpgen.SAM`'s checks and state handling.

Rounds are interleaved (stacked, loop, stacked, loop, ...) in one process; the ratio of each
round and the load average (``os.getloadavg``) are printed.

Command::

    PYTHONPATH=. python benchmarks/bench_study_train.py --threads 2 --steps 100 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from sharpgen.study._data import load_data, seeded, train_subset
from sharpgen.study._presets import get_study
from sharpgen.study._stacked import StackedTrainer, init_stack, module_of
from sharpgen.study._train import plan_stacks


def _setup(steps: int):
    spec = get_study("quick")
    data = load_data(spec)
    grid = spec.grid()
    stacks = []
    for stack in plan_stacks(spec, data.X.shape[1]):
        hps = [grid[i] for i in stack.indices]
        subset = torch.stack(
            [train_subset(data, hp["train_size"], seeded("s", hp["seed"])) for hp in hps]
        )
        X, Y = data.X[subset], data.y[subset]
        params = init_stack(stack.arch, [seeded("init", hp["seed"]) for hp in hps])
        g = torch.Generator().manual_seed(0)
        n, B = X.shape[1], stack.shared["batch_size"]
        batches = [torch.randint(0, n, (len(hps), B), generator=g) for _ in range(steps)]
        stacks.append((stack, hps, X, Y, params, batches))
    return stacks


def _stacked(stacks) -> float:
    start = time.perf_counter()
    for stack, hps, X, Y, params, batches in stacks:
        P = {k: v.clone() for k, v in params.items()}
        per = {
            k: torch.tensor([float(hp[k]) for hp in hps])
            for k in ("lr", "momentum", "weight_decay", "rho", "dropout")
        }
        tr = StackedTrainer(stack.arch, P, X, Y, optimizer=stack.shared["optimizer"], **per)
        for idx in batches:
            tr.step(idx)
    return time.perf_counter() - start


def _loop(stacks) -> float:
    start = time.perf_counter()
    for stack, hps, X, Y, params, batches in stacks:
        for r, hp in enumerate(hps):
            model = module_of(stack.arch, params, r)
            kw = {"lr": hp["lr"], "momentum": hp["momentum"], "weight_decay": hp["weight_decay"]}
            opt = torch.optim.SGD(model.parameters(), **kw)
            plist = list(model.parameters())
            for idx in batches:
                xb, yb = X[r, idx[r]], Y[r, idx[r]]
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                if hp["optimizer"] == "sam":
                    with torch.no_grad():
                        grads = [p.grad.clone() for p in plist]
                        scale = hp["rho"] / torch.sqrt(sum(g.square().sum() for g in grads))
                        eps = [g * scale for g in grads]
                        for p, e in zip(plist, eps, strict=True):
                            p.add_(e)
                    opt.zero_grad()
                    F.cross_entropy(model(xb), yb).backward()
                    with torch.no_grad():
                        for p, e in zip(plist, eps, strict=True):
                            p.sub_(e)
                opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stacks = _setup(args.steps)
    models = sum(len(s[1]) for s in stacks)
    print(
        f"quick preset sizes: {models} models in {len(stacks)} stacks, {args.steps} steps each, "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    _stacked(stacks), _loop(stacks)  # warm-up
    ratios = []
    for k in range(args.rounds):
        load = os.getloadavg()[0]
        t_stack = _stacked(stacks)
        t_loop = _loop(stacks)
        ratios.append(t_loop / t_stack)
        print(
            f"round {k}: stacked {t_stack:.2f} s, loop {t_loop:.2f} s, loop/stacked "
            f"{ratios[-1]:.1f}x (load average {load:.1f})"
        )
    print(f"median loop/stacked: {statistics.median(ratios):.1f}x over {args.rounds} rounds")


if __name__ == "__main__":
    main()
