r"""Calibration of the trace estimators' standard errors, and the cost of stopping on ``rtol``.

    PYTHONPATH=$PWD python benchmarks/bench_trace_calibration.py [--quick] [--seeds 40]
        [--estimators xtrace,hutchpp] [--matrices flat,CNN] [--out table.md]

Matrices (float64, exact trace known): five synthetic spectra in a random orthogonal basis
(n = 300: flat 1 + U(0, 1), 100/i, 100/i^2, low rank plus noise, indefinite linspace(-1, 2)),
and the dense Hessians of two small trained models on scikit-learn's digits: a CNN
(conv 1->4 3x3, ReLU, maxpool, linear 64->10; 690 parameters) and an MLP 64-10-10 (tanh;
760 parameters), 512 images, cross-entropy, eval mode.

Part 1, calibration: for every estimator (Hutchinson, Hutch++, XTrace, and the adaptive
estimator ``trace(method="auto")`` uses) and fixed budgets, over ``--seeds`` seeds:
relative RMSE, ``rms(stderr) / RMSE`` (1 is calibrated) and the coverage of the 95% interval.

Part 2, ``rtol`` stopping: ``rtol`` per matrix is the adaptive estimator's relative RMSE at
90 products; the oracle cost of an estimator is the budget at which its fixed-budget RMSE
equals ``rtol * |trace|`` (a power law fitted to the three budgets of part 1 nearest the
target; for Hutchinson the closed form $2(\|A\|_F^2 - \sum_i A_{ii}^2) / (\mathrm{rtol}
\cdot \mathrm{tr} A)^2$ of Rademacher probes, which needs no fit); reported: mean products
spent when stopping on ``rtol`` divided by that oracle cost, the RMSE reached over ``rtol``
and ``rms(stderr) / RMSE`` of the stopped runs.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sharpgen.curvature import HessianOperator
from sharpgen.linalg import hutchinson_trace, hutchpp_trace, trace, xtrace


def auto(A, **kw):
    return trace(A, method="adaptive", **kw)


ESTIMATORS = {"hutchinson": hutchinson_trace, "hutchpp": hutchpp_trace, "xtrace": xtrace}
ESTIMATORS["auto (adaptive)"] = auto


def synthetic(n=300):
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    noise = torch.rand(n, generator=g, dtype=torch.float64)
    spectra = {
        "flat 1+U(0,1)": 1 + noise,
        "100/i": 100 / i,
        "100/i^2": 100 / i**2,
        "low rank + noise": torch.where(i <= 10, 100.0, 0.0) + 0.1 * noise,
        "indefinite": torch.linspace(-1, 2, n, dtype=torch.float64),
    }
    out = {}
    for name, lam in spectra.items():
        A = (Q * lam) @ Q.T
        out[name] = (A + A.T) / 2
    return out


def digits_hessians(epochs=30):
    """Dense Hessians of a small CNN and an MLP trained on scikit-learn's digits."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    out = {}
    for name in ["trained CNN (digits)", "trained MLP (digits)"]:
        torch.manual_seed(0)
        if "CNN" in name:
            model = nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                nn.Linear(64, 10),
            )  # fmt: skip
        else:
            model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh(), nn.Linear(10, 10))
        model = model.double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(epochs):
            for s in range(0, 1536, 128):
                opt.zero_grad()
                nn.functional.cross_entropy(model(X[s : s + 128]), y[s : s + 128]).backward()
                opt.step()
        model.eval()
        H = HessianOperator(model, nn.functional.cross_entropy, (X[:512], y[:512])).to_dense()
        out[name] = (H + H.T) / 2
    return out


def run(est, A, seeds, **kw):
    vals, ses, spent = [], [], []
    for s in range(seeds):
        r = est(A, generator=torch.Generator().manual_seed(1000 + s), **kw)
        vals.append(r.value)
        ses.append(r.stderr)
        spent.append(r.num_matvecs)
    return np.array(vals), np.array(ses), np.array(spent)


def oracle_cost(budgets, rmses, target):
    """Budget at which the fixed-budget RMSE reaches ``target``: a power law
    ``rmse = a * budget**b`` fitted (least squares in log-log) to the three budgets whose
    RMSE is nearest the target, which smooths the ~11% sampling error of each RMSE."""
    b, r = np.log(np.array(budgets, float)), np.log(np.maximum(np.array(rmses), 1e-300))
    near = np.argsort(np.abs(r - math.log(target)))[:3]
    slope, intercept = np.polyfit(b[near], r[near], 1)
    if slope >= 0:
        return math.nan
    return float(np.exp((math.log(target) - intercept) / slope))


