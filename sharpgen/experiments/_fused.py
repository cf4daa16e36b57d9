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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sharpgen.experiments._batched import head, loss_slope

__all__ = [
    "Head",
    "sam1_rank_one_epoch",
    "sam1_bn_epoch",
    "project",
    "ascent_scale",
    "compiled_example_grad",
]

BLOCK = 25


@dataclass(frozen=True)
class Head:
    """The architecture and loss of a run: what a per-step kernel needs besides the tensors.

    Attributes:
        arch: ``"no_bias"``, ``"bias"``, ``"simplified_ln"`` (or ``"simplified_bn"``).
        loss: ``"mse"`` or ``"logistic"``.
        label_smoothing: Of the logistic loss.
        eps: Of simplified LayerNorm.
    """

    arch: str = "no_bias"
    loss: str = "mse"
    label_smoothing: float = 0.0
    eps: float = 1e-3

    def slope(self, f: Tensor, y: Tensor) -> Tensor:
        """The loss derivative at the outputs ``f``, as a column ``(R, 1)``."""
        return loss_slope(f, y, self.loss, self.label_smoothing).unsqueeze(1)


def ascent_scale(sq_norm: Tensor, rho: float) -> Tensor:
    r"""$s = \rho/\lVert g\rVert$ per run from $\lVert g\rVert^2$, and 0 where $g = 0$.

    ``rho / 0 = inf`` is mapped to 0; a NaN stays NaN (divergence is caught by the trainer).
    Float operations only: a ``where`` on a bool mask costs as much as the step's products.
    """
    return torch.nan_to_num_(sq_norm.sqrt().reciprocal_().mul_(rho), nan=math.nan, posinf=0.0)


def _example_grad(z: Tensor, W2: Tensor, y: Tensor, hd: Head) -> tuple[Tensor, Tensor]:
    """Gradient of one example's loss w.r.t. the pre-activations ``z`` and ``W2`` (rows = runs)."""
    h = torch.relu(z)
    f, dh, feat = head(h, W2, hd.arch, hd.eps)
    d1 = hd.slope(f, y)
    return (d1 * dh).mul_(torch.sign(h)), d1 * feat


def _sam1_example_grad(
    z: Tensor, W2: Tensor, y: Tensor, xx: Tensor, rho: float, hd: Head
) -> tuple[Tensor, Tensor]:
    r"""Gradient w.r.t. ``(z, W2)`` at the 1-SAM ascent point of one example per run.

    The first-layer gradient is $g_z x'^\top$, so $\lVert g\rVert^2 = \lVert g_z\rVert^2
    \lVert x'\rVert^2 + \lVert g_{W_2}\rVert^2$ and the ascent point's pre-activations are
    $z + s\,\lVert x'\rVert^2 g_z$: nothing of size $m \times d$ is touched.
    """
    gz, gW2 = _example_grad(z, W2, y, hd)
    if rho > 0:
        sq = torch.addcmul(torch.linalg.vecdot(gW2, gW2), torch.linalg.vecdot(gz, gz), xx)
        s = ascent_scale(sq, rho).unsqueeze(1)
        gz, gW2 = _example_grad(
            torch.addcmul(z, s * xx.unsqueeze(1), gz), torch.addcmul(W2, s, gW2), y, hd
        )
    return gz, gW2


_COMPILED: dict[str, Any] = {}


def compiled_example_grad() -> Callable[..., tuple[Tensor, Tensor]]:
    """`torch.compile` of the rank-one per-step gradient, built once per process (lazily).

    Measured on a 2-core CPU (docs/guide/reproduce.md, "torch.compile"): the ~30 elementwise
    operations of a step fuse into a few loops; compiling takes 20-50 s per architecture and
    recompiles for each new ``rho`` or shape. The Sim-BN step is not compiled: it is bound by
    its four matrix products, and its compiled form was slower.
    """
    if "rank_one" not in _COMPILED:
        _COMPILED["rank_one"] = torch.compile(_sam1_example_grad, dynamic=False)
    return _COMPILED["rank_one"]


