"""Orthonormal range sketches shared by Hutch++ and XTrace."""

from __future__ import annotations

import torch
from torch import Tensor

from sharpgen.linalg._reduce import orthonormalize


def extend_basis(Q: Tensor, Y: Tensor, scale: float) -> Tensor:
    """Orthonormal columns spanning ``range(Y)`` minus ``range(Q)``, numerically rank-revealed.

    ``Y`` is orthogonalized against ``Q`` twice; directions whose remaining size is below
    ``1000 * eps * scale`` (``scale``: the largest column norm seen) are dropped, so a
    rank-deficient sketch gives a smaller basis instead of noise.
    """
    if Q.shape[1]:
        Y = Y - Q @ (Q.T @ Y)
        Y = Y - Q @ (Q.T @ Y)
    if Y.shape[1] == 0:
        return Y
    P, R = torch.linalg.qr(Y)
    U, s, _ = torch.linalg.svd(R)
    keep = s > 1000 * torch.finfo(Y.dtype).eps * scale
    out = P @ U[:, keep]
    if Q.shape[1]:  # one more pass: P is orthogonal to Q only to first order
        out = out - Q @ (Q.T @ out)
        out, _ = torch.linalg.qr(out)
    return orthonormalize(out)[0]  # float32 QR's columns are 1.7e-3 too long at n = 3e7
