"""A user-style client: a small BatchNorm CNN trained on scikit-learn's digits, PyHessian beside.

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/bench_client.py [--quick] [--rounds 3]
        [--trace] [--pairs 8] [--out client.md]

The model (3,866 parameters: conv 1->8 3x3 + BatchNorm + ReLU, conv 8->16 3x3 + BatchNorm +
ReLU, maxpool 2, linear 256->10) is trained for a few epochs with Adam on the first 1,000
images of scikit-learn's digits (8x8), then put in eval mode. The data is a
``torch.utils.data.DataLoader`` over those 1,000 images with batch size 192: 6 batches, the
last one of 40 (uneven). float32, 1 thread.

Measured in one process, interleaved rounds (every operation once per round), medians:

* one Hessian-vector product over the whole loader: sharpgen `HessianOperator` (default,
  and ``cache_graph=True``) against PyHessian's ``dataloader_hv_product``; one gradient over
  the loader as the unit;
* top-1 and top-5 eigenvalues: sharpgen `top_eigenvalues` (tol 1e-3) against PyHessian's
  ``eigenvalues(top_n=...)`` (power iteration, its defaults tol 1e-3, maxIter 100): wall time,
  products and the true relative error of the worst eigenvalue against
  `lanczos(tol=1e-10)` on the same operator;
* with ``--trace``: the trace, `hessian_trace` (default ``rtol=0.01``) against PyHessian's
  ``trace()`` (defaults), with the relative error against an exact trace (3,866 products,
  once);
* "one objective, several measures": `hessian_trace` (30 products), `top_eigenvalues`
  (k=5) and `spectral_density` (2 probes x 15 steps) in a row, on one `ModelObjective`
  (its kept graphs serve all three) against three calls with ``(model, loss_fn, loader)``;
* the fixed cost of a call: the default `top_eigenvalues(k=1)` call against a complete
  plain-torch Lanczos timed as one call (``plain_lanczos.plain_top1``: the loader read and
  every batch's graph built inside the call, the same number of products from the same
  gradient start, checked once to give the same eigenvalue), in ``--pairs`` back-to-back
  pairs per round, strictly alternating; fixed cost = (sharpgen - plain) / sharpgen, the
  median over all pairs (shared with ``bench_topk.py``).

The machine is a shared, loaded 2-core CPU: read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from plain_lanczos import check_agrees, plain_top1  # noqa: E402

from sharpgen import hessian_trace, spectral_density, top_eigenvalues  # noqa: E402
from sharpgen.curvature import HessianOperator, ModelObjective  # noqa: E402
from sharpgen.linalg import lanczos  # noqa: E402

warnings.filterwarnings("ignore")


def make_client(epochs: int = 5):
    """The trained BatchNorm CNN (eval mode) and a DataLoader of 6 batches, the last uneven."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:1000] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y[:1000])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for s in range(0, 1000, 64):
            opt.zero_grad()
            F.cross_entropy(model(X[s : s + 64]), y[s : s + 64]).backward()
            opt.step()
    model.eval()
    ds = torch.utils.data.TensorDataset(X, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=192, shuffle=False)
    return model, loader


class Counter:
    """Counts PyHessian's products by wrapping its module-level function."""

    def __init__(self, ph):
        self.n = 0
        orig = ph.dataloader_hv_product

        def wrapped(v):
            self.n += 1
            return orig(v)

        ph.dataloader_hv_product = wrapped


def pyhessian_for(model, loader):
    from pyhessian import hessian

    ph = hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), dataloader=loader, cuda=False)
    return ph, Counter(ph)


def rel_err(values, truth):
    return max(abs(float(v) - float(t)) / abs(float(t)) for v, t in zip(values, truth, strict=True))


