"""The default `hessian_trace` on the user-style client against PyHessian's default `trace()`.

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/bench_trace_client.py [--seeds 4]
        [--reference-matvecs 400 | --exact | --reference VALUE,STDERR] [--rtol 0.03,0.1]
        [--out table.md]

The client is `bench_client.py`'s: a BatchNorm CNN (3,866 parameters) trained on scikit-learn's
digits, eval mode, a DataLoader of 6 batches with an uneven last one, float32, 1 thread.

Reference trace: `hessian_trace(method="exact")` with ``--exact`` (3,866 products), else
`xtrace` with ``--reference-matvecs`` products (its ``stderr`` is the reference's
resolution). Then, for each seed, interleaved in one process: `hessian_trace` with its
defaults (``rtol=0.01``; the probes from ``torch.Generator().manual_seed(seed)``) and
PyHessian's ``trace()`` with its defaults (``maxIter=100, tol=1e-3``; ``torch.manual_seed``).
``--rtol`` adds `hessian_trace(rtol=R)` rows, one per comma-separated value. Reported per
library: products, wall time, the true relative error (per seed and the RMSE over seeds), the
reported relative stderr (sharpgen only; PyHessian reports none) and the method sharpgen used.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_client import make_client, pyhessian_for  # noqa: E402

from sharpgen import hessian_trace  # noqa: E402


def reference(model, loader, exact: bool, matvecs: int) -> tuple[float, float, str]:
    if exact:
        n = sum(p.numel() for p in model.parameters())
        res = hessian_trace(model, F.cross_entropy, loader, method="exact", exact_threshold=n)
        return res.value, 0.0, "exact"
    res = hessian_trace(
        model, F.cross_entropy, loader, method="xtrace", num_matvecs=matvecs,
        generator=torch.Generator().manual_seed(12345),
    )  # fmt: skip
    return res.value, res.stderr, f"xtrace, {res.num_matvecs} products"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--reference-matvecs", type=int, default=400)
    ap.add_argument("--exact", action="store_true", help="exact reference (3,866 products)")
    ap.add_argument(
        "--reference", default="", help="VALUE,STDERR of a reference computed before (skips it)"
    )
    ap.add_argument(
        "--rtol", default="", help="also run hessian_trace(rtol=R) per seed, e.g. 0.03,0.1"
    )
    ap.add_argument("--out", default="", help="also write the markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, loader = make_client()
    if args.reference:
        ref, ref_se = (float(x) for x in args.reference.split(","))
        ref_how = "given"
    else:
        ref, ref_se, ref_how = reference(model, loader, args.exact, args.reference_matvecs)
    ph, ph_count = pyhessian_for(model, loader)
    variants: dict[str, dict[str, float]] = {"sharpgen": {}}
    for r in (float(x) for x in args.rtol.split(",") if x.strip()):
        variants[f"sharpgen rtol={r:g}"] = {"rtol": r}
    rows: dict[str, list[tuple[int, float, float, float]]] = {n: [] for n in variants}
    rows["PyHessian"] = []
    methods: dict[str, set[str]] = {n: set() for n in variants}
    for seed in range(args.seeds):
        for name, kwargs in variants.items():
            t0 = time.perf_counter()
            res = hessian_trace(
                model, F.cross_entropy, loader, generator=torch.Generator().manual_seed(seed),
                **kwargs,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            rel_se = res.stderr / abs(res.value)
            methods[name].add(res.method)
            rows[name].append((res.num_matvecs, wall, (res.value - ref) / ref, rel_se))
        ph_count.n = 0
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        value = statistics.mean(ph.trace())
        wall = time.perf_counter() - t0
        rows["PyHessian"].append((ph_count.n, wall, (value - ref) / ref, math.nan))
    load = Path("/proc/loadavg").read_text().split()[0]
    lines = [
        f"reference trace {ref:.6g} ({ref_how}; relative stderr {ref_se / abs(ref):.1e}); "
        f"{args.seeds} seeds; float32, 1 thread, torch {torch.__version__}; load {load}",
        "",
        "| library | products (per seed) | wall s (median) | rel. error per seed | "
        "rel. RMSE | reported rel. stderr (median) | method |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        rmse = math.sqrt(statistics.mean(e[2] ** 2 for e in r))
        se = statistics.median(e[3] for e in r)
        lines.append(
            f"| {name} | {', '.join(str(e[0]) for e in r)} | "
            f"{statistics.median(e[1] for e in r):.2f} | "
            f"{', '.join(f'{e[2]:+.1e}' for e in r)} | {rmse:.1e} | "
            f"{'-' if math.isnan(se) else f'{se:.1e}'} | "
            f"{'/'.join(sorted(methods.get(name, {'hutchinson'})))} |"
        )
    ratio = statistics.median(e[1] for e in rows["sharpgen"]) / statistics.median(
        e[1] for e in rows["PyHessian"]
    )
    lines.append(f"\nwall time sharpgen default / PyHessian (medians): {ratio:.2f}")
    for name in list(variants)[1:]:
        r = statistics.median(e[1] for e in rows[name]) / statistics.median(
            e[1] for e in rows["PyHessian"]
        )
        lines.append(f"wall time {name} / PyHessian (medians): {r:.2f}")
    lines.append(f"load at the end {Path('/proc/loadavg').read_text().split()[0]}")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