def sam1_rank_one_epoch(
    P: dict[str, Tensor],
    X: Tensor,
    Y: Tensor,
    idx: Tensor,
    *,
    hd: Head,
    lr: float,
    rho: float,
    block: int = BLOCK,
    radius: float | None = None,
    compile: bool = False,
) -> None:
    """One epoch of 1-SAM for every run, in place (no bias, bias, simplified LayerNorm).

    Args:
        P: Stacked parameters ``W1 (R, m, d)``, ``b1 (R, m)``, ``W2 (R, m)``.
        X: Training inputs ``(R, n, d)``.
        Y: Training targets ``(R, n)``.
        idx: Example of every step, ``(R, S)``.
        hd: Architecture and loss.
        lr: Learning rate.
        rho: SAM radius (0: plain SGD steps).
        block: Steps whose first-layer updates are applied together.
        radius: Projected 1-SAM (Fig. 6b): after every step, `project` the first layer onto
            the ball of this radius (the block is then 1 step).
        compile: Use `compiled_example_grad` for the per-step gradient.
    """
    example_grad = compiled_example_grad() if compile else _sam1_example_grad
    R = X.shape[0]
    rows = torch.arange(R, device=X.device)[:, None]
    Xe, Ye = X[rows, idx], Y[rows, idx]  # (R, S, d), (R, S)
    has_bias = hd.arch != "no_bias"
    xx = Xe.square().sum(-1) + (1.0 if has_bias else 0.0)  # ||x'||^2
    W1, b1, W2 = P["W1"], P["b1"], P["W2"]
    S = idx.shape[1]
    block = 1 if radius is not None else block
    GZ = torch.empty(R, min(block, S), W1.shape[1], dtype=W1.dtype, device=W1.device)
    for start in range(0, S, block):
        Xb = Xe[:, start : start + block]
        K = Xb.shape[1]
        Zs = torch.bmm(Xb, W1.transpose(1, 2))  # W1^(0) x_t, (R, K, m)
        Gb = torch.bmm(Xb, Xb.transpose(1, 2)).mul_(-lr)  # -lr x_s . x_t, (R, K, K)
        for j in range(K):
            z = Zs[:, j] + b1 if has_bias else Zs[:, j]
            gz, gW2 = example_grad(z, W2, Ye[:, start + j], xx[:, start + j], rho, hd)
            if j + 1 < K:  # the block's later pre-activations see this step's W1 update
                Zs[:, j + 1 :].addcmul_(Gb[:, j + 1 :, j : j + 1], gz.unsqueeze(1))
            GZ[:, j] = gz
            if has_bias:
                b1.sub_(gz, alpha=lr)
            W2.sub_(gW2, alpha=lr)
        W1.baddbmm_(GZ[:, :K].transpose(1, 2), Xb, alpha=-lr)
        if radius is not None:
            project(P, radius)


def project(P: dict[str, Tensor], radius: float) -> None:
    """Scale every run's first layer ``(W1, b1)`` onto the Frobenius ball of ``radius``."""
    norm = (P["W1"].flatten(1).square().sum(1) + P["b1"].square().sum(1)).sqrt()
    factor = torch.clamp(radius / norm.clamp_min(1e-300), max=1.0)
    P["W1"].mul_(factor.view(-1, 1, 1))
    P["b1"].mul_(factor.view(-1, 1))


