"""The exact Hessian trace on the CPU: the default path against ``torch.func`` with ``vmap``.

On the CPU ``hessian_trace(method="exact")`` by default takes double backward through a kept
graph, one backward pass per basis vector (``backend="auto"`` -> ``"autograd"``, columns
looped; see `sharpgen.curvature._columns`). ``vectorize=True`` alone does not change that
path (it only concerns ``backend="func"``); ``backend="func", vectorize=True`` pushes each
block of basis vectors through one ``vmap``-ed reverse-over-reverse product. This script
times both (and the two half-way settings) on a tiny transformer encoder and a small conv
net, interleaved in one process, and checks that every setting gives the same trace:

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_exact_trace_backends.py

It reports process CPU seconds per call (less disturbed by a loaded machine than the wall
clock), the median over the rounds, and the ratio to the default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import sharpgen

SETTINGS = {
    "default": {},
    "vectorize=True": {"vectorize": True},
    "backend='func'": {"backend": "func"},
    "backend='func', vectorize=True": {"backend": "func", "vectorize": True},
}


def transformer() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
    )
    model = nn.Sequential(
        nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False),
        nn.Flatten(),
        nn.Linear(8 * 6, 3),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 8, generator=g)
    return model.double().eval(), (x.double(), torch.randint(0, 3, (8,), generator=g))


def convnet() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 8, 8, generator=g)
    return model.double().eval(), (x.double(), torch.randint(0, 3, (8,), generator=g))


MODELS = {"transformer": transformer, "convnet": convnet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name, build in MODELS.items():
        model, data = build()
        p = sum(t.numel() for t in model.parameters())
        times: dict[str, list[float]] = {k: [] for k in SETTINGS}
        values: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved: every setting once per round
            for key, options in SETTINGS.items():
                t0 = time.process_time()
                est = sharpgen.hessian_trace(model, F.cross_entropy, data, method="exact",
                                             **options)  # fmt: skip
                times[key].append(time.process_time() - t0)
                values[key] = est.value
        base = statistics.median(times["default"])
        print(f"\n{name}: {p} parameters, exact trace {values['default']:.12g}")
        print("| setting | CPU s (median) | ratio to default | trace rel. diff |")
        print("|---|---|---|---|")
        for key in SETTINGS:
            t = statistics.median(times[key])
            diff = abs(values[key] - values["default"]) / abs(values["default"])
            print(f"| {key} | {t:.2f} | {t / base:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
