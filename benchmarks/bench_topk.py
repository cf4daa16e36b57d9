"""Top-k eigenvalues against PyHessian, and the fixed cost of a `top_eigenvalues` call.

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/bench_topk.py [--quick] [--rounds 3]
        [--problems mlp,cnn,client] [--out topk.md]

Problems (float32, 1 thread, eval mode):

* the anchors' MLP 20-64-64-10 (6,154 parameters, 512 samples, one batch) and CNN (21,786
  parameters, 256 images 3x16x16, one batch) of ANCHORS.md, briefly trained
  (``bench_estimators.make_mlp``/``make_cnn``, 200/100 Adam steps);
* the user-style client of ``bench_client.py``: a BatchNorm CNN (3,866 parameters)
  trained on scikit-learn's digits, on a DataLoader of 6 batches (the last one uneven).

Timed in one process, interleaved rounds (every call once per round), medians:

* `top_eigenvalues` with ``k=1`` and ``k=5``, ``tol=1e-3``, with the default stopping rule
  (``bound="residual"``, the certificate) and with ``bound="gap"`` (the quadratic
  estimate), for ``k=1`` also with ``start="random"`` beside the default gradient start;
  against PyHessian's ``hessian(...).eigenvalues(top_n=k)`` with its defaults
  (power iteration with deflation, tol 1e-3, maxIter 100), the construction of its
  ``hessian`` object (which builds the kept graph of one batch) included;
* the true relative error of the worst of the k values against `lanczos` at ``tol=1e-9``
  on the same operator (computed once, not timed);
* the fixed cost of a call: a ``top_eigenvalues(k=1)`` call minus its floor in plain torch,
  ``build + c * kept``: ``build`` is one forward and one ``create_graph`` backward per
  batch (what the first product costs on top of a kept-graph product) and ``kept`` one
  backward per batch through the kept graphs, timed in the same rounds (5 repetitions per
  round, medians). What is left is
  everything sharpgen adds: objective set-up, validation, the state snapshot, the checks,
  flattening and Lanczos itself.

The machine is a shared, loaded 2-core CPU: read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
warnings.filterwarnings("ignore")

import bench_estimators as BE  # noqa: E402
from bench_client import make_client  # noqa: E402

from sharpgen import top_eigenvalues  # noqa: E402
from sharpgen.curvature import HessianOperator  # noqa: E402
from sharpgen.linalg import lanczos  # noqa: E402


def problems(which):
    out = {}
    if "mlp" in which:
        m, X, y = BE.make_mlp(torch.Generator().manual_seed(0))
        X = X.float()
        out["anchor MLP (6,154)"] = (BE.train_briefly(m.float(), X, y, 200), (X, y))
    if "cnn" in which:
        m, X, y = BE.make_cnn(torch.Generator().manual_seed(0))
        X = X.float()
        out["anchor CNN (21,786)"] = (BE.train_briefly(m.float(), X, y, 100), (X, y))
    if "client" in which:
        out["client BN CNN, 6 batches (3,866)"] = make_client()
    return out


class PyHessianCall:
    """``hessian(...).eigenvalues(top_n=k)`` on a copy of the model, counting products."""

    def __init__(self, model, data):
        import pyhessian  # noqa: F401  (the module object below)

        self.mod = sys.modules["pyhessian.hessian"]
        self.model, self.data, self.n = copy.deepcopy(model), data, 0
        orig = self.mod.hessian_vector_product

        def counted(*a, **kw):
            self.n += 1
            return orig(*a, **kw)

        self.mod.hessian_vector_product = counted

    def __call__(self, k):
        self.n = 0
        torch.manual_seed(0)
        if isinstance(self.data, tuple):
            ph = self.mod.hessian(self.model, nn.CrossEntropyLoss(), data=self.data, cuda=False)
            vals, _ = ph.eigenvalues(top_n=k)
        else:
            ph = self.mod.hessian(self.model, nn.CrossEntropyLoss(), dataloader=self.data,
                                  cuda=False)  # fmt: skip
            orig = ph.dataloader_hv_product

            def counted(v):
                self.n += 1
                return orig(v)

            ph.dataloader_hv_product = counted
            vals, _ = ph.eigenvalues(top_n=k)
        self.model.zero_grad(set_to_none=True)
        return vals, self.n


def floor_ops(model, data):
    """Plain-torch build of every batch's gradient graph, and one product through them."""
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [data] if isinstance(data, tuple) else list(data)
    total = sum(len(y) for _, y in batches)
    v = [torch.randn_like(p) for p in params]

    def build():
        graphs = []
        for X, y in batches:
            loss = F.cross_entropy(model(X), y) * (len(y) / total)
            graphs.append(torch.autograd.grad(loss, params, create_graph=True))
        return graphs

    kept = build()

    def product():
        out = [torch.zeros_like(p) for p in params]
        for g in kept:
            for o, h in zip(out, torch.autograd.grad(g, params, v, retain_graph=True), strict=True):
                o.add_(h)
        return out

    return {"build graphs": build, "kept product": product}


