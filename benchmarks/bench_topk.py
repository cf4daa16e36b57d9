"""Top-k eigenvalues against PyHessian, and the fixed cost of a `top_eigenvalues` call.

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/bench_topk.py [--quick] [--rounds 3]
        [--pairs 8] [--problems mlp,cnn,client] [--out topk.md]

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
* the fixed cost of a call: the default ``top_eigenvalues(k=1)`` call against a complete
  plain-torch Lanczos timed as one call (``plain_lanczos.plain_top1``, no sharpgen in it:
  the data read and every batch's ``create_graph`` gradient graph built inside the call,
  Lanczos with full reorthogonalization for exactly sharpgen's number of products from the
  same gradient start, the tridiagonal eigenvalue at the end; checked once to agree with
  sharpgen's eigenvalue to 2e-4), in ``--pairs`` back-to-back pairs per round, strictly
  alternating; fixed cost = (sharpgen - plain) / sharpgen, the median over all pairs (the
  helpers are ``bench_client.py``'s). What is left is everything sharpgen adds: objective
  set-up and validation, the state snapshot, the checks, flattening, Lanczos' stopping test;
* the oracle stop of top-1: the fewest products (gradient start, the plain Lanczos' Ritz
  values) whose true relative error is <= 1e-3, beside the product counts of sharpgen's two
  stopping rules and PyHessian's; its count over PyHessian's is a lower bound of the top-1
  time ratio at per-product parity, printed beside the measured ratios and the timed plain
  Lanczos stopped by the oracle.

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
from bench_client import FIXED_HEAD, fixed_cost, make_client, time_pairs, top1_and_floor  # noqa: E402
from plain_lanczos import oracle_products, plain_top1  # noqa: E402

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


def tasks_for(model, data, ks):
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


def run_rounds(tasks, rounds, floor):
    """Interleaved rounds: every task once, then the fixed cost's pairs (``floor``)."""
    res: dict[str, list] = {"fixed cost pairs": []}
    for fn in tasks.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in tasks.items():
            t0 = time.perf_counter()
            out = fn()
            res.setdefault(name, []).append((time.perf_counter() - t0, out))
        time_pairs(*floor, res["fixed cost pairs"])
    return res


def oracle(model, data, truth, products):
    """The oracle stop of top-1 (gradient start) and the plain Lanczos stopped there."""
    ritz, _ = plain_top1(model, F.cross_entropy, data, max(40, 2 * products), ritz=True)
    n = oracle_products(ritz, truth)
    if n is None:
        raise SystemExit(f"no Ritz value within 1e-3 of {truth} after {len(ritz)} products")

    def run():
        return [plain_top1(model, F.cross_entropy, data, n)[0]], n

    return n, run


def measure(name, model, data, ks, rounds, pairs):
    H = HessianOperator(model, F.cross_entropy, data, backend="autograd", cache_graph=True)
    ref = lanczos(H, k=max(ks) + 1, tol=1e-9, max_iter=400,
                  generator=torch.Generator().manual_seed(5)).eigenvalues  # fmt: skip
    H.clear_cache()
    ours, plain, n_res, agreement = top1_and_floor(model, data, name)
    tasks = tasks_for(model, data, ks)
    n_oracle, tasks["top-1 plain torch, oracle stop"] = oracle(model, data, float(ref[0]), n_res)
    res = run_rounds(tasks, rounds, (ours, plain, pairs))
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
    fixed = f"| {name} | {fixed_cost(res['fixed cost pairs'], n_res)} |"
    # at per-product parity: the plain call's build and per-product time for both counts
    t_p = statistics.median(p for _, p, _ in res["fixed cost pairs"])
    build = statistics.median(b for _, _, b in res["fixed cost pairs"])
    per = (t_p - build) / n_res
    t_ph, n_ph = times["top-1 PyHessian"]
    parity = (build + n_oracle * per) / (build + n_ph * per)
    ratio = {key[6:]: times[key][0] / t_ph for key in times if key.startswith("top-1")}
    bound = (f"| {name} | {n_oracle} / {n_res} / {times['top-1 sharpgen gap'][1]} / {n_ph} | "
             f"**{n_oracle / n_ph:.2f}** | {parity:.2f} | "
             f"{ratio['plain torch, oracle stop']:.2f} | "
             f"{ratio['sharpgen residual']:.2f} / {ratio['sharpgen gap']:.2f} |")  # fmt: skip
    return rows, fixed, bound, agreement


BOUND_HEAD = (
    "| problem | top-1 products: oracle / residual / gap / PyHessian | lower bound of the time "
    "ratio, oracle / PyHessian products | (build + oracle x P) / (build + PyHessian's x P), "
    "plain torch's build and P | measured: plain torch stopped by the oracle / PyHessian | "
    "measured: sharpgen residual / gap over PyHessian |\n|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round, top-1 only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=8, help="fixed-cost pairs per round")
    ap.add_argument("--problems", default="mlp,cnn,client")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds = 1 if args.quick else args.rounds
    pairs = 2 if args.quick else args.pairs
    ks = (1,) if args.quick else (1, 5)
    load0 = open("/proc/loadavg").read().split()[:3]
    lines = ["| problem | call | time | products | true rel. error |", "|---|---|---|---|---|"]
    fixed, bounds, agree = [FIXED_HEAD], [BOUND_HEAD], []
    for name, (model, data) in problems(args.problems.split(",")).items():
        rows, f, b, a = measure(name, model, data, ks, rounds, pairs)
        print("\n".join([*rows, f, b]), flush=True)
        lines += rows
        fixed.append(f)
        bounds.append(b)
        agree.append(f"{a:.0e}")
    load1 = open("/proc/loadavg").read().split()[:3]
    loads = f"load average {' '.join(load0)} (start) / {' '.join(load1)} (end)"
    head = (f"float32, 1 thread, torch {torch.__version__}; medians of {rounds} interleaved "
            f"rounds; {loads}.")  # fmt: skip
    note = (f"The plain-torch floor's top eigenvalue agreed with sharpgen's to "
            f"{', '.join(agree)} (relative).")  # fmt: skip
    parts = [head, "\n".join(lines), "\n".join(fixed), "\n".join(bounds), note]
    text = "\n\n".join(parts) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
