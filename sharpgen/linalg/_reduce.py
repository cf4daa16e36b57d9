r"""Dot products and norms of long vectors, accurate where torch's float32 reductions are not.

On a CPU, ``torch.dot`` and ``torch.linalg.vector_norm`` of float32 vectors accumulate
with a relative error that grows with the length: for the norm of a Gaussian vector
(torch 2.13, one thread or two) $2.9\cdot 10^{-5}$ at $n = 2\cdot 10^6$,
$1.7\cdot 10^{-3}$ at $3\cdot 10^7$ and $1.3\cdot 10^{-2}$ at $1.24\cdot 10^8$ (GPT-2
small), the computed value too small. A Lanczos row divided by such a norm is 1% too
long, and a Rayleigh quotient of terms of one sign is off as much: more than
``tol=1e-3`` allows. (``torch.sum`` is accurate, by cascade summation, but needs the
product as a temporary vector.)

Here, on a CPU, the vectors are cut into blocks of `BLOCK` numbers; each block's product
is summed by ``torch.sum`` (cascade summation, a temporary of one block) and the block
sums are added in float64: a relative error about $\epsilon$ of float32 at every length
measured ($2\cdot 10^{-8}$ at $3\cdot 10^7$, where ``torch.dot`` was off by
$7\cdot 10^{-3}$ on a vector of a few large entries), at about twice the time of
``torch.dot`` (0.034 s for $3\cdot 10^7$ numbers on one core). float64 vectors, short
ones and CUDA (tree reductions) use ``torch.dot``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BLOCK", "column_norms", "dot", "norm"]

#: Numbers per block summed by one ``torch.sum``.
BLOCK = 1 << 16


def dot(x: Tensor, y: Tensor) -> Tensor:
    """``x . y`` of two vectors as a 0-d float64 tensor on their device (see the module)."""
    if x.dtype == torch.float64 or x.numel() <= BLOCK or x.device.type != "cpu":
        return torch.dot(x, y).to(torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for c in range(0, x.numel(), BLOCK):
        total += torch.mul(x[c : c + BLOCK], y[c : c + BLOCK]).sum()
    return total


def norm(x: Tensor) -> Tensor:
    """``||x||`` as a 0-d float64 tensor (see the module)."""
    return dot(x, x).sqrt()


def column_norms(X: Tensor) -> Tensor:
    """The norms of the columns of ``X`` (n, k), in ``X``'s dtype."""
    out = [norm(X[:, i]) for i in range(X.shape[1])]
    if not out:
        return torch.zeros(0, dtype=X.dtype, device=X.device)
    return torch.stack(out).to(X.dtype)