def tasks_for(model, data, ks, quick):
    ph = PyHessianCall(model, data)

    def ours(k, bound, start="auto"):
        def run():
            g = torch.Generator().manual_seed(0)
            res = top_eigenvalues(model, F.cross_entropy, data, k=k, tol=1e-3, bound=bound,
                                  start=start, generator=g)  # fmt: skip
            return res.eigenvalues.tolist(), res.num_matvecs

        return run

    tasks = {}
    for k in ks:
        tasks[f"top-{k} sharpgen residual"] = ours(k, "residual")
        tasks[f"top-{k} sharpgen gap"] = ours(k, "gap")
        if k == 1:  # the default start of k=1 is the gradient start: the random one beside
            tasks["top-1 sharpgen residual, random start"] = ours(k, "residual", "random")
            tasks["top-1 sharpgen gap, random start"] = ours(k, "gap", "random")
        tasks[f"top-{k} PyHessian"] = lambda k=k: ph(k)
    return tasks


def run_rounds(ops, tasks, rounds):
    res: dict[str, list] = {}
    for fn in list(ops.values()) + list(tasks.values()):
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in {**ops, **tasks}.items():
            # the floor's operations are short: 5 repetitions per round
            for _ in range(1 if name in tasks else 5):
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
                res.setdefault(name, []).append((dt, out) if name in tasks else dt)
    return res


def measure(name, model, data, ks, rounds, quick):
    H = HessianOperator(model, F.cross_entropy, data, backend="autograd", cache_graph=True)
    ref = lanczos(H, k=max(ks) + 1, tol=1e-9, max_iter=400,
                  generator=torch.Generator().manual_seed(5)).eigenvalues  # fmt: skip
    H.clear_cache()
    ops = floor_ops(model, data)
    tasks = tasks_for(model, data, ks, quick)
    res = run_rounds(ops, tasks, rounds)
    rows, times = [], {}
    for key in tasks:
        t = statistics.median(r[0] for r in res[key])
        vals, count = res[key][0][1]
        vals = sorted(vals, reverse=True)
        err = max(abs(v - float(r)) / abs(float(r)) for v, r in zip(vals, ref, strict=False))
        times[key] = (t, count)
        rows.append(f"| {name} | {key} | {t:.3f} s | {count} | {err:.1e} |")
    for k in ks:
        base = times[f"top-{k} PyHessian"][0]
        for key in [c for c in tasks if c.startswith(f"top-{k} sharpgen")]:
            rows.append(f"| {name} | {key} / PyHessian | {times[key][0] / base:.2f} | | |")
    build = statistics.median(res["build graphs"])
    kept = statistics.median(res["kept product"])
    t1, c1 = times["top-1 sharpgen residual"]
    floor = build + c1 * kept
    fixed = t1 - floor
    rows.append(f"| {name} | fixed cost of top-1 (call {t1:.3f} s - floor {floor:.3f} s = "
                f"build {build * 1e3:.1f} ms + {c1} x kept {kept * 1e3:.1f} ms) | "
                f"{100 * fixed / t1:.0f}% of the call | | |")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round, top-1 only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--problems", default="mlp,cnn,client")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds = 1 if args.quick else args.rounds
    ks = (1,) if args.quick else (1, 5)
    load0 = open("/proc/loadavg").read().split()[:3]
    lines = ["| problem | call | time | products | true rel. error |", "|---|---|---|---|---|"]
    for name, (model, data) in problems(args.problems.split(",")).items():
        rows = measure(name, model, data, ks, rounds, args.quick)
        print("\n".join(rows), flush=True)
        lines += rows
    load1 = open("/proc/loadavg").read().split()[:3]
    loads = f"load average {' '.join(load0)} (start) / {' '.join(load1)} (end)"
    head = (f"float32, 1 thread, torch {torch.__version__}; medians of {rounds} interleaved "
            f"rounds; {loads}.")  # fmt: skip
    text = head + "\n\n" + "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
