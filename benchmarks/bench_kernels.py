"""Per-product kernels in raw torch, side by side with curvlinops and PyHessian's kept graph.

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/bench_kernels.py [--quick]
        [--models mlp,cnn,conv1m,mlp1m] [--k 32] [--rounds 5] [--memory] [--out kernels.md]

The evidence behind the backend rule of `sharpgen.curvature` (``backend="auto"``): for the
anchors' MLP (6,154 parameters, 512 samples) and CNN (21,786 parameters, 256 images) and
the ~1M-parameter models of ``bench_curvature.py``, float32, 1 thread, the time of

* one Hessian-vector product: double backward (graph built per call), the kept graph
  (PyHessian's way: only the second backward per product), ``torch.func`` reverse- and
  forward-over-reverse, a ``torch.func.linearize``-d gradient, curvlinops;
* a block of ``k`` columns, per column: a loop over the columns on a kept graph, one
  batched backward (``is_grads_batched=True``) on a kept graph or on a fresh one, ``vmap``
  over a ``vjp`` with the forward shared, ``vmap`` over ``jvp`` (curvlinops' way), ``vmap``
  over a linearized gradient, and curvlinops itself;
* the same products through sharpgen's public operator, ``HessianOperator(...).matmat``
  with the operator's defaults (``cache_graph="auto"``: the graph kept, double backward on
  a CPU, the columns of a block looped) and with ``cache_graph=False`` (graph built per
  call), and the ratios of the targets (block per column against curvlinops, one product
  against PyHessian's kept graph);
* with ``--memory``: the peak memory of each block product, as the growth of the peak
  resident set size (``VmHWM``, reset after the set-up) of a fresh subprocess over its
  resident set after the set-up (model, data and operators built first; the raw "kept"
  kernels' graph is built in the set-up, so it is not counted, while the sharpgen
  operator's kept graph is built by its first call and is counted);
* with ``--probe-cpu``: the operators probe loop against batched backward on the CPU too
  (``PROBE_ON_CPU``), and the choice each made is printed;

relative to one gradient, medians of interleaved rounds. The machine is shared and loaded:
read the ratios.
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
from torch import nn
from torch.func import functional_call, grad, jvp, linearize, vjp, vmap

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
warnings.filterwarnings("ignore")

import bench_curvature as BC  # noqa: E402
import bench_estimators as BE  # noqa: E402


def problems(which):
    g = torch.Generator().manual_seed(0)
    out = {}
    if "mlp" in which:
        m, X, y = BE.make_mlp(g)
        out["anchor MLP 6k"] = (m.float().eval(), X.float(), y)
    if "cnn" in which:
        m, X, y = BE.make_cnn(torch.Generator().manual_seed(0))
        out["anchor CNN 22k"] = (m.float().eval(), X.float(), y)
    if "conv1m" in which:
        out["conv 1.0M"] = BC.make_problem("conv", 64)
    if "mlp1m" in which:
        out["MLP 670k"] = BC.make_problem("mlp", 256)
    return out


def kernels(model, X, y, k):
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p for _, p in model.named_parameters())
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(1)
    v = tuple(torch.randn(p.shape, generator=gen) for p in params)
    V = tuple(torch.randn((k, *p.shape), generator=gen) for p in params)

    def f(*ps):
        return F.cross_entropy(functional_call(model, dict(zip(names, ps, strict=True)), (X,)), y)

    gf = grad(f, argnums=tuple(range(len(params))))
    out = {}
    out["grad"] = lambda: torch.autograd.grad(F.cross_entropy(model(X), y), params)

    def dbl():
        g = torch.autograd.grad(F.cross_entropy(model(X), y), params, create_graph=True)
        return torch.autograd.grad(g, params, v)

    out["hvp dbl-backward"] = dbl
    kept = torch.autograd.grad(F.cross_entropy(model(X), y), params, create_graph=True)
    out["hvp kept graph"] = lambda: torch.autograd.grad(kept, params, v, retain_graph=True)
    from sharpgen.curvature import HessianOperator

    data = (X, y)
    # the defaults keep the graph (cache_graph="auto"); "per call" builds it every product
    H_default = HessianOperator(model, F.cross_entropy, data, max_block=None)
    H_call = HessianOperator(model, F.cross_entropy, data, cache_graph=False, max_block=None)
    DEFAULT_OPERATOR[:] = [H_default]
    flat_v = torch.cat([t.reshape(-1) for t in v])
    flat_V = torch.cat([t.reshape(k, -1) for t in V], 1).T.contiguous()
    out["hvp sharpgen operator default"] = lambda: H_default.matvec(flat_v)
    out["hvp sharpgen operator per call"] = lambda: H_call.matvec(flat_v)
    out[f"block{k} sharpgen operator default"] = lambda: H_default.matmat(flat_V)
    out[f"block{k} sharpgen operator per call"] = lambda: H_call.matmat(flat_V)
    # torch.func on detached parameters (as sharpgen's func backend and curvlinops, under
    # no_grad): no outer autograd graph is recorded
    fp = tuple(p.detach() for p in params)
    out["hvp func rev (vjp)"] = lambda: vjp(gf, *fp)[1](v)
    out["hvp func fwd (jvp)"] = lambda: jvp(gf, fp, v)[1]
    _, lin = linearize(lambda *ps: gf(*ps), *fp)
    out["hvp linearized jvp"] = lambda: lin(*v)

    # blocks
    def kept_loop():
        return [
            torch.autograd.grad(kept, params, tuple(Vi[j] for Vi in V), retain_graph=True)
            for j in range(k)
        ]

    out[f"block{k} kept loop"] = kept_loop
    out[f"block{k} kept is_grads_batched"] = lambda: torch.autograd.grad(
        kept, params, V, retain_graph=True, is_grads_batched=True
    )

    def dbl_batched():
        g = torch.autograd.grad(F.cross_entropy(model(X), y), params, create_graph=True)
        return torch.autograd.grad(g, params, V, is_grads_batched=True)

    out[f"block{k} dbl is_grads_batched"] = dbl_batched

    def vmap_vjp():
        _, fn = vjp(gf, *fp)
        return vmap(fn)(V)

    out[f"block{k} vmap(vjp) shared fwd"] = vmap_vjp
    out[f"block{k} vmap(jvp) curvlinops-style"] = lambda: vmap(lambda *vs: jvp(gf, fp, vs)[1])(*V)
    out[f"block{k} vmap(linearized jvp)"] = lambda: vmap(lin)(*V)
    try:
        from curvlinops import HessianLinearOperator

        H = HessianLinearOperator(
            model, nn.CrossEntropyLoss(), list(params), [(X, y)], check_deterministic=False
        )
        M = torch.randn(n, k, generator=gen)
        out[f"block{k} curvlinops"] = lambda: H @ M
        m1 = torch.randn(n, 1, generator=gen)
        out["hvp curvlinops"] = lambda: H @ m1
    except Exception as e:
        print("curvlinops:", e)
    return out, n


MEMORY_KERNELS = (
    "kept loop",
    "curvlinops",
    "sharpgen operator default",
    "sharpgen operator per call",
    "vmap(vjp) shared fwd",
    "kept is_grads_batched",
)


def memory_worker(name: str, key: str, k: str) -> None:
    """In a fresh process: set up, reset the peak RSS, run twice, print the peak's growth."""
    torch.set_num_threads(1)
    short = {"anchor MLP 6k": "mlp", "anchor CNN 22k": "cnn", "conv 1.0M": "conv1m",
             "MLP 670k": "mlp1m"}[name]  # fmt: skip
    model, X, y = problems([short])[name]
    fns, _ = kernels(model, X, y, int(k))
    fn = fns[key]
    before = BC._status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    fn()
    fn()
    print(f"PEAK_KIB {BC._status_kib('VmHWM') - before}")


