"""Per-product kernels in raw torch, side by side with curvlinops and PyHessian's kept graph.

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/bench_kernels.py [--quick]
        [--models mlp,cnn,conv1m,mlp1m] [--k 32] [--rounds 5]

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
    out["hvp func rev (vjp)"] = lambda: vjp(gf, *params)[1](v)
    out["hvp func fwd (jvp)"] = lambda: jvp(gf, params, v)[1]
    _, lin = linearize(lambda *ps: gf(*ps), *params)
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
        _, fn = vjp(gf, *params)
        return vmap(fn)(V)

    out[f"block{k} vmap(vjp) shared fwd"] = vmap_vjp
    out[f"block{k} vmap(jvp) curvlinops-style"] = lambda: vmap(lambda *vs: jvp(gf, params, vs)[1])(
        *V
    )
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,conv1m,mlp1m")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="anchors' models only, 3 rounds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    which = ["mlp", "cnn"] if args.quick else args.models.split(",")
    rounds = 3 if args.quick else args.rounds
    k = args.k
    for name, (model, X, y) in problems(which).items():
        fns, n = kernels(model, X, y, k)
        t = time_ops(fns, rounds)
        g = t["grad"]
        print(f"\n{name}: {n:,} parameters, batch {len(y)}; one gradient {g * 1e3:.2f} ms "
              f"(median of {rounds} interleaved rounds, 1 thread, loaded machine)\n")  # fmt: skip
        print("| kernel | time / gradient |\n|---|---|")
        for key, val in t.items():
            per = val / (k if key.startswith("block") else 1)
            unit = " per column" if key.startswith("block") else ""
            print(f"| {key} | {per / g:.2f}x{unit} |", flush=True)


if __name__ == "__main__":
    main()
