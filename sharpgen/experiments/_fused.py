r"""Fused batch-1 1-SAM epochs of the two-layer nets: the trainer's fast paths.

Both functions advance ``R`` independent runs (stacked along dimension 0) through one epoch of
1-SAM, $\theta \leftarrow \theta - \eta\,\nabla\ell_k\big(\theta + \rho\,\nabla\ell_k(\theta)
/\lVert\nabla\ell_k(\theta)\rVert\big)$ with one example $k$ per step, using the same
perturbation formula as the reference step (`sharpgen.experiments._trainer`): the ascent
vector is $s\,g$ with $s = \rho/\lVert g\rVert$ over all trainable parameters, and $s = 0$
when $g = 0$. They are checked against a plain autograd loop (``tests/experiments``).

**Rank-one nets** (no bias, bias, simplified LayerNorm). A single example's first-layer
gradient is rank one, $g_z x^\top$. Instead of touching the $m \times d$ weights every step,
the updates of a block of $K$ steps are kept as the columns $g_{z,s}$ and applied at the end of
the block with one batched product; in between, a pre-activation is
$$ z_t = W_1^{(0)} x_t + b_1 - \eta \sum_{s < t} g_{z,s}\,(x_s \cdot x_t), $$
with $W_1^{(0)} x_t$ for the whole block from one product at its start and the inner products
from the block's Gram matrix. So $W_1$ is read twice and written once per block instead of
three times per step, and every per-step operation works on ``(R, m)`` vectors.

**Simplified BatchNorm.** The statistics $s_j = \sqrt{\frac1n\sum_i h_{ij}^2}$ run over the
whole training set, so a step needs the activations $H$ of all $n$ points at $\theta$ and at
the ascent point, and their products with the inputs. With $x' = (x, 1)$, $c = \gamma\odot
W_2$ and $\ell'$ the loss derivative at the example $k$,
$$ \nabla_{(W_1,b_1)}\ell_k = a\,x_k'^\top - \operatorname{diag}(\beta)\,H^\top X', \quad
a_j = \ell' c_j [h_{kj} > 0]/s_j, \quad \beta_j = \ell' c_j h_{kj}/(n s_j^3), $$
$\nabla_\gamma \ell_k = \ell' W_2 \odot h_k/s$ and $\nabla_{W_2}\ell_k = \ell'\gamma\odot h_k/s$.
Per run and step that is four products of $n\times(d+1)\times m$ (``H = relu(W X'^T)`` and
$H X'$, at $\theta$ and at the ascent point), about $8 n m (d + 1)$ FLOPs, and two passes
over the ``(m, n)`` activations (ReLU in place, the norms over $n$). No update of the
statistics is cheaper: the next step's $H$ needs $X' W'^\top$ for the new $W'$, which costs as
much as recomputing it (the Gram-matrix route $X' X'^\top H$ costs $n^2 m > n m (d + 1)$).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sharpgen.experiments._batched import _relu_example_grad, loss_derivatives, sam1_relu_step

__all__ = ["sam1_rank_one_epoch", "sam1_projected_epoch", "sam1_bn_epoch", "project"]

BLOCK = 25


def sam1_rank_one_epoch(
    P: dict[str, Tensor],
    X: Tensor,
    Y: Tensor,
    idx: Tensor,
    *,
    arch: str,
    lr: float,
    rho: float,
    loss: str = "mse",
    label_smoothing: float = 0.0,
    eps: float = 1e-3,
    block: int = BLOCK,
) -> None:
    """One epoch of 1-SAM for every run, in place (no bias, bias, simplified LayerNorm).

    Args:
        P: Stacked parameters ``W1 (R, m, d)``, ``b1 (R, m)``, ``W2 (R, m)``.
        X: Training inputs ``(R, n, d)``.
        Y: Training targets ``(R, n)``.
        idx: Example of every step, ``(R, S)``.
        arch: ``"no_bias"``, ``"bias"`` or ``"simplified_ln"``.
        lr: Learning rate.
        rho: SAM radius (0: plain SGD steps).
        loss: ``"mse"`` or ``"logistic"``.
        label_smoothing: Of the logistic loss.
        eps: Of simplified LayerNorm.
        block: Steps whose first-layer updates are applied together.
    """
    R = X.shape[0]
    rows = torch.arange(R, device=X.device)[:, None]
    Xe, Ye = X[rows, idx], Y[rows, idx]  # (R, S, d), (R, S)
    has_bias = arch != "no_bias"
    xx = Xe.square().sum(-1) + (1.0 if has_bias else 0.0)  # ||x'||^2
    W1, b1, W2 = P["W1"], P["b1"], P["W2"]
    kw: dict[str, Any] = {
        "arch": arch,
        "loss": loss,
        "label_smoothing": label_smoothing,
        "eps": eps,
    }
    S = idx.shape[1]
    GZ = torch.empty(R, min(block, S), W1.shape[1], dtype=W1.dtype, device=W1.device)
    for start in range(0, S, block):
        Xb = Xe[:, start : start + block]
        K = Xb.shape[1]
        Zs = torch.bmm(Xb, W1.transpose(1, 2))  # W1^(0) x_t, (R, K, m)
        Gb = torch.bmm(Xb, Xb.transpose(1, 2))  # x_s . x_t, (R, K, K)
        for j in range(K):
            z = Zs[:, j]
            if j:
                z = torch.baddbmm(
                    z.unsqueeze(1), Gb[:, j : j + 1, :j], GZ[:, :j], alpha=-lr
                ).squeeze(1)
            if has_bias:
                z = z + b1
            gz, gW2 = _sam1_example_grad(z, W2, Ye[:, start + j], xx[:, start + j], rho, kw)
            GZ[:, j] = gz
            if has_bias:
                b1.sub_(gz, alpha=lr)
            W2.sub_(gW2, alpha=lr)
        W1.baddbmm_(GZ[:, :K].transpose(1, 2), Xb, alpha=-lr)


def project(P: dict[str, Tensor], radius: float) -> None:
    """Scale every run's first layer ``(W1, b1)`` onto the Frobenius ball of ``radius``."""
    norm = (P["W1"].flatten(1).square().sum(1) + P["b1"].square().sum(1)).sqrt()
    factor = torch.clamp(radius / norm.clamp_min(1e-300), max=1.0)
    P["W1"].mul_(factor.view(-1, 1, 1))
    P["b1"].mul_(factor.view(-1, 1))