def hutchinson_oracle(A, target):
    """Products at which Rademacher Hutchinson's standard deviation equals ``target``."""
    var = 2 * (float((A * A).sum()) - float((A.diagonal() ** 2).sum()))
    return var / target**2


def select(names, wanted):
    """The names containing one of the comma-separated substrings ``wanted`` (all if empty)."""
    if not wanted:
        return list(names)
    keys = [w.strip() for w in wanted.split(",") if w.strip()]
    return [n for n in names if any(k in n for k in keys)]


def load():
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def rtol_for(mname, A, budgets, curves, seeds):
    """The adaptive estimator's relative RMSE at 90 products (from part 1 when it ran)."""
    key = (mname, "auto (adaptive)")
    if key in curves:
        curve = curves[key]
    else:
        truth = float(torch.trace(A))
        curve = []
        for b in budgets:
            vals, _, _ = run(auto, A, seeds, num_matvecs=b)
            curve.append(float(np.sqrt(np.mean((vals - truth) ** 2))) / abs(truth))
    return float(f"{np.interp(math.log(90), np.log(budgets), curve):.1g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 seeds, budgets 30 and 90, no rtol")
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--estimators", default="", help="comma-separated substrings, e.g. xtrace")
    ap.add_argument("--matrices", default="", help="comma-separated substrings, e.g. flat,CNN")
    ap.add_argument("--out", default="", help="also write the markdown tables to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = 30 if args.quick else args.seeds
    budgets = [30, 90] if args.quick else [24, 48, 90, 180, 360]
    estimators = {k: ESTIMATORS[k] for k in select(ESTIMATORS, args.estimators)}
    t0 = time.perf_counter()
    mats = {**synthetic(), **digits_hessians()}
    mats = {k: mats[k] for k in select(mats, args.matrices)}
    lines = []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    emit(f"seeds={seeds}, budgets={budgets}; float64, 1 thread; load {load()}")
    emit("\n## calibration: relative RMSE / rms(stderr)/RMSE / coverage of +-1.96 stderr\n")
    emit("| matrix | budget | " + " | ".join(estimators) + " |")
    emit("|---|---|" + "---|" * len(estimators))
    curves = {}
    for mname, A in mats.items():
        truth = float(torch.trace(A))
        for b in budgets:
            cells = []
            for ename, est in estimators.items():
                vals, ses, _ = run(est, A, seeds, num_matvecs=b)
                rmse = float(np.sqrt(np.mean((vals - truth) ** 2)))
                ratio = float(np.sqrt(np.mean(ses**2))) / rmse if rmse > 0 else math.nan
                cover = float(np.mean(np.abs(vals - truth) <= 1.96 * ses))
                curves.setdefault((mname, ename), []).append(rmse / abs(truth))
                cells.append(f"{rmse / abs(truth):.1e} / {ratio:.2f} / {cover:.2f}")
            emit(f"| {mname} | {b} | " + " | ".join(cells) + " |")
    if not args.quick:
        emit("\n## rtol stopping: products / oracle products (mean products / oracle's; RMSE "
             "reached / rtol; rms(stderr) / RMSE)\n")  # fmt: skip
        emit("| matrix | rtol | " + " | ".join(estimators) + " |")
        emit("|---|---|" + "---|" * len(estimators))
        for mname, A in mats.items():
            truth = float(torch.trace(A))
            rtol = rtol_for(mname, A, budgets, curves, seeds)
            cells = []
            for ename, est in estimators.items():
                if ename == "hutchinson":
                    oracle = hutchinson_oracle(A, rtol * abs(truth))
                else:
                    oracle = oracle_cost(budgets, curves[(mname, ename)], rtol)
                vals, ses, spent = run(est, A, seeds, rtol=rtol, max_matvecs=2000)
                rmse = float(np.sqrt(np.mean((vals - truth) ** 2)))
                se = float(np.sqrt(np.mean(ses**2))) / rmse if rmse > 0 else math.nan
                cells.append(f"{spent.mean() / oracle:.2f} ({spent.mean():.0f} / {oracle:.0f}; "
                             f"{rmse / abs(truth) / rtol:.2f}; {se:.2f})")  # fmt: skip
            emit(f"| {mname} | {rtol:g} | " + " | ".join(cells) + " |")
    emit(f"\ntotal {time.perf_counter() - t0:.0f} s; load at the end {load()}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
