"""Estimators of sharpgen.linalg against PyHessian, hessian-eigenthings and curvlinops + scipy.

Run with the benchmark environment (which has the anchor libraries installed):

    .venv-bench/bin/python benchmarks/bench_estimators.py --models mlp,cnn

Models and data follow ANCHORS.md: an MLP 20-64-64-10 (tanh, cross-entropy, 512 samples)
and a small CNN (conv 3->4, ReLU, maxpool, conv 4->32, ReLU, linear 2048->10; 256 images
3x16x16), both briefly trained with Adam, in eval mode, float64. Truth: the dense Hessian
(torch.linalg.eigvalsh, exact trace) for the MLP; for the CNN the top eigenvalues come from
`lanczos(tol=1e-10)` (certified residuals) and the trace is not benchmarked by default
(its exact value needs 21,786 products; pass --cnn-trace to estimate it with a large XTrace).

What is measured (one run, medians over seeds):
* top-1 / top-5 eigenvalues: products, wall time and the true relative error of sharpgen
  `lanczos(tol=1e-3)`, PyHessian's `eigenvalues()` (defaults: power iteration, tol 1e-3),
  hessian-eigenthings' `lanczos` (defaults), scipy `eigsh(tol=1e-3)` on curvlinops.
* trace: relative RMSE over seeds at equal budgets for `hutchinson_trace`, `hutchpp_trace`,
  `xtrace` and PyHessian's Hutchinson (fixed budget, and its default stop rule).
* time per Hessian-vector product of each library (and of one gradient).
"""

# ruff: noqa: B023  (lambdas are called at once, inside the loop)
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sharpgen.curvature import HessianOperator
from sharpgen.linalg import hutchinson_trace, hutchpp_trace, lanczos, xtrace


# ----------------------------------------------------------------------------- models
def make_mlp(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    X = torch.randn(512, 20, generator=gen)
    teacher = torch.randn(20, 10, generator=gen)
    y = torch.argmax(X @ teacher + 0.5 * torch.randn(512, 10, generator=gen), dim=1)
    return model, X, y


def make_cnn(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2048, 10),
    )
    X = torch.randn(256, 3, 16, 16, generator=gen)
    teacher = torch.randn(3 * 16 * 16, 10, generator=gen)
    y = torch.argmax(X.flatten(1) @ teacher, dim=1)
    return model, X, y


def train_briefly(model, X, y, steps):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model


# ----------------------------------------------------------------------------- helpers
def median(xs):
    return statistics.median(xs)


def rel_err(values, truth):
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    truth = truth[: values.numel()]
    values = torch.sort(values, descending=True).values
    return float(((values - truth).abs() / truth.abs()).max())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


class PyHessianCounter:
    """Count PyHessian's HVPs by wrapping its module-level hessian_vector_product."""

    def __init__(self):
        import pyhessian.hessian  # noqa: F401  (registers the module)

        self.mod = sys.modules["pyhessian.hessian"]
        self.orig = self.mod.hessian_vector_product
        self.count = 0

        def wrapped(*a, **k):
            self.count += 1
            return self.orig(*a, **k)

        self.mod.hessian_vector_product = wrapped


def pyhessian_object(model, X, y):
    from pyhessian import hessian

    m = copy.deepcopy(model)
    return hessian(m, nn.CrossEntropyLoss(), data=(X, y), cuda=False)


def curvlinops_operator(model, X, y):
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return HessianLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False
    )


def eigenthings_operator(model, X, y):
    from hessian_eigenthings import HessianOperator as HEOperator
    from hessian_eigenthings import supervised_loss

    return HEOperator(model, [(X, y)], supervised_loss(F.cross_entropy))


