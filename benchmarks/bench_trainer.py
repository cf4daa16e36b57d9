"""Throughput of the batched 1-SAM trainer against a plain PyTorch autograd 1-SAM loop.

    PYTHONPATH=. python benchmarks/bench_trainer.py --skip-quick --out trainer.md
    PYTHONPATH=. python benchmarks/bench_trainer.py --quick          # a smoke run (seconds)

Writes Markdown tables (to stdout, and to ``--out``):
1. 1-SAM steps per second per run: a plain autograd loop on `TwoLayerNet` (one run) against
   the batched trainer advancing R runs at once (paper sizes d=30, n=100, m=500), and the
   speed-up at R = 30 as the median (and range) over interleaved rounds.
2. With ``--compile``: `torch.compile` of the fused step, compile time and steady-state
   speed-up at R = 30 per model.
3. With ``--profile``: where a Sim-BN epoch spends its time (torch.profiler).
4. Wall time of `sharpgen reproduce --preset quick` (3 seeds, 2 jobs) unless ``--skip-quick``.
5. The full-scale Table 1 estimate (paper presets, 3 seeds) on this CPU from the measured
   step times, and a GPU estimate from FLOP counts and kernel launches (an ESTIMATE: no GPU).

Times are CPU time of this process (``time.process_time``, one thread): on a shared machine
the wall time of a 0.1 s window depends on the share of a core the process got, which made
the same ratio read 22x in one run and 66x in another; CPU time does not (the remaining
spread, cache and memory contention, is shown as a range). The load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sharpgen.experiments import get_preset, run_experiments
from sharpgen.experiments._kernels import kernels_for
from sharpgen.experiments._spec import ExperimentSpec, Phase
from sharpgen.experiments._trainer import _epoch_indices, make_runs, run_epoch
from sharpgen.models import two_layer_relu

ARCHS = ["no_bias", "bias", "simplified_ln", "simplified_bn"]
RUNS = (1, 3, 10, 30)
PAPER = ("paper-fig1a", "paper-fig1b", "paper-fig2a", "paper-fig4a", "paper-fig4b", "paper-fig6a")
clock = time.process_time


def load() -> str:
    return open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"


def autograd_loop(arch: str, width: int = 500):
    """A function timing ``steps`` 1-SAM steps of the straightforward autograd loop (one run)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 2, (100, 30), generator=g).float() * 2 - 1
    Y = X[:, 0] * X[:, 1]
    norm = arch if arch.startswith("simplified") else None
    net = two_layer_relu(30, width, bias=arch != "no_bias", norm=norm, generator=g)
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

    def timed(steps: int) -> float:
        idx = torch.randint(0, 100, (steps,), generator=g).tolist()
        t = clock()
        for k in idx:
            step(k)
        return (clock() - t) / steps

    timed(10)
    return timed


def batched(arch: str, runs: int, *, compile: bool = False, width: int = 500):
    """A function timing ``epochs`` batched 1-SAM epochs; returns seconds per batched step."""
    spec = ExperimentSpec("bench", arch, "sam1", (Phase(1, 0.001, 0.05),), width=width)
    data, P, gens = make_runs(spec, list(range(runs)))
    kernels = kernels_for(spec, compile=compile)

    def timed(epochs: int) -> float:
        with torch.no_grad():
            t = clock()
            for _ in range(epochs):
                idx = _epoch_indices(spec, gens)
                run_epoch(spec, kernels, P, data[0], data[1], idx, 1e-3, 0.05)
        return (clock() - t) / (epochs * spec.steps_per_epoch)

    timed(1)
    return timed


def gd_step_time(arch: str, runs: int, steps: int) -> float:
    spec = ExperimentSpec(
        "bench", arch, "sgd", (Phase(steps, 0.001),), batch_size=100, weight_decay=0.05
    )
    data, P, _ = make_runs(spec, list(range(runs)))
    kernels = kernels_for(spec)
    idx = torch.arange(100).expand(runs, 1, 100)
    with torch.no_grad():
        run_epoch(spec, kernels, P, data[0], data[1], idx, 0.001, 0.0)
        t = clock()
        for _ in range(steps):
            run_epoch(spec, kernels, P, data[0], data[1], idx, 0.001, 0.0)
    return (clock() - t) / steps


