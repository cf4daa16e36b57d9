"""Throughput of the batched 1-SAM trainer against a plain PyTorch autograd 1-SAM loop.

    .venv/bin/python benchmarks/bench_trainer.py            # everything (a few minutes)
    .venv/bin/python benchmarks/bench_trainer.py --skip-quick

Prints Markdown tables:
1. 1-SAM steps per second per run: a plain autograd loop on `TwoLayerNet` (one run) against
   the batched trainer advancing R runs at once (paper sizes d=30, n=100, m=500).
2. Wall time of `sharpgen reproduce --preset quick` (3 seeds, 2 jobs).
3. Estimated time of the full-scale Table 1 runs (paper presets, 3 seeds) on this CPU from the
   measured step times, and a GPU estimate from FLOP counts and kernel-launch latency
   (an ESTIMATE: no GPU was used).
"""

from __future__ import annotations

import argparse
import time

import torch

from sharpgen.experiments import get_preset, run_experiments
from sharpgen.experiments._kernels import kernels_for
from sharpgen.experiments._spec import ExperimentSpec, Phase
from sharpgen.experiments._trainer import _epoch_indices, make_runs, run_epoch
from sharpgen.models import two_layer_relu

ARCHS = ["no_bias", "bias", "simplified_ln", "simplified_bn"]