# ----------------------------------------------------------------------------- parts
def per_product_times(model, X, y, reps):
    n = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    out = {}

    def med(fn):
        fn()
        ts = []
        for _ in range(reps):
            ts.append(timed(fn)[1])
        return median(ts)

    m = copy.deepcopy(model)

    def grad_once():
        m.zero_grad()
        F.cross_entropy(m(X), y).backward()

    out["gradient"] = med(grad_once)
    v = torch.randn(n, generator=g)
    V = torch.randn(n, 32, generator=g)
    Hf = HessianOperator(model, F.cross_entropy, (X, y))
    out["sharpgen func, single"] = med(lambda: Hf.matvec(v))
    out["sharpgen func, per column of 32"] = med(lambda: Hf.matmat(V)) / 32
    Ha = HessianOperator(model, F.cross_entropy, (X, y), backend="autograd", cache_graph=True)
    out["sharpgen autograd+cache, single"] = med(lambda: Ha.matvec(v))
    ph = pyhessian_object(model, X, y)
    mod = sys.modules["pyhessian.hessian"]
    vl = [torch.randn(p.shape, generator=g) for p in ph.params]
    out["PyHessian, single"] = med(lambda: mod.hessian_vector_product(ph.gradsH, ph.params, vl))
    he = eigenthings_operator(model, X, y)
    out["hessian-eigenthings, single"] = med(lambda: he.matvec(v))
    cl = curvlinops_operator(model, X, y)
    out["curvlinops, single"] = med(lambda: cl @ v)
    out["curvlinops, per column of 32"] = med(lambda: cl @ V) / 32
    return out


def eigen_part(model, X, y, truth, seeds, ks):
    n = sum(p.numel() for p in model.parameters())
    rows = []
    for k in ks:
        runs: dict[str, list] = {}

        def add(name, mv, t, err):
            runs.setdefault(name, []).append((mv, t, err))

        for seed in range(seeds):
            # sharpgen: Lanczos, rigorous relative residual stop
            H = HessianOperator(
                model, F.cross_entropy, (X, y), backend="autograd", cache_graph=True
            )
            res, t = timed(
                lambda H=H: lanczos(H, k, tol=1e-3, generator=torch.Generator().manual_seed(seed))
            )
            add("sharpgen lanczos (tol 1e-3)", res.num_matvecs, t, rel_err(res.eigenvalues, truth))
            # PyHessian: power iteration with deflation, default tol 1e-3
            torch.manual_seed(seed)
            counter = PyHessianCounter()
            try:
                (vals, _), t = timed(lambda: pyhessian_object(model, X, y).eigenvalues(top_n=k))
            finally:
                counter.mod.hessian_vector_product = counter.orig
            add("PyHessian eigenvalues (defaults)", counter.count, t, rel_err(vals, truth))
            # hessian-eigenthings Lanczos, defaults (max_iter = 2k)
            from hessian_eigenthings import lanczos as he_lanczos

            op = eigenthings_operator(model, X, y)
            count = [0]
            orig = op.matvec

            def mv(v, orig=orig, count=count):
                count[0] += 1
                return orig(v)

            op.matvec = mv
            r, t = timed(lambda op=op: he_lanczos(op, k=k, which="LA", seed=seed))
            add(
                "hessian-eigenthings lanczos (defaults)", count[0], t, rel_err(r.eigenvalues, truth)
            )
            # scipy eigsh on curvlinops
            from scipy.sparse.linalg import LinearOperator as SLO
            from scipy.sparse.linalg import eigsh

            def run_eigsh():
                cl = curvlinops_operator(model, X, y)
                S = cl.to_scipy()
                cnt = [0]

                def f(x):
                    cnt[0] += 1 if np.ndim(x) == 1 else x.shape[1]
                    return S @ x

                lo = SLO(S.shape, matvec=f, matmat=f, dtype=np.float64)
                v0 = np.random.default_rng(seed).standard_normal(n)
                w = eigsh(lo, k=k, which="LA", tol=1e-3, v0=v0, return_eigenvectors=False)
                return w, cnt[0]

            (w, cnt), t = timed(run_eigsh)
            add("scipy eigsh on curvlinops (tol 1e-3)", cnt, t, rel_err(w, truth))
        for name, vals in runs.items():
            rows.append(
                {
                    "k": k,
                    "method": name,
                    "matvecs": median([v[0] for v in vals]),
                    "time_s": median([v[1] for v in vals]),
                    "rel_err_median": median([v[2] for v in vals]),
                    "rel_err_max": max(v[2] for v in vals),
                    "within_1e-3": sum(v[2] <= 1e-3 for v in vals) / len(vals),
                }
            )
    return rows