def _padded(d: int) -> int:
    """Columns of ``X' = (x, 1, 0, ...)``: ``d + 1`` rounded up to a multiple of 8.

    Matrix products with an inner or outer size of 31 run at less than half the speed of 32 on
    an AVX2 CPU (MKL); the zero columns keep the padded weights at exactly zero.
    """
    return -(-(d + 1) // 8) * 8


def pack_bn(P: dict[str, Tensor], D: int) -> Tensor:
    """Sim-BN parameters as one ``(R, D + 2, m)`` tensor: rows ``W1^T``, ``b1``, zeros, gamma, W2.

    One tensor makes the ascent point, the gradient norm and the update one operation each.
    """
    W1 = P["W1"]
    R, m, d = W1.shape
    T = torch.zeros(R, D + 2, m, dtype=W1.dtype, device=W1.device)
    T[:, :d] = W1.transpose(1, 2)
    T[:, d] = P["b1"]
    T[:, D] = P["gamma"]
    T[:, D + 1] = P["W2"]
    return T


def unpack_bn(T: Tensor, P: dict[str, Tensor]) -> None:
    """Copy `pack_bn`'s tensor back into ``P`` (in place)."""
    d, D = P["W1"].shape[2], T.shape[1] - 2
    P["W1"].copy_(T[:, :d].transpose(1, 2))
    P["b1"].copy_(T[:, d])
    P["gamma"].copy_(T[:, D])
    P["W2"].copy_(T[:, D + 1])


class _BNStep:
    """Buffers and inputs of the fused Sim-BN step, allocated once per epoch."""

    def __init__(self, X: Tensor, m: int, hd: Head) -> None:
        R, n, d = X.shape
        D = _padded(d)
        self.n, self.D, self.hd = n, D, hd
        self.X1 = torch.zeros(R, n, D, dtype=X.dtype, device=X.device)
        self.X1[..., :d] = X
        self.X1[..., d] = 1.0
        self.X1t = self.X1.transpose(1, 2).contiguous()  # (R, D, n)
        self.run = torch.arange(R, device=X.device)
        self.H = torch.empty(R, m, n, dtype=X.dtype, device=X.device)
        self.G = torch.empty(R, D + 2, m, dtype=X.dtype, device=X.device)
        self.A = torch.empty(R, D + 2, m, dtype=X.dtype, device=X.device)

    def grad(self, T: Tensor, k: Tensor, xk: Tensor, y: Tensor) -> Tensor:
        """Gradient of example ``k``'s loss per run w.r.t. `pack_bn`'s tensor (into ``G``).

        ``xk = X'[k]`` and ``y = Y[k]`` of every run.
        """
        n, D, G = self.n, self.D, self.G
        # (R, m, n): the norms over n are then over contiguous rows (10x faster than columns)
        H = torch.bmm(T[:, :D].transpose(1, 2), self.X1t, out=self.H).relu_()
        # 1/s, and 0 for a dead neuron (s = 0, h = 0): its gradient is 0 either way
        inv = torch.linalg.vector_norm(H, dim=2).reciprocal_().mul_(math.sqrt(n))
        inv = torch.nan_to_num_(inv, nan=math.nan, posinf=0.0)
        hk, gamma, W2 = H[self.run, :, k], T[:, D], T[:, D + 1]
        nk = hk * inv
        c = gamma * W2
        d1 = self.hd.slope(torch.linalg.vecdot(c, nk), y)
        cs = (c * inv).mul_(d1)  # l' c / s
        a = torch.sign(hk).mul_(cs)
        beta = (cs * nk).mul_(inv).mul_(-1.0 / n)  # -l' c h_k / (n s^3)
        gW = torch.bmm(self.X1t, H.transpose(1, 2), out=G[:, :D]).mul_(beta.unsqueeze(1))
        gW.addcmul_(xk.unsqueeze(2), a.unsqueeze(1))
        d1nk = nk.mul_(d1)
        torch.mul(d1nk, W2, out=G[:, D])
        torch.mul(d1nk, gamma, out=G[:, D + 1])
        return G


def sam1_bn_epoch(
    P: dict[str, Tensor], X: Tensor, Y: Tensor, idx: Tensor, *, hd: Head, lr: float, rho: float
) -> None:
    """One epoch of 1-SAM for every run of the simplified-BatchNorm net, in place.

    Args:
        P: Stacked parameters ``W1 (R, m, d)``, ``b1``, ``gamma``, ``W2 (R, m)``.
        X: Training inputs ``(R, n, d)``; the statistics run over all of them.
        Y: Training targets ``(R, n)``.
        idx: Example of every step, ``(R, S)``.
        hd: The loss (``hd.arch`` is not read).
        lr: Learning rate.
        rho: SAM radius (0: plain SGD steps).
    """
    step = _BNStep(X, P["W1"].shape[1], hd)
    T = pack_bn(P, step.D)
    rows = step.run[:, None]
    Xk, Yk = step.X1[rows, idx], Y[rows, idx]  # (R, S, D), (R, S)
    for t in range(idx.shape[1]):
        k, xk, y = idx[:, t], Xk[:, t], Yk[:, t]
        g = step.grad(T, k, xk, y)
        if rho > 0:
            s = ascent_scale(torch.linalg.vecdot(g.flatten(1), g.flatten(1)), rho)
            g = step.grad(torch.addcmul(T, s.view(-1, 1, 1), g, out=step.A), k, xk, y)
        T.sub_(g, alpha=lr)
    unpack_bn(T, P)
