"""Model-level sharpness measures of sharpgen, end to end, against PyHessian's model API.

Run with the benchmark environment (which has PyHessian installed):

    .venv-bench/bin/python benchmarks/bench_sharpness.py [--seeds 5] [--budget 50]

This is the user-facing comparison: one call on ``(model, loss, data)`` each, including the
set-up (PyHessian builds its gradient graph in the constructor, sharpgen builds the operator
per call). The operator-level estimator benchmark is ``bench_estimators.py``.

Model and data (ANCHORS.md): MLP 20-64-64-10 (tanh, cross-entropy, 512 samples, 6,154
parameters), trained briefly with Adam, eval mode, float64 for every library. Truth: top
eigenvalues from ``top_eigenvalues(tol=1e-10)`` (certified residuals), the trace from
``hessian_trace(method="exact")`` (6,154 products).

Measured (one run, medians over seeds):
* ``top_eigenvalues(k, tol=1e-3)`` vs ``hessian(...).eigenvalues(top_n=k)`` (power iteration
  with deflation, its default ``tol=1e-3``): wall time, products, true relative error.
* ``hessian_trace`` (default ``rtol=0.01``: exact is out of reach at 6,154 parameters, so
  the adaptive Hutchinson/Hutch++; and each method at a fixed budget) vs
  ``hessian(...).trace()`` (Hutchinson, default stop rule, and ``maxIter=budget, tol=0``):
  relative RMSE over seeds, products, wall time (the variants interleaved per seed).
* ``sam_sharpness`` / ``average_sharpness`` cost relative to one gradient evaluation.
"""

# ruff: noqa: B023  (lambdas are called at once, inside the loop)
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sharpgen.sharpness import average_sharpness, hessian_trace, sam_sharpness, top_eigenvalues


