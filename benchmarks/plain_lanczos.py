"""A plain-torch top-1 Lanczos: the floor that ``bench_topk.py`` and ``bench_client.py`` time.

No sharpgen in here. This is what a user would write by hand for the top Hessian eigenvalue
of the dataset mean loss, doing the same work as one ``top_eigenvalues(k=1)`` call:

1. read the data (a DataLoader is iterated here, inside the call) and build every batch's
   ``create_graph=True`` gradient graph, the batch's mean loss weighted by its size (so the
   sum is the dataset mean loss; the gradient is a by-product);
2. Lanczos with full reorthogonalization (classical Gram-Schmidt twice) for a given number
   of Hessian-vector products, each one backward pass per batch through the kept graphs,
   from the gradient start $g/\\|g\\| + 0.3\\, r/\\|r\\|$ ($r$ Gaussian from a seeded
   generator) or from $r$ alone;
3. the largest eigenvalue of the tridiagonal matrix, at the end only (no stopping test).
"""

from __future__ import annotations

import time

import torch

MIX = 0.3  # weight of the random unit vector in the gradient start


def plain_top1(model, loss_fn, data, num_products, *, gradient_start=True, seed=0, ritz=False):
    """Top Hessian eigenvalue by ``num_products`` Lanczos steps, in plain torch.

    Returns ``(value, build_seconds)``; with ``ritz=True`` ``(ritz_values, build_seconds)``,
    the largest Ritz value after each of the ``num_products`` products.
    """
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [data] if isinstance(data, tuple) else data
    graphs, total = [], 0
    for X, y in batches:
        loss = loss_fn(model(X), y) * len(y)  # the batch's share of the dataset sum
        graphs.append(torch.autograd.grad(loss, params, create_graph=True))
        total += len(y)
    sizes = [p.numel() for p in params]
    build = time.perf_counter() - t0

    def hvp(v):
        parts = [c.view_as(p) for c, p in zip(v.split(sizes), params, strict=True)]
        out = 0.0
        for g in graphs:
            hv = torch.autograd.grad(g, params, parts, retain_graph=True)
            out = out + torch.cat([h.reshape(-1) for h in hv])
        return out / total

    n = sum(sizes)
    r = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    v = r / r.norm()
    if gradient_start:
        g = sum(torch.cat([t.detach().reshape(-1) for t in gr]) for gr in graphs) / total
        v = g / g.norm() + MIX * v
    Q = torch.empty(num_products + 1, n)
    Q[0] = v / v.norm()
    T = torch.zeros(num_products, num_products, dtype=torch.float64)
    for j in range(num_products):
        w = hvp(Q[j])
        h = Q[: j + 1] @ w  # full reorthogonalization, twice
        w = w - h @ Q[: j + 1]
        w = w - (Q[: j + 1] @ w) @ Q[: j + 1]
        beta = w.norm()
        T[j, j] = float(h[j])
        if j + 1 < num_products:
            T[j, j + 1] = T[j + 1, j] = float(beta)
        Q[j + 1] = w / beta
    if ritz:
        return [
            float(torch.linalg.eigvalsh(T[:m, :m])[-1]) for m in range(1, num_products + 1)
        ], build
    return float(torch.linalg.eigvalsh(T)[-1]), build


def oracle_products(ritz_values, truth, rtol=1e-3):
    """The fewest products whose Ritz value is within ``rtol`` (relative) of ``truth``."""
    for m, value in enumerate(ritz_values, start=1):
        if abs(value - truth) <= rtol * abs(truth):
            return m
    return None


def check_agrees(plain, ours, what, rtol=2e-4):
    """Stop the benchmark if the floor's eigenvalue is not sharpgen's (then it is no floor)."""
    if abs(plain - ours) > rtol * abs(ours):
        raise SystemExit(f"{what}: plain-torch floor {plain!r} != sharpgen {ours!r} (rtol {rtol})")
    return abs(plain - ours) / abs(ours)