def speed_table(rounds: int, quick: bool) -> tuple[list[str], dict]:
    """Interleaved rounds: per round, the loop and every R once; median step times, ratios."""
    lines = [
        "| architecture | autograd loop (1 run) | batched R=1 | R=3 | R=10 | R=30 "
        "| speed-up at R=30: median (range) |",
        "|---|---|---|---|---|---|---|",
    ]
    step_time = {}
    for arch in ARCHS:
        bn = arch == "simplified_bn"
        loop = autograd_loop(arch)
        runs = {R: batched(arch, R) for R in RUNS}
        t_loop, t_runs, ratios = [], {R: [] for R in RUNS}, []
        for _ in range(rounds):
            t_loop.append(loop(30 if quick else (100 if bn else 300)))
            for R, timed in runs.items():
                t_runs[R].append(timed(1 if quick or bn else 2) / R)
            ratios.append(t_loop[-1] / t_runs[30][-1])
        med = {R: statistics.median(v) for R, v in t_runs.items()}
        step_time.update({(arch, R): med[R] * R for R in RUNS})
        cells = " | ".join(f"{1 / v:,.0f}" for v in med.values())
        lines.append(
            f"| {arch} | {1 / statistics.median(t_loop):,.0f} | {cells} | "
            f"**{statistics.median(ratios):.1f}x** ({min(ratios):.1f}-{max(ratios):.1f}) |"
        )
    return lines, step_time


def compile_table(rounds: int) -> list[str]:
    """`torch.compile` of the fused step at R = 30: compile time and steady-state speed-up."""
    lines = [
        "| architecture | compile time (wall) | eager step (R=30) | compiled step | speed-up |",
        "|---|---|---|---|---|",
    ]
    for arch in ("no_bias", "bias", "simplified_ln"):
        eager = batched(arch, 30)
        t = time.perf_counter()
        comp = batched(arch, 30, compile=True)  # its first (untimed) epoch compiles
        compile_s = time.perf_counter() - t
        e, c = [], []
        for _ in range(rounds):
            e.append(eager(1))
            c.append(comp(1))
        e_med, c_med = statistics.median(e), statistics.median(c)
        lines.append(
            f"| {arch} | {compile_s:.0f} s | {e_med * 1e6:.0f} us | {c_med * 1e6:.0f} us "
            f"| {e_med / c_med:.2f}x |"
        )
    return lines