def memory_table(name: str, k: int) -> dict[str, float]:
    """Peak-RSS growth (MiB) of each block kernel of MEMORY_KERNELS, one subprocess each.

    A fixed mmap threshold makes glibc return every large tensor's memory to the OS on
    free, so the resident set tracks live tensors (as in ``bench_curvature.py``).
    """
    import os
    import subprocess

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = {}
    for kernel in MEMORY_KERNELS:
        key = f"block{k} {kernel}"
        cmd = [sys.executable, __file__, "--memory-worker", name, key, str(k)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        for line in res.stdout.splitlines():
            if line.startswith("PEAK_KIB"):
                out[key] = int(line.split()[1]) / 1024
    return out


def time_ops(fns, repeats):
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


#: The defaults' operator of the last `kernels` call (its column plan is printed).
DEFAULT_OPERATOR: list = []


def summary(t: dict[str, float], k: int) -> list[str]:
    """The targets' ratios: sharpgen's defaults against curvlinops and PyHessian's way."""
    pairs = [
        (f"block of {k} per column, sharpgen defaults / curvlinops (target <= 1)",
         f"block{k} sharpgen operator default", f"block{k} curvlinops"),
        ("one product, sharpgen defaults / PyHessian's kept graph (target <= 1)",
         "hvp sharpgen operator default", "hvp kept graph"),
        ("one product, sharpgen graph per call / PyHessian's kept graph",
         "hvp sharpgen operator per call", "hvp kept graph"),
    ]  # fmt: skip
    out = [""]
    for label, a, b in pairs:
        if a in t and b in t:
            out.append(f"- {label}: {t[a] / t[b]:.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,conv1m,mlp1m")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="anchors' models only, 3 rounds")
    ap.add_argument("--memory", action="store_true", help="peak memory of the block products")
    ap.add_argument("--out", default=None, help="also write the Markdown tables here")
    ap.add_argument("--probe-cpu", action="store_true", help="probe loop vs batched on the CPU")
    ap.add_argument("--memory-worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        return memory_worker(*args.memory_worker)
    if args.probe_cpu:
        import sharpgen.curvature._columns as columns

        columns.PROBE_ON_CPU = True
    lines = [f"load average at the start: {' '.join(open('/proc/loadavg').read().split()[:3])}"]
    torch.set_num_threads(1)
    which = ["mlp", "cnn"] if args.quick else args.models.split(",")
    rounds = 3 if args.quick else args.rounds
    k = args.k
    for name, (model, X, y) in problems(which).items():
        fns, n = kernels(model, X, y, k)
        t = time_ops(fns, rounds)
        g = t["grad"]
        start = len(lines)
        lines.append(
            f"\n{name}: {n:,} parameters, batch {len(y)}; one gradient "
            f"{g * 1e3:.2f} ms (median of {rounds} interleaved rounds, 1 thread)\n"
        )
        mem = memory_table(name, k) if args.memory else {}
        lines.append("| kernel | time / gradient | peak memory (MiB) |\n|---|---|---|")
        for key, val in t.items():
            per = val / (k if key.startswith("block") else 1)
            unit = " per column" if key.startswith("block") else ""
            peak = f"{mem[key]:.1f}" if key in mem else ""
            lines.append(f"| {key} | {per / g:.2f}x{unit} | {peak} |")
        lines += summary(t, k)
        if args.probe_cpu:
            from sharpgen.curvature._columns import column_plan

            plan = column_plan(DEFAULT_OPERATOR[0].objective, "hvp")
            lines.append(f"- column plan of the defaults (probed on the CPU): {plan}")
        print("\n".join(lines[start:]), flush=True)
    lines.append(f"\nload average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
