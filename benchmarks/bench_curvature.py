"""Benchmark of the curvature operators (time and peak memory), with PyHessian side by side.

Measures, for a ~1M-parameter conv net and an MLP (float32, CPU, cross-entropy, one batch):

* time of one gradient (plain ``torch.autograd.grad``, the reference), of one Hessian-vector
  product of `HessianOperator` with its defaults (on a CPU double backward through the kept
  graph) and with each backend, the graph built per call unless "cache_graph=True" says
  otherwise, and per product of a k = 8 block ``matmat``;
* the time per product of PyHessian's double-backward product (graph kept between products,
  which is how PyHessian's eigenvalue/trace loops use it) on the same model and data;
* the peak-memory increase of one HVP relative to one gradient.

Timing: median of ``--repeats`` interleaved rounds (every operation once per round) after one
warm-up run, ``time.perf_counter``.

Memory: every memory cell runs in a fresh subprocess. It first runs the operation once on a
tiny model (to load lazily imported code), then builds the model, data and operator, reads
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set so far), runs
the operation once, and reports the increase of that peak. That is the extra memory the
operation needed at its high point beyond everything that existed before it (model, data,
operator); it includes the result and any allocator overhead. It is a whole-process number,
so it is honest but coarse (resolution of a few hundred kB).

Run with the benchmark environment, which has PyHessian::

    .venv-bench/bin/python benchmarks/bench_curvature.py            # full
    .venv-bench/bin/python benchmarks/bench_curvature.py --quick    # smaller batches

``--threads`` sets torch's thread count (default 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharpgen.curvature import HessianOperator  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)


# -- problems ------------------------------------------------------------------------------
def conv_net(width: int = 1) -> nn.Module:
    """~1.0M parameters at width=1 on 3x32x32 inputs."""
    c1, c2, c3 = 32 * width, 64 * width, 128 * width
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c3 * 8 * 8, 112),
        nn.ReLU(),
        nn.Linear(112, 10),
    )


def mlp(width: int = 512) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 10),
    )


def make_problem(name: str, batch: int, tiny: bool = False):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "conv":
        model = (
            conv_net()
            if not tiny
            else nn.Sequential(
                nn.Conv2d(3, 2, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(2 * 8 * 8, 10),
            )
        )
        x = torch.randn(batch, 3, 32, 32, generator=g)
    else:
        model = mlp(512 if not tiny else 8)
        x = torch.randn(batch, 784, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model.eval(), x, y


# -- operations ----------------------------------------------------------------------------
def build(method: str, model: nn.Module, x, y):
    """Return a zero-argument callable doing one operation (setup done here)."""
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    if method == "grad":
        params = list(model.parameters())

        def run():
            return torch.autograd.grad(F.cross_entropy(model(x), y), params)

        return run
    if method == "hvp_defaults":  # the operator's defaults: on a CPU double backward, kept
        H = HessianOperator(model, F.cross_entropy, (x, y))
        V = torch.randn(n, 1, generator=gen)
        return lambda: H.matmat(V)
    if method.startswith("hvp_") or method.startswith("block8_"):
        backend, *flags = method.split("_", 1)[1].split("-")
        H = HessianOperator(
            model,
            F.cross_entropy,
            (x, y),
            backend=backend,
            func_mode="forward" if "fwd" in flags else "reverse",
            cache_graph="cached" in flags,
            vectorize="vmap" in flags,
        )
        k = 8 if method.startswith("block8_") else 1
        V = torch.randn(n, k, generator=gen)
        return lambda: H.matmat(V)
    if method == "pyhessian":
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        m = copy.deepcopy(model)
        ph = hessian(m, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        v = [torch.randn(p.shape, generator=gen) for p in ph.params]
        return lambda: hessian_vector_product(ph.gradsH, ph.params, v)
    if method == "pyhessian_setup":
        from pyhessian import hessian

        def run():
            return hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False)

        return run
    raise ValueError(method)


def time_ops(fns: dict, repeats: int) -> dict[str, float]:
    """Median time of each operation; rounds interleave the operations, so that a change of
    machine load during the run affects all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_worker(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    tiny = make_problem(spec["model"], 4, tiny=True)
    build(spec["method"], *tiny)()  # load lazily imported code paths
    model, x, y = make_problem(spec["model"], spec["batch"])
    fn = build(spec["method"], model, x, y)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    fn()
    peak = _status_kib("VmHWM")
    print(json.dumps({"kib": peak - before}))


def measure_memory(model: str, method: str, batch: int, threads: int) -> float:
    spec = json.dumps({"model": model, "method": method, "batch": batch, "threads": threads})
    # A fixed mmap threshold makes glibc return every large tensor's memory to the OS on free,
    # so the resident set tracks live tensors (no reuse of memory freed during set-up).
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, __file__, "--memory-worker", spec],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["kib"] / 1024.0


