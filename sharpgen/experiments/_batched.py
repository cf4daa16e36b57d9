r"""Hand-batched closed-form gradients and Hessian traces of the paper's two-layer nets.

Many independent runs are stacked along a leading "run" dimension ``R``: parameters are a dict
``{"W1": (R, m, d), "b1": (R, m), "gamma": (R, m), "W2": (R, m)}`` and every run has its own
training set ``X: (R, n, d)``, ``Y: (R, n)``. One call computes, for every run at once, the
gradient of the mean loss over a batch of that run's examples, with a handful of ``einsum``
calls and no Python work per run.

The architectures (Wen, Li & Ma 2023, Sections 3-5) are

* ``"no_bias"``: $f(x) = \sum_j W2_j\,\mathrm{relu}(W1_j \cdot x)$, parameters ``W1, W2``;
* ``"bias"``: $f(x) = \sum_j W2_j\,\mathrm{relu}(W1_j \cdot x + b1_j)$, parameters
  ``W1, b1, W2``;
* ``"simplified_bn"``: $f(x_k) = \sum_j W2_j \gamma_j h_{kj} / s_j$ with
  $h = \mathrm{relu}(W1 x + b1)$ and $s_j = \sqrt{\tfrac1n \sum_{i=1}^n h_{ij}^2}$ over the
  whole training set, parameters ``W1, b1, gamma, W2`` (a neuron with $s_j = 0$ contributes 0,
  without NaN);
* ``"simplified_ln"``: $f(x) = W2 \cdot h / \max(\lVert h\rVert, \varepsilon)$, parameters
  ``W1, b1, W2``.

Parameters an architecture does not use (``b1`` for ``no_bias``, ``gamma`` outside
``simplified_bn``) are carried but never updated, and gradients/norms are taken over the
trainable ones only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ARCHITECTURES",
    "LOSSES",
    "trainable_names",
    "forward",
    "loss_and_grad",
    "loss_derivatives",
    "loss_slope",
    "head",
    "trace_terms",
]

ARCHITECTURES = ("no_bias", "bias", "simplified_bn", "simplified_ln")
LOSSES = ("mse", "logistic")

Params = dict[str, Tensor]


def trainable_names(arch: str) -> tuple[str, ...]:
    """The parameters the architecture trains (and over which gradients and traces are taken)."""
    if arch == "no_bias":
        return ("W1", "W2")
    if arch == "simplified_bn":
        return ("W1", "b1", "gamma", "W2")
    if arch in ("bias", "simplified_ln"):
        return ("W1", "b1", "W2")
    raise ValueError(f"arch={arch!r} is not one of {ARCHITECTURES}")


def loss_derivatives(
    f: Tensor, y: Tensor, loss: str, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Loss value, first and second derivative with respect to the output $f$, elementwise.

    ``"mse"`` is $(f - y)^2$ (no 1/2, as in the paper). ``"logistic"`` with label smoothing $p$
    is $(1 - p/2)\log(1 + e^{-yf}) + (p/2)\log(1 + e^{yf})$ for $y \in \{-1, 1\}$.
    """
    if loss == "mse":
        r = f - y
        return r * r, 2.0 * r, torch.full_like(f, 2.0)
    q = 1.0 - label_smoothing / 2.0
    yf = y * f
    value = q * torch.nn.functional.softplus(-yf) + (1.0 - q) * torch.nn.functional.softplus(yf)
    s_pos = torch.sigmoid(yf)
    s_neg = torch.sigmoid(-yf)
    d1 = y * (-q * s_neg + (1.0 - q) * s_pos)
    return value, d1, s_pos * s_neg


