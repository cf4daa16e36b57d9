r"""Closed-form lower bounds on the Hessian trace of interpolating two-layer ReLU nets.

All bounds are for the MSE loss without 1/2 at an interpolating model, where
$\mathrm{Tr}\,\nabla^2 L = \frac2n \sum_i \lVert \nabla_\theta f(x_i) \rVert^2$, and for the
ReLU activation (they use positive homogeneity; they do not hold for softplus).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sharpgen.models import TwoLayerNet
from sharpgen.models._checks import check_arch, check_dataset, check_int, check_positive_float
from sharpgen.models._two_layer import _activate

__all__ = ["simplified_bn_norm_bound", "trace_lower_bound"]


def trace_lower_bound(
    X: Tensor, y: Tensor, arch: str, *, eps: float | None = None, depth: int = 2
) -> float:
    r"""The smallest Hessian trace an interpolating net of ``arch`` can have (a lower bound).

    With $r_i = \sqrt{\lVert x_i \rVert^2 + 1}$ (the norm of $x_i' = [x_i; 1]$):

    * ``"no_bias"``: $\frac4n \sum_i \lVert x_i \rVert |y_i|$ ($= 4\sqrt d$ on xor data).
    * ``"bias"``: $\frac4n \sum_i r_i |y_i|$ ($= 4\sqrt{d+1}$ on xor data); for a depth-$D$
      net with bias in the first layer only (``depth=D``):
      $\frac{2D}{n} \sum_i r_i^{2/D} |y_i|^{2-2/D}$ ($= 2D (d+1)^{1/D}$ on xor data).
    * ``"simplified_ln"``: $\frac2n \sum_i \min(1, 2 r_i |y_i| / \varepsilon)$ ($= 2$ on xor
      data whenever $\varepsilon \le 2\sqrt{d+1}$).
    * ``"simplified_bn"`` (reference set = training set): $\frac4n \sum_i |y_i|$ ($= 4$ on
      xor data).

    **Derivation.** *Bias / no bias:* $f = \sum_j W_{2,j} h_j$ with
    $h_j = \mathrm{relu}(w_j'^\top x')$, so $\lVert\nabla f(x)\rVert^2 = \sum_j h_j^2 +
    \sum_{j\,\mathrm{active}} W_{2,j}^2 \lVert x'\rVert^2 \ge 2\lVert x'\rVert \sum_j
    |W_{2,j}| h_j \ge 2 \lVert x' \rVert |f(x)|$ (AM-GM), with $x' = x$ without bias.
    Equality needs $h_j = |W_{2,j}| \lVert x' \rVert$ on every active neuron and all
    active $W_{2,j}$ of one sign: the constructions of `sharpgen.models` attain it.

    *Deep, bias in the first layer only:* with $h_0 = x'$, $z_k = W_k h_{k-1}$,
    $h_k = \mathrm{relu}(z_k)$ and $g_k = \partial f / \partial z_k$ ($g_D = 1$),
    $\lVert \nabla_{W_k} f \rVert = \lVert g_k \rVert \lVert h_{k-1} \rVert$ and, by
    positive homogeneity, $f = g_k^\top z_k = g_k^\top h_k$, so
    $\lVert g_k\rVert \lVert h_k\rVert \ge |f|$. AM-GM over the $D$ layers gives
    $\lVert\nabla f\rVert^2 \ge D \big(\prod_k \lVert g_k\rVert \lVert h_{k-1}\rVert
    \big)^{2/D} \ge D\, \lVert x'\rVert^{2/D} |f|^{2 - 2/D}$; for $D = 2$ this is the
    two-layer bound.

    *Simplified LayerNorm:* $f = W_2^\top u$, $u = h / \max(\lVert h\rVert, \varepsilon)$. If
    $\lVert h(x)\rVert \ge \varepsilon$, $u$ is a unit vector and already
    $\lVert \nabla_{W_2} f \rVert^2 = 1$. Otherwise $f = W_2^\top h / \varepsilon$ is a
    bias net scaled by $1/\varepsilon$ and the AM-GM step above gives
    $\lVert \nabla f \rVert^2 \ge \sum_j (h_j^2 + W_{2,j}^2 r^2)/\varepsilon^2
    \ge 2 r |f| / \varepsilon$. Hence $\lVert \nabla f(x_i)\rVert^2 \ge
    \min(1, 2 r_i |y_i| / \varepsilon)$ (the paper states the xor value 2 for
    $\varepsilon < \sqrt{d+1}$; this derivation gives it for $\varepsilon \le 2\sqrt{d+1}$).

    *Simplified BatchNorm:* with $u_j(x) = h_j(x)/\sigma_j$ and $\sigma_j^2 = \frac1n
    \sum_i h_j(x_i)^2$, $\nabla_{W_{2,j}} f = \gamma_j u_j$ and
    $\nabla_{\gamma_j} f = W_{2,j} u_j$; since $\frac1n \sum_i u_j(x_i)^2 = 1$ for every live
    neuron,

    $$ \mathrm{Tr}\,\nabla^2 L \ge \frac2n \sum_i \big(\lVert \nabla_{W_2} f(x_i)\rVert^2 +
       \lVert \nabla_\gamma f(x_i) \rVert^2\big) = 2\,(\lVert W_2 \rVert^2 +
       \lVert \gamma \rVert^2) \ge 4 \lVert \gamma \odot W_2 \rVert_1 $$

    (sums over live neurons; this is the paper's $c\,(\lVert W_2\rVert^2 +
    \lVert\gamma\rVert^2) \ge 2c \lVert\gamma\odot W_2\rVert_1$ with $c = 2$, see
    `simplified_bn_norm_bound`). Finally $\frac1n\sum_i |y_i| \le \sum_j |\gamma_j W_{2,j}|
    \frac1n \sum_i u_j(x_i) \le \lVert \gamma\odot W_2\rVert_1$ by Cauchy-Schwarz. The
    infimum is not attained; the best construction known here
    (`sharpgen.models.flattest_generalizer` with ``arch="simplified_bn"``) approaches 8 on
    balanced xor data, so this bound of 4 may not be tight.

    Args:
        X: Training inputs ``(n, d)``.
        y: Training labels ``(n,)`` (any reals).
        arch: ``"no_bias"``, ``"bias"``, ``"simplified_bn"`` or ``"simplified_ln"``.
        eps: The LayerNorm $\varepsilon$ (``"simplified_ln"`` only; default $10^{-3}$).
        depth: Number of layers $D \ge 2$ (``"bias"`` only; deep nets with bias in the
            first layer only).

    Returns:
        The bound as a Python float.

    Raises:
        ValueError: For an unknown ``arch``, mismatched shapes, non-finite data, or ``eps``
            given to an ``arch`` without LayerNorm.

    Examples:
        >>> import torch
        >>> from sharpgen.data import xor_cube
        >>> data = xor_cube(30, 100, generator=torch.Generator().manual_seed(0))
        >>> round(trace_lower_bound(data.X, data.y, "bias"), 2)  # 4 * sqrt(31)
        22.27

    References:
        Wen, Li, Ma (2023), Lemma 4.1, Theorems 3.2, 4.1 and 5.1.
    """
    arch = check_arch(arch)
    X, y = check_dataset(X, y)
    if eps is not None and arch != "simplified_ln":
        raise ValueError(f"eps is only used by arch='simplified_ln', not arch={arch!r}.")
    depth = check_int("depth", depth, minimum=2)
    if depth > 2 and arch != "bias":
        raise ValueError(f"depth={depth} is only available for arch='bias', not arch={arch!r}.")
    X = X.detach().to(torch.float64)
    y = y.detach().to(torch.float64).abs()
    sq = X.square().sum(1)
    if arch == "no_bias":
        value = 4 * (sq.sqrt() * y).mean()
    elif arch == "bias":
        r = (sq + 1).sqrt()
        value = 2 * depth * (r.pow(2 / depth) * y.pow(2 - 2 / depth)).mean()
    elif arch == "simplified_bn":
        value = 4 * y.mean()
    else:
        eps = 1e-3 if eps is None else check_positive_float("eps", eps)
        value = 2 * torch.clamp(2 * (sq + 1).sqrt() * y / eps, max=1.0).mean()
    return float(value)


def simplified_bn_norm_bound(model: TwoLayerNet) -> Tensor:
    r"""$2\,(\lVert W_2 \rVert^2 + \lVert \gamma \rVert^2)$ over live neurons of a Sim-BN net.

    When the net's reference set is its training set, this is *exactly* the $(W_2, \gamma)$
    part of $\frac2n \sum_i \lVert \nabla_\theta f(x_i)\rVert^2$, hence a lower bound on the
    Hessian trace at interpolation (constant $c = 2$ in
    $\mathrm{Tr} \ge c(\lVert W_2\rVert^2 + \lVert\gamma\rVert^2) \ge 2c\lVert \gamma\odot
    W_2\rVert_1$; derivation in `trace_lower_bound`). A neuron is live when its
    statistic over the reference set is positive; dead neurons have zero gradient.

    Args:
        model: A `sharpgen.models.TwoLayerNet` with ``arch="simplified_bn"`` and a reference
            set.

    Returns:
        A 0-dim tensor in the model's dtype.

    Raises:
        ValueError: If the net is not a simplified-BatchNorm net with a reference set.

    Examples:
        >>> import torch
        >>> from sharpgen.data import complete_xor
        >>> from sharpgen.models import flattest_generalizer
        >>> X = complete_xor(4, dtype=torch.float64).X
        >>> net = flattest_generalizer(4, "simplified_bn", reference=X, dtype=torch.float64)
        >>> round(float(simplified_bn_norm_bound(net)), 10)  # 4 * sum_k sqrt(1/4)
        8.0
    """
    if not isinstance(model, TwoLayerNet) or model.arch != "simplified_bn":
        raise ValueError(
            "simplified_bn_norm_bound needs a TwoLayerNet with arch='simplified_bn', got "
            f"{getattr(model, 'arch', type(model).__name__)!r}."
        )
    if model.reference is None:
        raise ValueError("the net has no reference set; call model.set_reference(X_train).")
    with torch.no_grad():
        z = model.reference @ model.W1.T + model.b1
        alive = _activate(z, model.activation).square().mean(0) > 0
        value = model.W2[alive].square().sum() + model.gamma[alive].square().sum()
    return 2 * value.detach()