def sam1_projected_epoch(
    P: dict[str, Tensor],
    X: Tensor,
    Y: Tensor,
    idx: Tensor,
    *,
    arch: str,
    lr: float,
    rho: float,
    radius: float,
    loss: str = "mse",
    label_smoothing: float = 0.0,
    eps: float = 1e-3,
) -> None:
    """One epoch of projected 1-SAM (Fig. 6b): every step, then the first-layer projection."""
    rows = torch.arange(X.shape[0], device=X.device)[:, None]
    Xe, Ye = X[rows, idx], Y[rows, idx]
    xx = Xe.square().sum(-1) + (0.0 if arch == "no_bias" else 1.0)
    kw: dict[str, Any] = {
        "arch": arch,
        "loss": loss,
        "label_smoothing": label_smoothing,
        "eps": eps,
    }
    for t in range(idx.shape[1]):
        sam1_relu_step(
            P["W1"], P["b1"], P["W2"], Xe[:, t], Ye[:, t], xx[:, t], lr=lr, rho=rho, **kw
        )
        project(P, radius)


def _sam1_example_grad(z, W2, y, xx, rho: float, kw) -> tuple[Tensor, Tensor]:
    """Gradient w.r.t. ``(z, W2)`` at the 1-SAM ascent point of one example per run."""
    args = (kw["arch"], kw["loss"], kw["label_smoothing"], kw["eps"])
    gz, gW2 = _relu_example_grad(z, W2, y, *args)
    if rho > 0:
        norm = (gz.square().sum(1) * xx + gW2.square().sum(1)).sqrt()
        s = torch.where(norm > 0, rho / norm, 0.0).unsqueeze(1)
        gz, gW2 = _relu_example_grad(
            torch.addcmul(z, s * xx.unsqueeze(1), gz), torch.addcmul(W2, s, gW2), y, *args
        )
    return gz, gW2


