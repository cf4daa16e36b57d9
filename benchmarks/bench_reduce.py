"""Errors and times of torch's float32 reductions against `sharpgen.linalg._reduce` (CPU).

For each reduction over ``n`` numbers (default 3e7, GPT-2 small is 1.24e8): torch's float32
form, its relative error against float64, and sharpgen's accurate form, with the time of
each (best of 3). Vectors: Gaussian (``x``) and positive uniform (``y``, the worst case:
terms of one sign, as in a quadratic form of a positive diagonal), blocks ``(n, k)``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_reduce.py --n 30000000 --k 4
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from sharpgen.linalg._reduce import column_dots, dot, gram, norm, orthonormalize

T = TypeVar("T")


def _best(f: Callable[[], T], reps: int = 3) -> tuple[T, float]:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return out, best


def _err(value: torch.Tensor, truth: torch.Tensor) -> float:
    return float(((value.double() - truth).abs() / truth.abs()).max())


def _gram64(X: torch.Tensor, Y: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    out = torch.zeros(X.shape[1], Y.shape[1], dtype=torch.float64)
    for c in range(0, X.shape[0], chunk):
        out += X[c : c + chunk].double().T @ Y[c : c + chunk].double()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=30_000_000)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    n, k = args.n, args.k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    y = torch.rand(n, generator=g)
    X = torch.rand(n, k, generator=g)
    xx = torch.tensor(float(_gram64(x[:, None], x[:, None])))
    yy = torch.tensor(float(_gram64(y[:, None], y[:, None])))
    XX = _gram64(X, X)
    rows = [
        ("norm(x), Gaussian", lambda: torch.linalg.vector_norm(x), lambda: norm(x), xx.sqrt()),
        ("y . y, positive", lambda: torch.dot(y, y), lambda: dot(y, y), yy),
        ("column dots, dot per column", lambda: torch.stack([torch.dot(c, c) for c in X.T]),
         lambda: column_dots(X, X), XX.diag()),
        ("vector_norm(X, dim=0)", lambda: torch.linalg.vector_norm(X, dim=0),
         lambda: column_dots(X, X).sqrt(), XX.diag().sqrt()),
        ("X.T @ X (k, k)", lambda: X.T @ X, lambda: gram(X, X), XX),
    ]  # fmt: skip
    print(f"n = {n:.3g}, k = {k}, threads = {torch.get_num_threads()}")
    print("| reduction | torch error | torch s | sharpgen error | sharpgen s |")
    print("|---|---|---|---|---|")
    for name, plain, accurate, truth in rows:
        p, tp = _best(plain)
        a, ta = _best(accurate)
        print(f"| {name} | {_err(p, truth):.1e} | {tp:.3f} | {_err(a, truth):.1e} | {ta:.3f} |")
    eye = torch.eye(k, dtype=torch.float64)
    (Q, _), tq = _best(lambda: torch.linalg.qr(torch.randn(n, k, generator=g)), 1)
    (Q2, _), to = _best(lambda: orthonormalize(Q), 1)
    before = float((_gram64(Q, Q) - eye).abs().max())
    after = float((_gram64(Q2, Q2) - eye).abs().max())
    print(
        f"| QR of (n, k): max abs(Q^T Q - I) | {before:.1e} | {tq:.3f} | {after:.1e} | +{to:.3f} |"
    )


if __name__ == "__main__":
    main()