def autograd_loop_step_time(arch: str, width: int, steps: int) -> float:
    """Seconds per 1-SAM step of the straightforward per-step autograd loop (one run)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 2, (100, 30), generator=g).float() * 2 - 1
    Y = X[:, 0] * X[:, 1]
    net = two_layer_relu(
        30,
        width,
        bias=arch != "no_bias",
        norm=arch if arch.startswith("simplified") else None,
        generator=g,
    )
    if arch == "simplified_bn":
        net.set_reference(X)
    params = list(net.parameters())
    lr, rho = 0.001, 0.05

    def step(k):
        loss = (net(X[k : k + 1]) - Y[k : k + 1]).square().mean()
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(gr.square().sum() for gr in grads))
        with torch.no_grad():
            e = [gr * (rho / norm) for gr in grads]
            for p, ei in zip(params, e, strict=True):
                p.add_(ei)
        loss = (net(X[k : k + 1]) - Y[k : k + 1]).square().mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, ei, gr in zip(params, e, grads, strict=True):
                p.sub_(ei)
                p.sub_(gr, alpha=lr)

    idx = torch.randint(0, 100, (steps,), generator=g)
    for k in idx[:20]:
        step(int(k))
    t = time.perf_counter()
    for k in idx:
        step(int(k))
    return (time.perf_counter() - t) / steps


def batched_step_time(arch: str, width: int, runs: int, epochs: int) -> float:
    """Seconds per batched 1-SAM step (all ``runs`` advance one step)."""
    spec = ExperimentSpec("bench", arch, "sam1", (Phase(epochs, 0.001, 0.05),), width=width)
    data, P, gens = make_runs(spec, list(range(runs)))
    X, Y = data[0], data[1]
    kernels = kernels_for(spec)
    with torch.no_grad():
        t = None
        for e in range(epochs + 1):
            if e == 1:
                t = time.perf_counter()
            run_epoch(spec, kernels, P, X, Y, _epoch_indices(spec, gens), 0.001, 0.05)
    return (time.perf_counter() - t) / (epochs * spec.steps_per_epoch)


def gd_step_time(arch: str, runs: int, steps: int) -> float:
    spec = ExperimentSpec(
        "bench", arch, "sgd", (Phase(steps, 0.001),), batch_size=100, weight_decay=0.05
    )
    data, P, gens = make_runs(spec, list(range(runs)))
    kernels = kernels_for(spec)
    idx = torch.arange(100).expand(runs, 1, 100)
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(steps):
            run_epoch(spec, kernels, P, data[0], data[1], idx, 0.001, 0.0)
    return (time.perf_counter() - t) / steps


def bn_profile(runs: int = 30) -> str:
    """Where a batched Sim-BN 1-SAM epoch spends its time (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    spec = ExperimentSpec("bench", "simplified_bn", "sam1", (Phase(1, 0.001, 0.05),))
    data, P, gens = make_runs(spec, list(range(runs)))
    kernels = kernels_for(spec)
    idx = _epoch_indices(spec, gens)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run_epoch(spec, kernels, P, data[0], data[1], idx, 0.001, 0.05)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def _kernels_and_flops(spec: ExperimentSpec, runs: int) -> tuple[int, float]:
    """Kernel launches and FLOPs of one batched step (rough count of the implementation)."""
    m, d, n = spec.width, spec.d, spec.n
    if spec.method == "sgd":
        return 30, runs * 8.0 * n * m * d
    if spec.arch == "simplified_bn":  # four n x (d+1) x m products and ~50 launches per step
        return 50, runs * 8.0 * n * m * (d + 1)
    return 35, runs * (4.0 * m * d + 40.0 * m)  # ~35 launches on (R, m) vectors per step


def _interleaved(arch: str, rounds: int) -> tuple[float, dict[int, float]]:
    """Autograd loop and batched step times, measured in alternating rounds (best of each)."""
    bn = arch == "simplified_bn"
    loop, batched = [], {R: [] for R in (1, 3, 10, 30)}
    for _ in range(rounds):
        loop.append(autograd_loop_step_time(arch, 500, 100 if bn else 300))
        for R in batched:
            batched[R].append(batched_step_time(arch, 500, R, 1 if bn else 3))
    return min(loop), {R: min(v) for R, v in batched.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds")
    ap.add_argument("--profile", action="store_true", help="print a Sim-BN profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")

    print("## 1-SAM steps per second per run (d=30, n=100, m=500)\n")
    print(
        "| architecture | autograd loop (1 run) | batched R=1 | R=3 | R=10 | R=30 "
        "| speed-up at R=30 |"
    )
    print("|---|---|---|---|---|---|---|")
    step_time = {}
    for arch in ARCHS:
        loop, times = _interleaved(arch, args.rounds)
        per_run = {R: R / t for R, t in times.items()}
        step_time.update({(arch, R): t for R, t in times.items()})
        cells = [f"{v:,.0f}" for v in per_run.values()]
        print(
            f"| {arch} | {1 / loop:,.0f} | " + " | ".join(cells) + f" | {per_run[30] * loop:.1f}x |"
        )
    if args.profile:
        print("\n## Profile of one Sim-BN 1-SAM epoch (R = 30, 100 steps)\n")
        print("```text\n" + bn_profile() + "\n```")
    gd = {a: gd_step_time(a, 3, 200) for a in ("no_bias", "bias")}

    if not args.skip_quick:
        print("\n## Quick preset (3 seeds, 2 jobs)\n")
        t = time.perf_counter()
        run_experiments(get_preset("quick"), [0, 1, 2], jobs=2, progress=False)
        print(f"wall time: {time.perf_counter() - t:.1f} s\n")

    print("## Full-scale Table 1 estimate (paper presets, 3 seeds batched per experiment)\n")
    print("| preset | steps per run | CPU estimate (this machine, 1 thread) | GPU estimate |")
    print("|---|---|---|---|")
    total_cpu = total_gpu = 0.0
    for spec in get_preset(
        "paper-fig1a", "paper-fig1b", "paper-fig2a", "paper-fig4a", "paper-fig4b", "paper-fig6a"
    ):
        steps = spec.epochs * spec.steps_per_epoch
        if spec.method == "sgd":
            per = gd[spec.arch]
        else:
            per = step_time[(spec.arch, 3)]
        cpu = steps * per
        kernels, flops = _kernels_and_flops(spec, 3)
        # H200-class GPU: ~8 us per kernel launch in eager PyTorch, ~50 TFLOP/s fp32
        gpu = steps * max(kernels * 8e-6, flops / 50e12)
        total_cpu += cpu
        total_gpu += gpu
        print(f"| {spec.name} | {steps:.2e} | {cpu / 3600:.1f} h | {gpu / 3600:.1f} h |")
    print(
        f"| **total (sequential)** | | **{total_cpu / 3600:.0f} h** "
        f"| **{total_gpu / 3600:.0f} h** |"
    )
    print(
        "\nGPU column: an estimate from kernel launches (~8 us each, eager mode) and FLOPs; "
        "a batched step is launch-bound on a GPU, so all seeds and architectures of one "
        "method can share a step at no extra cost. The paper reports ~12 h per 1e5 epochs."
    )


if __name__ == "__main__":
    main()
