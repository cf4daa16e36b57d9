"""Before/after of the fused Sim-BN 1-SAM epoch: an older revision's kernel against this one.

    PYTHONPATH=. python benchmarks/ab_trainer.py --old f8f632d

Loads ``sam1_bn_epoch`` (and its helper) from ``sharpgen/experiments/_fused.py`` at the git
revision ``--old`` (the last version before the packed, padded step), runs it and the current
one alternately on the same runs and examples (CPU time, one thread, float32, paper size),
checks that both give the same parameters, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types

import torch

from sharpgen.experiments import _fused
from sharpgen.experiments._spec import ExperimentSpec, Phase
from sharpgen.experiments._trainer import _epoch_indices, make_runs


def old_bn_epoch(rev: str):
    """The revision's ``sam1_bn_epoch`` (its Sim-BN part only, which imports little)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:sharpgen/experiments/_fused.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    code = src[src.index("def sam1_bn_epoch(") :]
    module = types.ModuleType("old_fused")
    exec(  # the repository's own code at another revision
        "import math\nimport torch\nfrom torch import Tensor\n"
        "from sharpgen.experiments._batched import loss_derivatives\n" + code,
        module.__dict__,
    )
    return module.sam1_bn_epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default="f8f632d", help="git revision of the 'before' kernel")
    ap.add_argument("--epochs", type=int, default=6, help="alternating epochs (first dropped)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = old_bn_epoch(args.old)
    load = open("/proc/loadavg").read().split()[0]
    print(f"Sim-BN 1-SAM epoch, {args.old} against this tree; CPU time; load at start {load}\n")
    print("| R | before (per batched step) | after | speed-up: median (range) "
          "| useful FLOP rate after | max parameter difference (float32) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for R in (3, 30):
        spec = ExperimentSpec("ab", "simplified_bn", "sam1", (Phase(1, 1e-3, 0.05),))
        (X, Y, _, _), P, gens = make_runs(spec, list(range(R)))
        Q = {k: v.clone() for k, v in P.items()}
        t_old, t_new = [], []
        for e in range(args.epochs):
            idx = _epoch_indices(spec, gens)[:, :, 0]
            t = time.process_time()
            old(Q, X, Y, idx, lr=1e-3, rho=0.05)
            a = time.process_time() - t
            t = time.process_time()
            _fused.sam1_bn_epoch(P, X, Y, idx, hd=_fused.Head(), lr=1e-3, rho=0.05)
            b = time.process_time() - t
            if e:
                t_old.append(a)
                t_new.append(b)
        diff = max(float((P[k] - Q[k]).abs().max()) for k in P)
        o, n = statistics.median(t_old) / 100, statistics.median(t_new) / 100
        ratios = [a / b for a, b in zip(t_old, t_new, strict=True)]
        rate = 8 * spec.n * spec.width * (spec.d + 1) * R / n / 1e9
        print(
            f"| {R} | {o * 1e3:.2f} ms | {n * 1e3:.2f} ms | **{statistics.median(ratios):.2f}x** "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {rate:.0f} GFLOP/s | {diff:.1e} |"
        )
    print(f"\nload at the end {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