def trace_part(model, X, y, truth, seeds, budgets):
    rows = []
    H = HessianOperator(model, F.cross_entropy, (X, y))
    for b in budgets:
        for name, fn in [
            ("sharpgen hutchinson_trace", hutchinson_trace),
            ("sharpgen hutchpp_trace", hutchpp_trace),
            ("sharpgen xtrace", xtrace),
        ]:
            vals, times, spent = [], [], []
            for seed in range(seeds):
                r, t = timed(
                    lambda fn=fn, seed=seed: fn(
                        H, num_matvecs=b, generator=torch.Generator().manual_seed(seed)
                    )
                )
                vals.append(r.value)
                times.append(t)
                spent.append(r.num_matvecs)
            rows.append(_trace_row(name, b, vals, times, spent, truth))
        vals, times, spent = [], [], []
        ph = pyhessian_object(model, X, y)
        for seed in range(seeds):
            torch.manual_seed(seed)
            samples, t = timed(lambda: ph.trace(maxIter=b, tol=-1.0))
            vals.append(float(np.mean(samples)))
            times.append(t)
            spent.append(len(samples))
        rows.append(_trace_row("PyHessian trace (fixed budget)", b, vals, times, spent, truth))
    vals, times, spent = [], [], []
    ph = pyhessian_object(model, X, y)
    for seed in range(seeds):
        torch.manual_seed(seed)
        samples, t = timed(lambda: ph.trace())
        vals.append(float(np.mean(samples)))
        times.append(t)
        spent.append(len(samples))
    rows.append(_trace_row("PyHessian trace (default stop)", None, vals, times, spent, truth))
    return rows


class Quadratic(nn.Module):
    """theta -> theta^T A theta / 2: a "model" whose Hessian is exactly A (for PyHessian)."""

    def __init__(self, A):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(A.shape[0]))
        self.register_buffer("A", A)

    def forward(self, x):
        return 0.5 * self.theta @ (self.A @ self.theta) + 0.0 * x.sum()