def make_mlp(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    X = torch.randn(512, 20, generator=gen)
    teacher = torch.randn(20, 10, generator=gen)
    y = torch.argmax(X @ teacher + 0.5 * torch.randn(512, 10, generator=gen), dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model = model.double().eval()
    return model, X.double(), y


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


class PyHessianCounter:
    """Count PyHessian's products by wrapping its module-level hessian_vector_product."""

    def __init__(self):
        import pyhessian.hessian  # noqa: F401

        self.mod = sys.modules["pyhessian.hessian"]
        self.orig = self.mod.hessian_vector_product
        self.count = 0

        def wrapped(*a, **k):
            self.count += 1
            return self.orig(*a, **k)

        self.mod.hessian_vector_product = wrapped

    def close(self):
        self.mod.hessian_vector_product = self.orig


def pyhessian(model, X, y):
    from pyhessian import hessian

    return hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(X, y), cuda=False)


def rel_err(values, truth):
    values = torch.sort(torch.as_tensor(values, dtype=torch.float64).flatten(), descending=True)[0]
    t = truth[: values.numel()]
    return float(((values - t).abs() / t.abs()).max())


def med(xs):
    return statistics.median(xs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--truth-cache", default=None, help="json file to keep the dense truth")
    parser.add_argument("--parts", default="eig,trace,perturb", help="comma-separated parts")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, X, y = make_mlp()
    data = (X, y)
    loss = F.cross_entropy
    p = sum(q.numel() for q in model.parameters())
    print(
        f"MLP 20-64-64-10, {p} parameters, 512 samples, float64, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )

    cache = Path(args.truth_cache) if args.truth_cache else None
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        truth_vals, truth_tr = torch.tensor(saved["top5"], dtype=torch.float64), saved["trace"]
        print(f"truth (cached in {cache}): top-5 {saved['top5']}; trace {truth_tr:.6g}\n")
    else:
        truth_eig, t_truth = timed(
            lambda: top_eigenvalues(
                model, loss, data, k=5, tol=1e-10, generator=torch.Generator().manual_seed(99)
            )
        )
        truth_vals = truth_eig.eigenvalues
        exact, t_exact = timed(
            lambda: hessian_trace(model, loss, data, method="exact", block_size=128)
        )
        truth_tr = exact.value
        print(
            f"truth: top-5 {[round(v, 6) for v in truth_vals.tolist()]} ({t_truth:.1f} s, "
            f"converged={truth_eig.converged}); trace {truth_tr:.6g} (exact, "
            f"{exact.num_matvecs} products, {t_exact:.1f} s)\n"
        )
        if cache is not None:
            cache.write_text(json.dumps({"top5": truth_vals.tolist(), "trace": truth_tr}))

    parts = set(args.parts.split(","))
    # -- eigenvalues ---------------------------------------------------------------------
    if "eig" in parts:
        eigen_part(model, X, y, truth_vals, args.seeds)
    if "trace" in parts:
        trace_part(model, X, y, truth_tr, args.seeds, args.budget)
    if "perturb" in parts:
        perturbation_part(model, X, y)


def eigen_part(model, X, y, truth_vals, seeds):
    loss, data = F.cross_entropy, (X, y)
    print("| top-k | library | products | wall (s) | true rel. error | time sharpgen/PyHessian |")
    print("|---|---|---|---|---|---|")
    for k in (1, 5):
        sg, ph = [], []
        for seed in range(seeds):
            res, t = timed(
                lambda: top_eigenvalues(
                    model, loss, data, k=k, tol=1e-3, generator=torch.Generator().manual_seed(seed)
                )
            )
            sg.append((res.num_matvecs, t, rel_err(res.eigenvalues, truth_vals)))
            torch.manual_seed(seed)
            counter = PyHessianCounter()
            try:
                (vals, _), t = timed(lambda: pyhessian(model, X, y).eigenvalues(top_n=k))
            finally:
                counter.close()
            ph.append((counter.count, t, rel_err(vals, truth_vals)))
        ratio = med([s[1] for s in sg]) / med([s[1] for s in ph])
        for name, rows in (("sharpgen top_eigenvalues", sg), ("PyHessian eigenvalues", ph)):
            mv, wall = med([r[0] for r in rows]), med([r[1] for r in rows])
            print(
                f"| {k} | {name} | {mv:.0f} | {wall:.3f} | "
                f"{max(r[2] for r in rows):.1e} (max) | {ratio:.2f} |"
            )
    print()


def trace_part(model, X, y, truth_tr, seeds, B):
    """Each seed runs every variant in turn (interleaved), so the load hits them alike."""
    loss, data = F.cross_entropy, (X, y)
    print(f"| trace | products (median) | wall (s, median) | relative RMSE over {seeds} seeds |")
    print("|---|---|---|---|")

    def sharpgen(seed, **kw):
        est = hessian_trace(model, loss, data, generator=torch.Generator().manual_seed(seed), **kw)
        return est.value, est.num_matvecs, est.method

    def pyhessian_trace(seed, **kw):
        torch.manual_seed(seed)
        counter = PyHessianCounter()
        try:
            vals = pyhessian(model, X, y).trace(**kw)
        finally:
            counter.close()
        return sum(vals) / len(vals), counter.count, "hutchinson"

    variants = {"sharpgen hessian_trace() default (rtol=0.01)": lambda s: sharpgen(s)}
    for method in ("hutchinson", "hutchpp", "xtrace"):
        variants[f"sharpgen {method}, budget {B}"] = lambda s, m=method: sharpgen(
            s, method=m, num_matvecs=B
        )
    variants["PyHessian trace, default stop (maxIter=100, tol=1e-3)"] = pyhessian_trace
    variants[f"PyHessian trace, budget {B}"] = lambda s: pyhessian_trace(s, maxIter=B, tol=0.0)
    runs = {name: [] for name in variants}
    for seed in range(seeds):
        for name, fn in variants.items():
            (value, products, method), t = timed(lambda: fn(seed))
            runs[name].append((value, products, t, method))
    rm = {}
    for name, rows in runs.items():
        rmse = (sum((r[0] - truth_tr) ** 2 for r in rows) / len(rows)) ** 0.5 / abs(truth_tr)
        methods = "/".join(sorted({r[3] for r in rows}))
        label = name.replace("default (", f"default ({methods}, ")
        print(f"| {label} | {med([r[1] for r in rows]):.0f} | {med([r[2] for r in rows]):.3f} | "
              f"{rmse:.2e} |")  # fmt: skip
        rm[name] = rmse
    ph = rm[f"PyHessian trace, budget {B}"]
    load = Path("/proc/loadavg").read_text().split()[0]
    print(
        f"\nRMSE ratio at budget {B}: XTrace / PyHessian Hutchinson = "
        f"{rm[f'sharpgen xtrace, budget {B}'] / ph:.3f}, Hutch++ / PyHessian = "
        f"{rm[f'sharpgen hutchpp, budget {B}'] / ph:.3f}; load {load}\n"
    )


def perturbation_part(model, X, y):
    loss, data = F.cross_entropy, (X, y)
    m = copy.deepcopy(model)

    def grad_once():
        m.zero_grad()
        F.cross_entropy(m(X), y).backward()

    grad_once()
    t_grad = med([timed(grad_once)[1] for _ in range(10)])
    print("| perturbation measure | evaluations | wall (s) | wall / one gradient |")
    print("|---|---|---|---|")
    for name, fn in (
        ("sam_sharpness (1 step)", lambda: sam_sharpness(model, loss, data, 0.05)),
        ("sam_sharpness (10 steps)", lambda: sam_sharpness(model, loss, data, 0.05, steps=10)),
        ("sam_sharpness (m=32, 1 step)", lambda: sam_sharpness(model, loss, data, 0.05, m=32)),
        (
            "average_sharpness (32 antithetic draws)",
            lambda: average_sharpness(
                model, loss, data, 0.01, num_samples=32, generator=torch.Generator().manual_seed(0)
            ),
        ),
    ):
        fn()
        res, t = timed(fn)
        evals = (
            f"{res.num_gradient_evals} grad + {res.num_loss_evals} loss"
            if hasattr(res, "num_gradient_evals")
            else f"{res.num_loss_evals} loss"
        )
        print(f"| {name} | {evals} | {t:.3f} | {t / t_grad:.1f} |")


if __name__ == "__main__":
    main()