def sam1_bn_epoch(
    P: dict[str, Tensor],
    X: Tensor,
    Y: Tensor,
    idx: Tensor,
    *,
    lr: float,
    rho: float,
    loss: str = "mse",
    label_smoothing: float = 0.0,
) -> None:
    """One epoch of 1-SAM for every run of the simplified-BatchNorm net, in place.

    Args:
        P: Stacked parameters ``W1 (R, m, d)``, ``b1``, ``gamma``, ``W2 (R, m)``.
        X: Training inputs ``(R, n, d)``; the statistics run over all of them.
        Y: Training targets ``(R, n)``.
        idx: Example of every step, ``(R, S)``.
        lr: Learning rate.
        rho: SAM radius (0: plain SGD steps).
        loss: ``"mse"`` or ``"logistic"``.
        label_smoothing: Of the logistic loss.
    """
    R, n, d = X.shape
    X1 = torch.cat([X, torch.ones(R, n, 1, dtype=X.dtype, device=X.device)], dim=-1)
    Wb = torch.cat([P["W1"], P["b1"].unsqueeze(-1)], dim=-1)  # (R, m, d + 1)
    gamma, W2 = P["gamma"], P["W2"]
    m = Wb.shape[1]
    bufs = {
        "H": torch.empty(R, m, n, dtype=X.dtype, device=X.device),
        "A": torch.empty(R, m, d + 1, dtype=X.dtype, device=X.device),
    }
    run = torch.arange(R, device=X.device)
    X1t = X1.transpose(1, 2)
    for t in range(idx.shape[1]):
        k = idx[:, t]
        y, xk = Y[run, k], X1[run, k]
        g = _bn_example_grad(Wb, gamma, W2, X1, X1t, k, y, xk, loss, label_smoothing, bufs)
        if rho > 0:
            gW, gg, g2 = g
            norm = (gW.square().sum((1, 2)) + gg.square().sum(1) + g2.square().sum(1)).sqrt()
            s = torch.where(norm > 0, rho / norm, 0.0)
            g = _bn_example_grad(
                torch.addcmul(Wb, s.view(-1, 1, 1), gW),
                torch.addcmul(gamma, s.unsqueeze(1), gg),
                torch.addcmul(W2, s.unsqueeze(1), g2),
                X1,
                X1t,
                k,
                y,
                xk,
                loss,
                label_smoothing,
                bufs,
            )
        Wb.sub_(g[0], alpha=lr)
        gamma.sub_(g[1], alpha=lr)
        W2.sub_(g[2], alpha=lr)
    P["W1"].copy_(Wb[..., :d])
    P["b1"].copy_(Wb[..., d])


def _bn_example_grad(Wb, gamma, W2, X1, X1t, k, y, xk, loss, label_smoothing, bufs):
    """Gradients w.r.t. ``(W1|b1, gamma, W2)`` of one example's loss per run (Sim-BN)."""
    n = X1.shape[1]
    H = torch.bmm(Wb, X1t, out=bufs["H"]).relu_()  # (R, m, n)
    s = torch.linalg.vector_norm(H, dim=-1).mul_(1.0 / math.sqrt(n))
    s_safe = torch.where(s > 0, s, 1.0)
    hk = H[torch.arange(H.shape[0], device=H.device), :, k]  # (R, m)
    c = gamma * W2
    nk = hk / s_safe
    f = (c * nk).sum(1)
    if loss == "mse":
        d1 = 2.0 * (f - y)
    else:
        _, d1, _ = loss_derivatives(f, y, loss, label_smoothing)
    d1 = d1.unsqueeze(1)
    cs = (d1 * c) / s_safe
    a = torch.where(hk > 0, cs, 0.0)
    beta = cs * nk / (n * s_safe)  # d1 c h_k / (n s^3)
    gW = torch.bmm(H, X1, out=bufs["A"]).mul_(-beta.unsqueeze(2))
    gW.baddbmm_(a.unsqueeze(2), xk.unsqueeze(1))
    return gW, d1 * W2 * nk, d1 * gamma * nk
