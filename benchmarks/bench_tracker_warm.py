"""The tracker's warm start of the top eigenvalue against a cold start, during training.

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/bench_tracker_warm.py [--quick]
        [--out warm.md]

The anchors' MLP (6,154 parameters) and CNN (21,786) of ANCHORS.md
(``bench_estimators.make_mlp``/``make_cnn``) are trained from scratch by full-batch SGD
(learning rate 0.05, float32, 1 thread). Every ``every`` steps two `SharpnessTracker`s
measure ``top_eigenvalue`` (``k=1, tol=1e-3``) of the model as it is: the default one,
which warm-starts Lanczos from the previous measurement's top eigenvector, and one with
``options={"top_eigenvalue": {"start": "auto"}}``, the gradient start of every call (a
cold start). Their order alternates between measurements. Reported: the Hessian-vector
products of all measurements after the first (the first is the same cold call for both),
the median time of one measurement, and the largest relative difference of the two
trackers' values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
warnings.filterwarnings("ignore")

import bench_estimators as BE  # noqa: E402

from sharpgen import SharpnessTracker  # noqa: E402


def run(name: str, every: int, measurements: int) -> str:
    make = BE.make_mlp if name == "MLP" else BE.make_cnn
    model, X, y = make(torch.Generator().manual_seed(0))
    model, X = model.float(), X.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw = {"every": every, "measures": ("top_eigenvalue",)}
    warm = SharpnessTracker(model, F.cross_entropy, (X, y), generator=torch.Generator(), **kw)
    cold = SharpnessTracker(model, F.cross_entropy, (X, y), generator=torch.Generator(),
                            options={"top_eigenvalue": {"start": "auto"}}, **kw)  # fmt: skip
    times: dict[str, list[float]] = {"warm": [], "cold": []}
    worst = 0.0
    for step in range(every * (measurements - 1) + 1):
        if step % every == 0:
            order = [("warm", warm), ("cold", cold)]
            records = {}
            for key, tracker in order if (step // every) % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                records[key] = tracker.step(step)
                times[key].append(time.perf_counter() - t0)
            a, b = records["warm"]["top_eigenvalue"], records["cold"]["top_eigenvalue"]
            worst = max(worst, abs(a - b) / abs(b))
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    products = {
        key: sum(r["matvecs"] for r in tracker.history[1:])
        for key, tracker in (("warm", warm), ("cold", cold))
    }
    t_warm = statistics.median(times["warm"][1:])
    t_cold = statistics.median(times["cold"][1:])
    return (
        f"| {name} | {every} | {measurements} | {products['warm']} / {products['cold']} "
        f"({products['warm'] / products['cold']:.2f}) | {t_warm * 1e3:.1f} / {t_cold * 1e3:.1f} "
        f"ms ({t_warm / t_cold:.2f}) | {worst:.1e} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the MLP every 20 steps only")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = [("MLP", 20, 9)] if args.quick else [("MLP", 20, 9), ("MLP", 200, 9), ("CNN", 20, 9)]
    load0 = open("/proc/loadavg").read().split()[:3]
    lines = [
        "| model | every | measurements | products after the first, warm / cold | "
        "one measurement, warm / cold (median) | largest value difference |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        row = run(*case)
        print(row, flush=True)
        lines.append(row)
    load1 = open("/proc/loadavg").read().split()[:3]
    head = (f"float32, 1 thread, torch {torch.__version__}; load average {' '.join(load0)} "
            f"(start) / {' '.join(load1)} (end).")  # fmt: skip
    text = head + "\n\n" + "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