def synthetic_trace_part(n, seeds, budgets):
    """Trace RMSE on dense matrices with decaying spectra; PyHessian runs on a quadratic."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    rows = []
    for label, lam in [("100/i^2", 100 / i**2), ("100/i", 100 / i)]:
        A = (Q * lam) @ Q.T
        A = (A + A.T) / 2
        truth = float(lam.sum())
        model = Quadratic(A)
        x, y = torch.zeros(1), torch.zeros(1)
        for b in budgets:
            for name, fn in [
                ("sharpgen hutchinson_trace", hutchinson_trace),
                ("sharpgen hutchpp_trace", hutchpp_trace),
                ("sharpgen xtrace", xtrace),
            ]:
                vals, times, spent = [], [], []
                for seed in range(seeds):
                    r, t = timed(
                        lambda fn=fn, seed=seed: fn(
                            A, num_matvecs=b, generator=torch.Generator().manual_seed(seed)
                        )
                    )
                    vals.append(r.value)
                    times.append(t)
                    spent.append(r.num_matvecs)
                rows.append({"spectrum": label, **_trace_row(name, b, vals, times, spent, truth)})
            from pyhessian import hessian

            ph = hessian(model, lambda out, tgt: out, data=(x, y), cuda=False)
            vals, times, spent = [], [], []
            for seed in range(seeds):
                torch.manual_seed(seed)
                samples, t = timed(lambda: ph.trace(maxIter=b, tol=-1.0))
                vals.append(float(np.mean(samples)))
                times.append(t)
                spent.append(len(samples))
            rows.append(
                {
                    "spectrum": label,
                    **_trace_row("PyHessian trace (fixed budget)", b, vals, times, spent, truth),
                }
            )
    return rows


def _trace_row(name, budget, vals, times, spent, truth):
    v = np.asarray(vals)
    return {
        "method": name,
        "budget": budget,
        "matvecs_median": median(spent),
        "rel_rmse": float(np.sqrt(np.mean((v - truth) ** 2)) / abs(truth)),
        "time_s": median(times),
    }


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--seeds", type=int, default=3, help="seeds for the eigenvalue runs")
    ap.add_argument("--trace-seeds", type=int, default=10)
    ap.add_argument("--budgets", default="30,99")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per product timing")
    ap.add_argument("--cnn-trace", action="store_true")
    ap.add_argument(
        "--parts", default="times,eigen,trace,synthetic", help="comma-separated subset to run"
    )
    ap.add_argument("--synthetic-n", type=int, default=2000)
    ap.add_argument(
        "--cnn-truth",
        default=None,
        help="comma-separated top eigenvalues of the CNN from an earlier lanczos(tol=1e-10) "
        "run, to skip recomputing them",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)  # PyHessian draws its probes in the default dtype
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    parts = set(args.parts.split(","))
    results = {}
    if "synthetic" in parts:
        rows = synthetic_trace_part(args.synthetic_n, args.trace_seeds, budgets)
        print(f"\n## synthetic decaying spectra, n = {args.synthetic_n}")
        for row in rows:
            print(row, flush=True)
        results["synthetic"] = rows
    models = [m for m in args.models.split(",") if m]
    if not parts & {"times", "eigen", "trace"}:
        models = []
    for name in models:
        gen = torch.Generator().manual_seed(0)
        model, X, y = (make_mlp if name == "mlp" else make_cnn)(gen)
        model = train_briefly(model, X, y, 200 if name == "mlp" else 100)
        n = sum(p.numel() for p in model.parameters())
        print(f"\n## {name}: {n} parameters", flush=True)
        H = HessianOperator(model, F.cross_entropy, (X, y))
        if name == "mlp" and parts & {"eigen", "trace"}:
            (D, t) = timed(H.to_dense)
            lam = torch.linalg.eigvalsh((D + D.T) / 2).flip(0)
            trace = float(D.diagonal().sum())
            print(f"dense truth in {t:.0f}s; lambda_1..5 = {lam[:5].tolist()}; trace = {trace}")
        elif name == "mlp":
            lam, trace = torch.zeros(5), None
        elif args.cnn_truth:
            lam = torch.tensor([float(v) for v in args.cnn_truth.split(",")])
            trace = None
            print(f"CNN truth given: lambda_1..5 = {lam[:5].tolist()}")
        else:
            r = lanczos(H, 8, tol=1e-10, max_basis=80, generator=torch.Generator().manual_seed(99))
            lam = r.eigenvalues
            trace = None
            if args.cnn_trace and "trace" in parts:
                ref = xtrace(H, num_matvecs=2000, generator=torch.Generator().manual_seed(99))
                trace = ref.value
                print(f"CNN trace reference (xtrace, 2000 products): {ref}")
            print(f"lanczos truth converged={r.converged}; lambda_1..5 = {lam[:5].tolist()}")
        res = {"n": n, "lambda": lam[:5].tolist(), "trace": trace}
        if "times" in parts:
            res["per_product_s"] = per_product_times(model, X, y, args.reps)
            print(json.dumps(res["per_product_s"], indent=1), flush=True)
        if "eigen" in parts:
            res["eigen"] = eigen_part(model, X, y, lam, args.seeds, [1, 5])
            for row in res["eigen"]:
                print(row, flush=True)
        if trace is not None and "trace" in parts:
            res["trace_rows"] = trace_part(model, X, y, trace, args.trace_seeds, budgets)
            for row in res["trace_rows"]:
                print(row, flush=True)
        results[name] = res
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
