r"""Dot products, norms and Gram matrices of long vectors, accurate where torch's are not.

On a CPU, ``torch.dot`` and ``torch.linalg.vector_norm`` of float32 vectors accumulate
with a relative error that grows with the length: for the norm of a Gaussian vector
(torch 2.13, one thread or two) $2.9\cdot 10^{-5}$ at $n = 2\cdot 10^6$,
$1.7\cdot 10^{-3}$ at $3\cdot 10^7$ and $1.3\cdot 10^{-2}$ at $1.24\cdot 10^8$ (GPT-2
small), the computed value too small. A Lanczos row divided by such a norm is 1% too
long, and a Rayleigh quotient of terms of one sign is off as much: more than
``tol=1e-3`` allows. Matrix products over the long dimension are worse: ``X.T @ Y`` of two
``(n, k)`` blocks of positive numbers is $6.6\cdot 10^{-2}$ off at $n = 3\cdot 10^7$, the
column norms of ``vector_norm(X, dim=0)`` $3.5\cdot 10^{-2}$, and the ``Q`` of
``torch.linalg.qr`` has columns $1.7\cdot 10^{-3}$ too long. (``torch.sum``, also along
``dim=0``, is accurate, by cascade summation, but needs the product as a temporary.)

Here, on a CPU, the vectors are cut into blocks of `BLOCK` numbers (`GRAM_BLOCK` rows for
`gram`); each block's product is summed by ``torch.sum`` (cascade summation, a temporary
of one block) or one small matrix product, and the block sums are added in float64. The
error is about $\epsilon$ of float32 for `dot` ($2\cdot 10^{-8}$ at $3\cdot 10^7$, where
``torch.dot`` was off by $7\cdot 10^{-3}$ on a vector of a few large entries) and below
$10^{-6}$ for `gram` ($8\cdot 10^{-7}$ where ``X.T @ X`` was $6.6\cdot 10^{-2}$ off), at
about twice the time of ``torch.dot`` (0.06 s for $3\cdot 10^7$ numbers on one core) and
the time of ``X.T @ Y`` (``benchmarks/bench_reduce.py``). One torch call takes `GROUP`
blocks (a chunk of 4 Mi numbers), not one: one call per block, each split over the
threads, was ten times slower on two threads beside another busy process (246 s against
24 s in a GPT-2 small `top_eigenvalues` call). float64 vectors, short ones and CUDA (tree
reductions) use torch's own reductions, except `gram` and `orthonormalize`, which block on
every device (cuBLAS chooses how a long matrix product accumulates; not measured on a
GPU). The functions work under ``torch.func.vmap`` (no in-place
accumulation).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "GRAM_BLOCK",
    "GROUP",
    "column_dots",
    "column_norms",
    "dot",
    "gram",
    "is_long",
    "norm",
    "orthonormalize",
    "sub_dot",
    "sub_norm",
]

#: Numbers per block summed by one ``torch.sum``.
BLOCK = 1 << 16
#: Blocks per torch call (a chunk of 4 Mi numbers, a 16 MiB float32 temporary): a loop of
#: one call per block cost 1.8 s per dot product of GPT-2 small's 1.24e8 numbers on two
#: threads beside another process (each call split over both threads), 0.05 s in chunks.
GROUP = 64
#: Rows per block of one ``X.T @ Y`` in `gram` (its error stays below 1e-6).
GRAM_BLOCK = 1 << 14


def is_long(x: Tensor, rows: int | None = None, *, any_device: bool = False) -> bool:
    """Whether reductions over ``x`` (``rows`` of it, default all its numbers) need blocks.

    On a CPU only, unless ``any_device`` (for the matrix products of `gram`, whose
    accumulation order on an accelerator is the BLAS library's choice).
    """
    size = x.numel() if rows is None else rows
    on_cpu = any_device or x.device.type == "cpu"
    return x.dtype != torch.float64 and on_cpu and size > BLOCK


def _chunks(n: int, block: int = BLOCK, group: int | None = None) -> list[tuple[int, int]]:
    """``[c, e)`` spans of ``group`` (default `GROUP`) blocks of ``block`` (the last shorter)."""
    step = block * (GROUP if group is None else group)
    return [(c, min(c + step, n)) for c in range(0, n, step)]


def _summed(t: Tensor, block: int = BLOCK) -> Tensor:
    """The sum of the 1-d (or rows of the 2-d) ``t`` in float64: each block by ``torch.sum``."""
    full = t.shape[0] // block * block
    head = t[:full].reshape(full // block, block, *t.shape[1:]).sum(1).sum(0, dtype=torch.float64)
    if full == t.shape[0]:
        return head
    return head + t[full:].sum(0, dtype=torch.float64)


def dot(x: Tensor, y: Tensor) -> Tensor:
    """``x . y`` of two vectors as a 0-d float64 tensor on their device (see the module)."""
    if not is_long(x):
        return torch.dot(x, y).to(torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for c, e in _chunks(x.numel()):
        total = total + _summed(torch.mul(x[c:e], y[c:e]))
    return total


def sub_dot(w: Tensor, x: Tensor | None, a: float, v: Tensor) -> Tensor:
    """``w -= a x`` in place, then ``v . w`` (0-d float64): one pass over each chunk in cache.

    The first half of a Lanczos step; ``x`` None (or ``a = 0``) only takes the product.
    """
    if not is_long(w):
        if x is not None and a != 0.0:
            w.sub_(x, alpha=a)
        return torch.dot(v, w).to(torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for c, e in _chunks(w.numel()):
        part = w[c:e]
        if x is not None and a != 0.0:
            part.sub_(x[c:e], alpha=a)
        total = total + _summed(torch.mul(v[c:e], part))
    return total


def sub_norm(w: Tensor, v: Tensor, a: Tensor) -> Tensor:
    """``w -= a v`` in place (``a`` a 0-d tensor), then ``||w||`` (0-d float64), one pass."""
    if not is_long(w):
        w.addcmul_(v, a.to(w.dtype), value=-1.0)  # no temporary vector, no host sync
        return torch.linalg.vector_norm(w).to(torch.float64)
    alpha = float(a)
    total = torch.zeros((), dtype=torch.float64)
    for c, e in _chunks(w.numel()):
        part = w[c:e]
        part.sub_(v[c:e], alpha=alpha)
        total = total + _summed(torch.mul(part, part))
    return total.sqrt()


def norm(x: Tensor) -> Tensor:
    """``||x||`` as a 0-d float64 tensor (see the module)."""
    return dot(x, x).sqrt()


def column_dots(X: Tensor, Y: Tensor) -> Tensor:
    r"""$(x_j^\top y_j)_j$ of the columns of two ``(n, k)`` blocks, float64, no ``(n, k)`` copy.

    Long blocks are taken ``GROUP`` blocks of ``BLOCK // k`` rows at a time (a temporary of
    ``GROUP * BLOCK`` numbers, each block summed along the rows): on row-major blocks
    faster than a ``torch.dot`` per (strided) column, 0.10 s against 0.42 s for
    $10^7 \times 8$ numbers and 0.14 s against 2.4 s for $3\cdot 10^6 \times 32$ on one
    core.
    """
    n, k = X.shape
    if k == 0:
        return torch.zeros(0, dtype=torch.float64, device=X.device)
    if not is_long(X, n):
        return torch.stack([torch.dot(X[:, j], Y[:, j]) for j in range(k)]).to(torch.float64)
    rows = max(1, BLOCK // k)
    total = torch.zeros(k, dtype=torch.float64)
    for c, e in _chunks(n, rows):
        total = total + _summed(torch.mul(X[c:e], Y[c:e]), rows)
    return total


def column_norms(X: Tensor) -> Tensor:
    """The norms of the columns of ``X`` (n, k), in ``X``'s dtype."""
    return column_dots(X, X).sqrt().to(X.dtype)