def _bn_stats(p: Params, X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pre-activations, activations, statistic s and the guarded s over a training set."""
    Z = torch.einsum("rmd,rnd->rnm", p["W1"], X) + p["b1"][:, None, :]
    H = torch.relu(Z)
    s = H.square().mean(dim=1).sqrt()
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    return Z, H, s, s_safe


def _ln_parts(h: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Norm r of h, the clamped denominator $\max(r, \varepsilon)$ and $[r > \varepsilon]$ (float).

    The mask is ``sign(r - eps)`` clamped at 0 (exact: with gradual underflow ``r - eps > 0``
    iff ``r > eps``); comparisons and ``where`` on bool tensors are several times slower than
    these float operations on a CPU, and the per-step kernels call this 200 times an epoch.
    """
    r = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return r, r.clamp_min(eps), (r - eps).sign_().clamp_min_(0.0)


def head(h: Tensor, W2: Tensor, arch: str, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Output $f$, its derivative in the activations $h$ and the features $W_2$ multiplies.

    Over the last dimension of ``h`` (``W2`` broadcasts against it): $f = W_2 \cdot h$ with
    features $h$, or for ``simplified_ln`` $f = W_2 \cdot u$, $u = h/\max(\lVert h\rVert,
    \varepsilon)$, $\partial f/\partial h = (W_2 - [\lVert h\rVert > \varepsilon]
    (W_2\cdot u)\,u)/\max(\lVert h\rVert, \varepsilon)$ with features $u$. Shared by the
    batched gradients here and the fused per-step kernels (`sharpgen.experiments._fused`).
    """
    if arch != "simplified_ln":
        return (W2 * h).sum(-1), W2, h
    _, denom, active = _ln_parts(h, eps)
    u = h / denom
    wu = (W2 * u).sum(-1, keepdim=True)
    dh = torch.addcmul(W2, u, active * wu, value=-1.0).div_(denom)
    return wu.squeeze(-1), dh, u


def loss_slope(f: Tensor, y: Tensor, loss: str, label_smoothing: float = 0.0) -> Tensor:
    r"""The loss derivative $\ell'(f)$ alone (`loss_derivatives`' second output)."""
    if loss == "mse":
        return 2.0 * (f - y)
    return loss_derivatives(f, y, loss, label_smoothing)[1]


def forward(p: Params, arch: str, X: Tensor, *, train_X: Tensor | None = None, eps: float = 1e-3):
    """Outputs ``(R, B)`` of every run on its own inputs ``X: (R, B, d)``.

    ``simplified_bn`` needs ``train_X: (R, n, d)``, the set its statistics are computed on.
    """
    if arch == "simplified_bn":
        if train_X is None:
            raise ValueError("arch='simplified_bn' needs train_X, the training inputs of every run")
        _, _, _, s_safe = _bn_stats(p, train_X)
        h = torch.relu(torch.einsum("rmd,rbd->rbm", p["W1"], X) + p["b1"][:, None, :])
        return torch.einsum("rm,rbm->rb", p["gamma"] * p["W2"] / s_safe, h)
    h = torch.relu(_pre_activations(p, arch, X))
    return head(h, p["W2"][:, None, :], arch, eps)[0]


def _pre_activations(p: Params, arch: str, X: Tensor) -> Tensor:
    """``W1 x (+ b1)`` of every run on its own inputs ``X: (R, B, d)``, shape ``(R, B, m)``."""
    z = torch.einsum("rmd,rbd->rbm", p["W1"], X)
    return z if arch == "no_bias" else z + p["b1"][:, None, :]


def loss_and_grad(
    p: Params,
    arch: str,
    X: Tensor,
    Y: Tensor,
    idx: Tensor,
    *,
    loss: str = "mse",
    label_smoothing: float = 0.0,
    eps: float = 1e-3,
) -> tuple[Tensor, Params]:
    """Mean loss over the batch ``idx: (R, B)`` of every run, and its gradient (trainable only).

    Returns ``(loss: (R,), grads)`` where ``grads`` has the trainable names of ``arch``.
    For ``simplified_bn`` the statistics over all ``n`` training points are differentiated through.
    """
    R, B = idx.shape
    rows = torch.arange(R, device=idx.device)[:, None]
    if arch == "simplified_bn":
        n = X.shape[1]
        Z, H, s, s_safe = _bn_stats(p, X)
        N = H / s_safe[:, None, :]
        c = p["gamma"] * p["W2"]
        Xb_out = torch.einsum("rm,rbm->rb", c, N[rows, idx])
        value, d1, _ = loss_derivatives(Xb_out, Y[rows, idx], loss, label_smoothing)
        v = torch.zeros(R, n, dtype=X.dtype, device=X.device)
        v.scatter_add_(1, idx, d1 / B)
        vN = torch.einsum("rn,rnm->rm", v, N)
        vH = torch.einsum("rn,rnm->rm", v, H)
        s3 = s_safe**3
        dH = (c / s_safe)[:, None, :] * v[:, :, None] - H * (c * vH / (n * s3))[:, None, :]
        gz = dH * (Z > 0)
        grads = {
            "W1": torch.einsum("rnm,rnd->rmd", gz, X),
            "b1": gz.sum(dim=1),
            "gamma": p["W2"] * vN,
            "W2": p["gamma"] * vN,
        }
        return value.mean(dim=1), grads
    Xb = X[rows, idx]
    z = _pre_activations(p, arch, Xb)
    f, dh, feat = head(torch.relu(z), p["W2"][:, None, :], arch, eps)
    value, d1, _ = loss_derivatives(f, Y[rows, idx], loss, label_smoothing)
    w = d1 / B
    gz = (w[:, :, None] * dh) * (z > 0)
    grads = {"W1": torch.einsum("rbm,rbd->rmd", gz, Xb)}
    if arch != "no_bias":
        grads["b1"] = gz.sum(dim=1)
    grads["W2"] = torch.einsum("rb,rbm->rm", w, feat)
    return value.mean(dim=1), grads


def trace_terms(
    p: Params,
    arch: str,
    X: Tensor,
    Y: Tensor,
    *,
    loss: str = "mse",
    label_smoothing: float = 0.0,
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    r"""Exact Hessian trace of the mean training loss of every run, and its Gauss-Newton part.

    $$ \operatorname{Tr} \nabla^2 L = \frac1n \sum_k \Big( \ell''(f_k)\,\lVert\nabla_\theta f_k
    \rVert^2 + \ell'(f_k)\, \operatorname{Tr} \nabla^2_\theta f_k \Big), $$
    over the trainable parameters, in closed form. For ``no_bias`` and ``bias`` the diagonal of
    $\nabla^2_\theta f$ vanishes (ReLU is piecewise linear and $f$ is bilinear in the layers), so
    the two returned numbers agree everywhere; for ``simplified_ln`` and ``simplified_bn`` they
    agree at interpolation (Lemma 4.1 of the paper for the MSE loss). Derivatives of ReLU at
    exactly 0 are taken as 0 (a measure-zero set).

    Returns:
        ``(trace, gauss_newton)``, each of shape ``(R,)``.
    """
    n = X.shape[1]
    has_bias = arch != "no_bias"
    xx = X.square().sum(-1) + (1.0 if has_bias else 0.0)  # ||x'||^2, (R, n)
    if arch == "simplified_bn":
        Z, H, s, s_safe = _bn_stats(p, X)
        mask = (Z > 0).to(X.dtype)
        N = H / s_safe[:, None, :]
        c = p["gamma"] * p["W2"]
        f = torch.einsum("rm,rnm->rn", c, N)
        _, d1, d2 = loss_derivatives(f, Y, loss, label_smoothing)
        s3 = s_safe**3
        alpha = (c / s_safe)[:, None, :] * mask  # (R, n, m)
        beta = (c / (n * s3))[:, None, :] * H
        A = torch.einsum("rnm,rnd->rmd", H, X)  # sum_l h_lj x_l
        Ab = H.sum(dim=1)  # sum_l h_lj (bias coordinate)
        xA = torch.einsum("rnd,rmd->rnm", X, A) + Ab[:, None, :]
        AA = A.square().sum(-1) + Ab.square()
        g1 = alpha.square() * xx[:, :, None] - 2 * alpha * beta * xA + beta.square() * AA[:, None]
        gsq = g1.sum(-1) + ((p["W2"].square() + p["gamma"].square())[:, None, :] * N.square()).sum(
            -1
        )
        G = torch.einsum("rnd,rld->rnl", X, X) + 1.0
        GH = torch.einsum("rnl,rlm->rnm", G, H)
        t = torch.einsum("rn,rnm->rm", torch.diagonal(G, dim1=1, dim2=2), mask)
        q = (H * GH).sum(dim=1)
        s5 = s_safe**5
        hess_f = (
            c[:, None, :]
            * (
                -(2 * mask * GH + H * t[:, None, :]) / (n * s3[:, None, :])
                + 3 * H * q[:, None, :] / (n * n * s5[:, None, :])
            )
        ).sum(-1)
    else:
        z = _pre_activations(p, arch, X)
        mask = (z > 0).to(X.dtype)
        h = torch.relu(z)
        W2 = p["W2"][:, None, :]
        f, dh, feat = head(h, W2, arch, eps)
        if arch == "simplified_ln":
            # diagonal of the Hessian of w.h/||h|| in h (zero where the clamp is active)
            _, rr, active = _ln_parts(h, eps)
            wh = (W2 * h).sum(-1, keepdim=True)
            diag = -2 * W2 * h / rr**3 - wh / rr**3 + 3 * wh * h.square() / rr**5
            hess_f = (active * diag * mask).sum(-1) * xx
        else:
            dh = dh.expand_as(h)
            hess_f = torch.zeros_like(f)
        _, d1, d2 = loss_derivatives(f, Y, loss, label_smoothing)
        gsq = (dh.square() * mask).sum(-1) * xx + feat.square().sum(-1)
    gn = (d2 * gsq).mean(dim=1)
    return gn + (d1 * hess_f).mean(dim=1), gn