def have_pyhessian() -> bool:
    try:
        import pyhessian  # noqa: F401
    except Exception:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, multi-threaded small kernels "
        "stall on descheduled threads and the timings become meaningless)",
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(json.loads(args.memory_worker))
        return
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    batches = {"conv": 32 if args.quick else 64, "mlp": 128 if args.quick else 256}
    ph = have_pyhessian()
    rows: dict[str, dict[str, str]] = {}
    for name in ("conv", "mlp"):
        model, x, y = make_problem(name, batches[name])
        nparams = sum(p.numel() for p in model.parameters())
        methods = [
            "grad",
            "hvp_defaults",
            "hvp_func",
            "hvp_func-fwd",
            "hvp_autograd",
            "hvp_func-cached",
            "hvp_autograd-cached",
            "block8_func",
            "block8_func-vmap",
            "block8_func-fwd-vmap",
            "block8_func-cached",
        ]
        if ph:
            methods += ["pyhessian", "pyhessian_setup"]
        t = time_ops({m: build(m, model, x, y) for m in methods}, repeats)
        for m in methods:
            print(f"[{name}] {m}: {t[m] * 1e3:.1f} ms", file=sys.stderr)
        mem_methods = [
            "grad",
            "hvp_defaults",
            "hvp_func",
            "hvp_func-fwd",
            "hvp_autograd",
            "block8_func",
            "block8_func-vmap",
            "hvp_func-cached",
        ]
        if ph:
            mem_methods.append("pyhessian_setup")
        mem = {m: measure_memory(name, m, batches[name], args.threads) for m in mem_methods}
        print(f"[{name}] peak memory increase MiB: {mem}", file=sys.stderr)
        g, mg = t["grad"], max(mem["grad"], 1e-9)
        col = {
            "parameters / batch size": f"{nparams:,} / {batches[name]}",
            "one gradient (reference)": f"{g * 1e3:.1f} ms, {mem['grad']:.1f} MiB",
            "HVP, operator defaults (double backward, graph kept): time per product": (
                f"{t['hvp_defaults'] / g:.2f}x"
            ),
            "HVP, operator defaults: peak memory (first call, graph built)": (
                f"{mem['hvp_defaults'] / mg:.2f}x"
            ),
            "HVP, func, reverse-over-reverse: time": f"{t['hvp_func'] / g:.2f}x",
            "HVP, func, reverse-over-reverse: peak memory": f"{mem['hvp_func'] / mg:.2f}x",
            "HVP, func, forward-over-reverse: time": f"{t['hvp_func-fwd'] / g:.2f}x",
            "HVP, func, forward-over-reverse: peak memory": f"{mem['hvp_func-fwd'] / mg:.2f}x",
            "HVP, autograd (double backward): time": f"{t['hvp_autograd'] / g:.2f}x",
            "HVP, autograd: peak memory": f"{mem['hvp_autograd'] / mg:.2f}x",
            "k=8 block, func (loop over columns): time per product": (
                f"{t['block8_func'] / 8 / g:.2f}x"
            ),
            "k=8 block, func (loop): peak memory (whole block)": f"{mem['block8_func'] / mg:.2f}x",
            "k=8 block (loop) speed-up over 8 single func HVPs": (
                f"{8 * t['hvp_func'] / t['block8_func']:.2f}x"
            ),
            "k=8 block, func with vmap: time per product": (
                f"{t['block8_func-vmap'] / 8 / g:.2f}x"
            ),
            "k=8 block, func with vmap: peak memory (whole block)": (
                f"{mem['block8_func-vmap'] / mg:.2f}x"
            ),
            "k=8 block, func with vmap, forward-over-reverse: time per product": (
                f"{t['block8_func-fwd-vmap'] / 8 / g:.2f}x"
            ),
            "HVP, func, cache_graph=True: time per product": f"{t['hvp_func-cached'] / g:.2f}x",
            "HVP, func, cache_graph=True: peak memory (first call)": (
                f"{mem['hvp_func-cached'] / mg:.2f}x"
            ),
            "HVP, autograd, cache_graph=True: time per product": (
                f"{t['hvp_autograd-cached'] / g:.2f}x"
            ),
            "k=8 block (loop), func, cache_graph=True: time per product": (
                f"{t['block8_func-cached'] / 8 / g:.2f}x"
            ),
        }
        if ph:
            ours = {
                "operator defaults": t["hvp_defaults"],
                "single func HVP": t["hvp_func"],
                "k=8 block func (loop)": t["block8_func"] / 8,
                "func cache_graph": t["hvp_func-cached"],
                "autograd cache_graph": t["hvp_autograd-cached"],
                "k=8 block func (loop) cache_graph": t["block8_func-cached"] / 8,
            }
            col["PyHessian product (graph kept): time"] = f"{t['pyhessian'] / g:.2f}x"
            col["PyHessian set-up (graph building): time, peak memory"] = (
                f"{t['pyhessian_setup'] / g:.2f}x, {mem['pyhessian_setup'] / mg:.2f}x"
            )
            for label, val in ours.items():
                col[f"time per product / PyHessian's: {label}"] = f"{val / t['pyhessian']:.2f}"
        else:
            col["PyHessian"] = "pyhessian not importable in this environment"
        rows[name] = col
    names = {"conv": "conv net", "mlp": "MLP 784-512-512-10"}
    print(
        f"\nfloat32, CPU, {args.threads} threads, torch {torch.__version__}, "
        f"median of {repeats} interleaved rounds; time and peak-memory increase relative to "
        "one gradient unless stated.\n"
    )
    print("| quantity | " + " | ".join(names[n] for n in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in rows["conv"]:
        print(f"| {key} | " + " | ".join(rows[n][key] for n in rows) + " |")


if __name__ == "__main__":
    main()