def gram(X: Tensor, Y: Tensor) -> Tensor:
    r"""$X^\top Y$ of an ``(n, k)`` and an ``(n, l)`` block as a float64 ``(k, l)`` tensor.

    Long blocks: up to ``GROUP`` products of `GRAM_BLOCK` rows per batched matrix product
    (at most ``GROUP * BLOCK`` numbers of each block at a time), the ``(k, l)`` results
    added in float64.
    """
    if not is_long(X, X.shape[0], any_device=True):
        return (X.T @ Y).to(torch.float64)
    n, k, l = X.shape[0], X.shape[1], Y.shape[1]
    total = torch.zeros(k, l, dtype=torch.float64, device=X.device)
    group = min(GROUP, max(1, BLOCK * GROUP // (GRAM_BLOCK * max(k, l, 1))))  # <= 4 Mi numbers
    for c, e in _chunks(n, GRAM_BLOCK, group):
        q = (e - c) // GRAM_BLOCK
        if q:
            f = c + q * GRAM_BLOCK
            Xb = X[c:f].reshape(q, GRAM_BLOCK, k)
            Yb = Y[c:f].reshape(q, GRAM_BLOCK, l)
            total = total + torch.bmm(Xb.transpose(1, 2), Yb).sum(0, dtype=torch.float64)
            c = f
        if c < e:
            total = total + X[c:e].T @ Y[c:e]
    return total


def orthonormalize(Q: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(Q', U)`` with $Q = Q' U$ and $Q'$ orthonormal to float32 precision on long ``Q``.

    For a long float32 ``Q`` (n, k) (any device), nearly orthonormal (the ``Q`` of
    ``torch.linalg.qr``, whose columns are $1.7\cdot 10^{-3}$ too long at
    $n = 3\cdot 10^7$), one Cholesky-QR step with an accurate `gram`:
    $Q^\top Q = U^\top U$, $Q' = Q U^{-1}$. Otherwise, or where the Cholesky factorization
    fails (a rank-deficient ``Q``), ``Q`` itself and the identity.
    """
    eye = torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device)
    if not is_long(Q, Q.shape[0], any_device=True) or Q.shape[1] == 0:
        return Q, eye
    U, info = torch.linalg.cholesky_ex(gram(Q, Q), upper=True)
    if int(info) != 0:
        return Q, eye
    U = U.to(Q.dtype)
    return torch.linalg.solve_triangular(U, Q, upper=True, left=False), U