def bn_profile(runs: int = 30) -> list[str]:
    """Where a batched Sim-BN 1-SAM epoch spends its time (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    spec = ExperimentSpec("bench", "simplified_bn", "sam1", (Phase(1, 0.001, 0.05),))
    data, P, gens = make_runs(spec, list(range(runs)))
    kernels = kernels_for(spec)
    with torch.no_grad():
        run_epoch(spec, kernels, P, data[0], data[1], _epoch_indices(spec, gens), 1e-3, 0.05)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_epoch(spec, kernels, P, data[0], data[1], _epoch_indices(spec, gens), 1e-3, 0.05)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| operator | share of CPU time | calls per epoch (100 steps) |", "|---|---|---|"]
    for e in events[:8]:
        lines.append(f"| `{e.key}` | {100 * e.self_cpu_time_total / total:.0f} % | {e.count} |")
    rest = total - sum(e.self_cpu_time_total for e in events[:8])
    lines.append(f"| everything else | {100 * rest / total:.0f} % | |")
    return lines


NO_KERNEL = set(
    "view unsqueeze squeeze select slice transpose expand as_strided reshape flatten empty "
    "empty_strided resolve_conj resolve_neg alias t detach lift_fresh _unsafe_view permute".split()
)


def launches_per_step(spec: ExperimentSpec, runs: int = 3) -> float:
    """Operators that would launch a device kernel, per batched step (counted by the profiler:
    leaf ATen calls of one epoch that are not views or allocations, divided by its steps)."""
    from torch.profiler import ProfilerActivity, profile

    data, P, gens = make_runs(spec, list(range(runs)))
    kernels = kernels_for(spec)
    idx = _epoch_indices(spec, gens)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run_epoch(spec, kernels, P, data[0], data[1], idx, 1e-3, spec.phases[0].rho)
    leaves = [
        e for e in prof.events()
        if e.name.startswith("aten::") and not e.cpu_children
        and e.name[len("aten::"):].rstrip("_") not in NO_KERNEL
    ]  # fmt: skip
    return len(leaves) / spec.steps_per_epoch


def _peak_rss_mb(arch: str, runs: int, epochs: int) -> float:
    """Peak resident memory (MB) of a fresh process that trains ``runs`` runs of ``arch``."""
    import subprocess
    import sys

    code = (
        "import resource, torch; torch.set_num_threads(1)\n"
        "from sharpgen.experiments import ExperimentSpec, Phase, train\n"
        f"spec = ExperimentSpec('m', '{arch}', 'sam1', (Phase({epochs}, 1e-4, 0.05),),"
        " eval_every=1)\n"
        f"train(spec, list(range({runs})))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def memory_table() -> list[str]:
    """Peak memory per run: (peak at R = 31 - peak at R = 1) / 30, after 2 and after 20 epochs."""
    lines = [
        "| architecture | peak per run, 2 epochs | peak per run, 20 epochs |",
        "|---|---|---|",
    ]
    for arch in ARCHS:
        cells = []
        for epochs in (2, 20):
            one, many = _peak_rss_mb(arch, 1, epochs), _peak_rss_mb(arch, 31, epochs)
            cells.append(f"{(many - one) / 30:.2f} MB")
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return lines


def _launches_and_flops(spec: ExperimentSpec, runs: int) -> tuple[float, float]:
    """Kernel launches (counted) and FLOPs (by formula) of one batched step."""
    m, d, n = spec.width, spec.d, spec.n
    launches = launches_per_step(spec.replace(phases=spec.phases[:1]), runs)
    if spec.method == "sgd":
        return launches, runs * 8.0 * n * m * d
    if spec.arch == "simplified_bn":  # four n x 32 x m products
        return launches, runs * 8.0 * n * m * 32
    return launches, runs * (4.0 * m * d + 40.0 * m)  # two (K, d) x (d, m) per step + vectors


def estimate_table(step_time: dict) -> list[str]:
    gd = {a: gd_step_time(a, 3, 200) for a in ("no_bias", "bias")}
    lines = [
        "| preset | steps per run | CPU per batched step (3 runs) | CPU estimate "
        "| launches per step | GPU estimate |",
        "|---|---|---|---|---|---|",
    ]
    total_cpu = total_gpu = 0.0
    for spec in get_preset(*PAPER):
        steps = spec.epochs * spec.steps_per_epoch
        per = gd[spec.arch] if spec.method == "sgd" else step_time[(spec.arch, 3)]
        launches, flops = _launches_and_flops(spec, 3)
        # H100/H200-class GPU, eager PyTorch: ~8 us per launch, ~50 TFLOP/s fp32 at best
        gpu = steps * max(launches * 8e-6, flops / 50e12)
        total_cpu += steps * per
        total_gpu += gpu
        lines.append(
            f"| `{spec.name}` | {steps:.0e} | {per * 1e6:,.0f} us | {steps * per / 3600:.1f} h "
            f"| {launches:.0f} | {gpu / 3600:.1f} h |"
        )
    lines.append(
        f"| **total (one after another, 1 thread)** | | | **{total_cpu / 3600:.1f} h** | "
        f"| **{total_gpu / 3600:.1f} h** |"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-quick", action="store_true", help="do not time the quick preset")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny rounds, no preset")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    ap.add_argument("--profile", action="store_true", help="a Sim-BN profile")
    ap.add_argument("--compile", action="store_true", help="torch.compile: cost and speed-up")
    ap.add_argument("--memory", action="store_true", help="peak memory per run (subprocesses)")
    ap.add_argument("--skip-speed", action="store_true", help="no speed table, no estimate")
    ap.add_argument("--out", help="also write the Markdown tables to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = [f"torch {torch.__version__}, 1 thread, CPU time; load average at start {load()}", ""]

    def emit(lines):
        print("\n".join(lines), flush=True)
        out.extend(lines)

    step_time = None
    if not args.skip_speed:
        emit(["## 1-SAM steps per second per run (d=30, n=100, m=500, float32)", ""])
        lines, step_time = speed_table(1 if args.quick else args.rounds, args.quick)
        emit(lines)
    if args.compile and not args.quick:
        emit(["", "## torch.compile of the fused step (R = 30)", ""])
        emit(compile_table(args.rounds))
    if args.profile:
        emit(["", "## Profile of one Sim-BN 1-SAM epoch (R = 30, 100 steps)", ""])
        emit(bn_profile(3 if args.quick else 30))
    if args.memory:
        emit(["", "## Peak memory per run (resident set, float32, 2000 test points)", ""])
        emit(memory_table())
    if not (args.skip_quick or args.quick):
        t = time.perf_counter()
        run_experiments(get_preset("quick"), [0, 1, 2], jobs=2, progress=False)
        emit(["", f"Quick preset (3 seeds, 2 jobs): {time.perf_counter() - t:.1f} s wall"])
    if step_time is not None:
        emit(["", "## Full-scale Table 1 estimate (paper presets, 3 seeds batched per preset)", ""])
        emit(estimate_table(step_time))
    emit(["", f"load average at the end: {load()}"])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