def top1_and_floor(model, data, what):
    """The default sharpgen top-1 call and its plain-torch floor (same products, same start).

    Runs both once, untimed, and stops if their eigenvalues differ by more than 2e-4
    (relative): then the floor would not be doing the same work. Returns ``(ours, plain,
    products, agreement)``; ``ours()`` and ``plain()`` return ``(seconds, build_seconds)``,
    build_seconds None for sharpgen.
    """

    def call():
        res = top_eigenvalues(model, F.cross_entropy, data, k=1, tol=1e-3,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
        return float(res.eigenvalues[0]), res.num_matvecs

    value, products = call()
    agreement = check_agrees(plain_top1(model, F.cross_entropy, data, products)[0], value, what)

    def ours():
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0, None

    def plain():
        t0 = time.perf_counter()
        _, build = plain_top1(model, F.cross_entropy, data, products)
        return time.perf_counter() - t0, build

    return ours, plain, products, agreement


def time_pairs(ours, plain, count, out):
    """``count`` back-to-back (sharpgen, plain) pairs, appended to out.

    Strictly alternating (sharpgen, plain, sharpgen, plain, ...): each call follows a call
    of the other kind. On the client a call that followed one of its own kind ran faster:
    with the order flipped inside the pairs, the fraction differed by about 9 points
    between the two orders.
    """
    for _ in range(count):
        (t_o, _), (t_p, build) = ours(), plain()
        out.append((t_o, t_p, build))


def fixed_cost(pairs, products):
    """The fixed cost of a call from the timed pairs, as a Markdown row's cells."""
    fracs = sorted((o - p) / o for o, p, _ in pairs)
    t_o = statistics.median(o for o, _, _ in pairs)
    t_p = statistics.median(p for _, p, _ in pairs)
    build = statistics.median(b for _, _, b in pairs)
    q1, q3 = fracs[len(fracs) // 4], fracs[(3 * len(fracs)) // 4]
    return (f"{t_o * 1e3:.1f} ms | {t_p * 1e3:.1f} ms (build {build * 1e3:.1f} ms + {products} "
            f"products {(t_p - build) / products * 1e3:.1f} ms each) | "
            f"**{100 * statistics.median(fracs):.0f}%** ({100 * q1:.0f}% to {100 * q3:.0f}%, "
            f"{len(fracs)} pairs)")  # fmt: skip


FIXED_HEAD = (
    "| problem | sharpgen top-1 call | plain-torch Lanczos, same products and start | "
    "fixed cost: median (quartiles) of (sharpgen - plain) / sharpgen |\n|---|---|---|---|"
)


def make_tasks(model, loader, ph, ph_count, quick, trace=False):
    """The timed calls; each returns ``(values, products)``."""

    def eig_sharpgen(k):
        res = top_eigenvalues(
            model, F.cross_entropy, loader, k=k, tol=1e-3,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        return res.eigenvalues.tolist(), res.num_matvecs

    def eig_pyhessian(k):
        ph_count.n = 0
        torch.manual_seed(0)
        vals, _ = ph.eigenvalues(top_n=k)
        return vals, ph_count.n

    def trace_sharpgen():
        res = hessian_trace(
            model, F.cross_entropy, loader, generator=torch.Generator().manual_seed(0)
        )
        return [res.value], res.num_matvecs

    def trace_pyhessian():
        ph_count.n = 0
        torch.manual_seed(0)
        return [statistics.mean(ph.trace())], ph_count.n

    def three_measures(objective):
        def g():
            return torch.Generator().manual_seed(0)

        args = (objective,) if objective is not None else (model, F.cross_entropy, loader)
        a = hessian_trace(*args, num_matvecs=30, generator=g())
        b = top_eigenvalues(*args, k=5, tol=1e-3, generator=g())
        c = spectral_density(*args, num_probes=2, num_steps=15, generator=g())
        return [a.value], a.num_matvecs + b.num_matvecs + c.num_matvecs

    tasks = {
        "top-1 sharpgen": lambda: eig_sharpgen(1),
        "top-1 PyHessian": lambda: eig_pyhessian(1),
    }
    if not quick:
        tasks["top-5 sharpgen"] = lambda: eig_sharpgen(5)
        tasks["top-5 PyHessian"] = lambda: eig_pyhessian(5)
    if trace:
        tasks["trace sharpgen"] = trace_sharpgen
        tasks["trace PyHessian"] = trace_pyhessian
    if not quick:
        tasks["3 measures, separate calls"] = lambda: three_measures(None)
        tasks["3 measures, one objective"] = lambda: three_measures(
            ModelObjective(model, F.cross_entropy, loader)
        )
    return tasks


def run_rounds(ops, tasks, rounds, floor=None):
    """Interleaved rounds: every operation and task once per round, then the floor's pairs.

    ``floor`` is ``(ours, plain, pairs)`` (see `top1_and_floor`); its pairs go to
    ``results["fixed cost pairs"]``.
    """
    results: dict[str, list] = {"fixed cost pairs": []}
    for fn in ops.values():
        fn()
    for _ in range(rounds):
        if floor is not None:
            time_pairs(*floor, results["fixed cost pairs"])
        for name, fn in ops.items():
            t0 = time.perf_counter()
            fn()
            results.setdefault(name, []).append(time.perf_counter() - t0)
        for name, fn in tasks.items():
            t0 = time.perf_counter()
            vals, count = fn()
            results.setdefault(name, []).append((time.perf_counter() - t0, count, vals))
    return results


def task_error(name, vals, top, exact_trace):
    if name.startswith("3 measures"):
        return 0.0
    if name.startswith("trace"):
        return abs(vals[0] - exact_trace) / abs(exact_trace)
    return rel_err(sorted(vals, reverse=True), top[: len(vals)])


def report(results, ops, tasks, top, exact_trace, floor_products=None):
    med = {k: statistics.median(results[k]) for k in ops}
    g = med["gradient over the loader"]
    print("| quantity | value |\n|---|---|")
    print(f"| one gradient over the loader | {g * 1e3:.1f} ms |")
    for k in ops:
        if k != "gradient over the loader":
            print(f"| {k}: time / gradient | {med[k] / g:.2f}x ({med[k] * 1e3:.1f} ms) |")
    ratio = med["HVP sharpgen default"] / med["HVP PyHessian"]
    print(f"| HVP sharpgen default / PyHessian | {ratio:.2f} |")
    summary = {}
    for name in tasks:
        runs = results[name]
        t = statistics.median(r[0] for r in runs)
        count, vals = runs[0][1], runs[0][2]
        err = task_error(name, vals, top, exact_trace)
        summary[name] = (t, count)
        print(f"| {name} | {t:.2f} s, {count} products, error {err:.1e} |")
    pairs = [(f"{w}: sharpgen time / PyHessian time", f"{w} sharpgen", f"{w} PyHessian")
             for w in ("top-1", "top-5", "trace")]  # fmt: skip
    pairs.append(("trace + top-5 + density: one objective / separate calls",
                  "3 measures, one objective", "3 measures, separate calls"))  # fmt: skip
    for label, a, b in pairs:
        if a in summary and b in summary:
            print(f"| {label} | {summary[a][0] / summary[b][0]:.2f} |")
    if results["fixed cost pairs"]:
        print("\n" + FIXED_HEAD)
        print(f"| client | {fixed_cost(results['fixed cost pairs'], floor_products)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, no trace, no top-5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trace", action="store_true", help="also the trace (an exact reference)")
    ap.add_argument("--pairs", type=int, default=8, help="fixed-cost pairs per round")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    load0 = " ".join(open("/proc/loadavg").read().split()[:3])
    torch.set_num_threads(1)
    rounds = 2 if args.quick else args.rounds
    model, loader = make_client()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    H = HessianOperator(model, F.cross_entropy, loader)
    top = lanczos(H, k=5, tol=1e-10, generator=torch.Generator().manual_seed(0))
    top = top.eigenvalues.tolist()
    exact_trace = None
    if args.trace:
        exact_trace = float(hessian_trace(model, F.cross_entropy, loader, exact_threshold=n))
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=gen)
    H_cached = HessianOperator(model, F.cross_entropy, loader, cache_graph=True)
    ph, ph_count = pyhessian_for(model, loader)
    ph_v = [torch.randn(p.shape, generator=gen) for p in ph.params]

    def grad_loader():
        for xb, yb in loader:
            torch.autograd.grad(F.cross_entropy(model(xb), yb), params)

    ops = {
        "gradient over the loader": grad_loader,
        "HVP sharpgen default": lambda: H.matvec(v),
        "HVP sharpgen cache_graph=True": lambda: H_cached.matvec(v),
        "HVP PyHessian": lambda: ph.dataloader_hv_product(ph_v),
    }
    tasks = make_tasks(model, loader, ph, ph_count, args.quick, args.trace)
    ours, plain, products, agreement = top1_and_floor(model, loader, "client")
    results = run_rounds(ops, tasks, rounds, (ours, plain, args.pairs))
    load1 = " ".join(open("/proc/loadavg").read().split()[:3])
    head = (f"{n} parameters, DataLoader of 6 batches (192 x 5 + 40), float32, 1 thread, "
            f"torch {torch.__version__}; medians of {rounds} interleaved rounds; load average "
            f"{load0} (start) / {load1} (end).")  # fmt: skip
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report(results, ops, tasks, top, exact_trace, products)
    print(
        f"\nThe plain-torch floor's top eigenvalue agrees with sharpgen's to {agreement:.1e} "
        "(relative).",
        file=buf,
    )
    text = head + "\n\n" + buf.getvalue()
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
