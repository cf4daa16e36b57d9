"""Scaling of a distributed Hessian-trace estimate and the communication per product.

    .venv/bin/python benchmarks/bench_distributed.py            # 1 and 2 processes, gloo, CPU
    .venv/bin/python benchmarks/bench_distributed.py --nprocs 1 2 4 --samples 8192

For P processes (spawned here, gloo on localhost, one thread each) every process holds
N / P samples of the same dataset and runs `hessian_trace(method="hutchinson")` with a fixed
budget; the time is the slowest process's. Parallel efficiency is T(1) / (P * T(P)).
The communication volume is counted by wrapping `torch.distributed.all_reduce` during one
block product `H.matmat(V)` with k columns: the expectation is one all-reduce of
p * k + 3 float32 numbers (one parameter-sized vector per column plus the sample
count as three exact float32 limbs; one number in float64).
A row "1 process, P threads" shows the other way to use the same cores.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sharpgen.curvature import HessianOperator
from sharpgen.sharpness import hessian_trace


def problem(samples: int, width: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 32, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 10))  # fmt: skip
    return model, x, y


def measure(rank: int, world: int, args: argparse.Namespace, out: Path | None) -> dict:
    model, x, y = problem(args.samples, args.width)
    lo, hi = rank * args.samples // world, (rank + 1) * args.samples // world
    data = [(x[i : min(i + args.batch, hi)], y[i : min(i + args.batch, hi)])
            for i in range(lo, hi, args.batch)]  # fmt: skip
    loss_fn = nn.functional.cross_entropy
    group = dist.group.WORLD if world > 1 else None

    def run() -> float:
        t0 = time.perf_counter()
        hessian_trace(model, loss_fn, data, method="hutchinson", num_matvecs=args.matvecs,
                      generator=torch.Generator().manual_seed(0), process_group=group)  # fmt: skip
        return time.perf_counter() - t0

    run()  # warm-up (compilation caches, allocator)
    times = [run() for _ in range(args.repeats)]
    result = {"time": min(times), "numel": None, "bytes": [], "calls": 0}
    if group is not None:
        H = HessianOperator(model, loss_fn, data, process_group=group)
        sizes: list[int] = []
        original = dist.all_reduce

        def counting(tensor, *a, **kw):
            sizes.append(tensor.numel() * tensor.element_size())
            return original(tensor, *a, **kw)

        V = torch.randn(H.shape[0], args.block)
        dist.all_reduce = counting
        try:
            H.matmat(V)
        finally:
            dist.all_reduce = original
        flat = torch.randn(H.shape[0] * args.block + 1)
        t0 = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(flat)
        result.update(numel=H.shape[0], bytes=sizes, calls=len(sizes),
                      allreduce_s=(time.perf_counter() - t0) / 5)  # fmt: skip
    if out is not None:
        torch.save(result, out / f"r{rank}.pt")
    return result


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        measure(rank, world, args, out)
    finally:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as d, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(_worker, args=(world, port, args, Path(d)), nprocs=world, join=True)
        return [torch.load(Path(d) / f"r{r}.pt") for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--matvecs", type=int, default=16)
    parser.add_argument("--block", type=int, default=8, help="k of the counted block product")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}, cores: {os.cpu_count()}")
    rows = []
    base = None
    for world in args.nprocs:
        res = run_world(world, args)
        t = max(r["time"] for r in res)
        base = t if world == 1 else base
        rows.append((f"{world} process(es) x 1 thread", t, res[0]))
    for threads in sorted({w for w in args.nprocs if w > 1}):
        torch.set_num_threads(threads)
        t = measure(0, 1, args, None)["time"]
        rows.append((f"1 process x {threads} threads", t, None))
    print(f"\nhessian_trace(hutchinson, {args.matvecs} matvecs), {args.samples} samples, "
          f"width {args.width}; load average after: {os.getloadavg()}\n")  # fmt: skip
    print("| setup | time (s) | speed-up | parallel efficiency |")
    print("|---|---|---|---|")
    for name, t, _ in rows:
        procs = int(name.split()[0]) if "process(es)" in name else 1
        speed = base / t if base else float("nan")
        eff = speed / procs if "process(es)" in name else float("nan")
        eff_s = f"{eff:.0%}" if eff == eff else "-"
        print(f"| {name} | {t:.3f} | {speed:.2f}x | {eff_s} |")
    print(
        "\n| processes | parameters p | block k | all-reduce calls per block product | "
        "bytes per call | expected (p*k+3)*4 | one all-reduce (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, _, r in rows:
        if r is not None and r["numel"] is not None:
            expected = (r["numel"] * args.block + 3) * 4  # float32: count in 3 limbs
            print(
                f"| {name.split()[0]} | {r['numel']} | {args.block} | {r['calls']} | "
                f"{', '.join(map(str, r['bytes']))} | {expected} | {r['allreduce_s']:.4f} |"
            )


if __name__ == "__main__":
    main()
