r"""Closed-form flattest interpolators of Wen, Li & Ma (2023).

At an interpolating model the trace of the Hessian of the MSE loss (no 1/2) is
$\mathrm{Tr}\,\nabla^2 L = \frac{2}{n} \sum_i \lVert \nabla_\theta f(x_i) \rVert^2$ (Lemma 4.1).
Each construction below interpolates and attains the lower bound of its architecture (see
`sharpgen.theory.trace_lower_bound`), yet the memorizers output 0 on every unseen cube point
while the generalizers compute $x_1 x_2$ everywhere: flatness alone does not decide
generalization for the ``"bias"`` and ``"simplified_ln"`` architectures (Table 1).

Every construction returns a `TwoLayerNet` of the requested ``width``; neurons beyond the
ones the construction needs are all-zero (they output 0 and have zero gradient, since
autograd uses $\mathrm{relu}'(0) = 0$).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sharpgen.models._checks import (
    check_arch,
    check_cube,
    check_dataset,
    check_int,
    check_positive_float,
    check_unique_rows,
)
from sharpgen.models._checks import (
    check_depth as _check_depth,
)
from sharpgen.models._checks import (
    check_dtype as _check_dtype,
)
from sharpgen.models._checks import (
    check_width as _check_width,
)
from sharpgen.models._deep import DeepReLUNet
from sharpgen.models._two_layer import TwoLayerNet

__all__ = [
    "flattest_generalizer",
    "flattest_memorizer",
    "xor_realizer_no_bias",
]

# (s1, s2) of the four xor neurons, in this order.
_SIGNS = ((1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0))


def _padded(rows: Tensor, width: int) -> Tensor:
    pad = torch.zeros((width - rows.shape[0], *rows.shape[1:]), dtype=rows.dtype)
    return torch.cat([rows, pad]).to(rows.device)


def _deep_net(
    W1: Tensor, b1: Tensor, c: Tensor, WD: Tensor, depth: int, width: int, dtype, device
) -> DeepReLUNet:
    """First layer (W1, b1), depth - 2 diagonal layers diag(c), output WD; zero padded."""
    kwargs = {"dtype": dtype, "device": device}
    middle = torch.diag(_padded(c, width)).to(**kwargs)
    weights = [_padded(W1, width).to(**kwargs)]
    weights += [middle.clone() for _ in range(depth - 2)]
    weights.append(_padded(WD, width).to(**kwargs))
    return DeepReLUNet(weights, _padded(b1, width).to(**kwargs))


def _xor_first_layer(d: int, scale: float, dtype: torch.dtype) -> Tensor:
    W1 = torch.zeros(4, d, dtype=dtype)
    W1[:, :2] = scale * torch.tensor(_SIGNS, dtype=dtype)
    return W1


def _xor_signs(dtype: torch.dtype) -> Tensor:
    s = torch.tensor(_SIGNS, dtype=dtype)
    return s[:, 0] * s[:, 1]


def flattest_memorizer(
    X: Tensor,
    y: Tensor,
    arch: str = "bias",
    *,
    width: int | None = None,
    eps: float | None = None,
    delta: float | None = None,
    depth: int = 2,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TwoLayerNet | DeepReLUNet:
    r"""A flattest interpolator that memorizes: one neuron per training point.

    **``arch="bias"`` (Theorem 4.1).** With $r_i = \sqrt{\lVert x_i\rVert^2 + 1}$ and the
    unit vector $w_i = x_i / \lVert x_i \rVert$ (on the cube $x_i/\sqrt d$),

    $$ W_{1,i} = \sqrt{r_i |y_i|}\, \frac{w_i}{\varepsilon}, \quad
       b_{1,i} = \sqrt{r_i |y_i|}\, \frac{\varepsilon - w_i^\top x_i}{\varepsilon}, \quad
       W_{2,i} = \operatorname{sign}(y_i) \sqrt{|y_i| / r_i}. $$

    Neuron $i$ is active exactly where $w_i^\top x > w_i^\top x_i - \varepsilon$, which
    among the training points is $x_i$ alone when $0 < \varepsilon < \mu =
    \min_i \min_{j \ne i} w_i^\top (x_i - x_j)$ ($\mu = 2/\sqrt d$ on the cube); there it
    takes the value $\sqrt{r_i |y_i|}$, so $f(x_i) = y_i$ and
    $\lVert \nabla f(x_i) \rVert^2 = r_i |y_i| + r_i |y_i| = 2 r_i |y_i|$, attaining the
    bound $\mathrm{Tr}\,\nabla^2 L = \frac{4}{n} \sum_i r_i |y_i|$ ($= 4\sqrt{d+1}$ on xor
    data). Labels may be any reals. Default $\varepsilon = \mu / 2$. On the cube every unseen
    point activates no neuron, so the output there is 0.

    **``arch="simplified_ln"`` (Theorem 5.1)**, cube data only, with the LayerNorm
    $\varepsilon > 0$ (default $10^{-3}$) and $0 < \delta < 2$ (default 1):

    $$ W_{1,i} = \tfrac{2\varepsilon}{\delta} x_i, \quad
       b_{1,i} = \tfrac{2\varepsilon}{\delta} (\delta - d), \quad W_{2,i} = y_i. $$

    At $x_i$ only neuron $i$ is active, with value $2\varepsilon > \varepsilon$, so the
    normalized hidden vector is the unit vector $e_i$, $f(x_i) = y_i$, the output is
    invariant to the scale of $(W_{1,i}, b_{1,i})$ (zero gradient there) and
    $\lVert \nabla f(x_i) \rVert^2 = \lVert e_i \rVert^2 = 1$: the trace is 2, the minimum.

    **``depth=D > 2``** (``arch="bias"``; a `DeepReLUNet` with bias in the first layer
    only): the same first-layer neurons with value $a_i$ at $x_i$, then diagonal layers
    $W_k = \mathrm{diag}(c_i)$ and output weights $W_{D,i}$, balanced so that every layer
    contributes equally: with $t_i = (r_i / |y_i|)^{1/D}$, $a_i = r_i / t_i$, $c_i = 1/t_i$,
    $W_{D,i} = \operatorname{sign}(y_i)/t_i$. Then
    $\lVert\nabla f(x_i)\rVert^2 = D\, r_i^{2/D} |y_i|^{2 - 2/D}$, the depth-$D$ lower bound
    (`sharpgen.theory.trace_lower_bound` with ``depth``; $2D(d+1)^{1/D}$ on xor data).

    Args:
        X: Training inputs ``(n, d)``, distinct rows.
        y: Training labels ``(n,)``.
        arch: ``"bias"`` or ``"simplified_ln"`` (flattest ``"no_bias"`` and
            ``"simplified_bn"`` nets generalize, Theorems 3.1 and 3.2: no memorizer exists).
        width: Number of neurons, at least ``n`` (default ``n``); extra neurons are zero.
        eps: ``"bias"``: the activation margin $\varepsilon \in (0, \mu)$;
            ``"simplified_ln"``: the LayerNorm $\varepsilon > 0$ (stored in the net).
        delta: ``"simplified_ln"`` only: $\delta \in (0, 2)$.
        depth: Number of layers $D \ge 2$; ``D > 2`` only for ``arch="bias"``.
        dtype: Floating dtype (default ``X.dtype``).
        device: Device (default ``X.device``).

    Returns:
        A `TwoLayerNet` (a `DeepReLUNet` when ``depth > 2``) with neuron ``i`` memorizing
        training point ``i``.

    Raises:
        ValueError: For duplicate training points, a zero input (``"bias"``), a point not
            separated from the others by $w_i$, non-cube inputs (``"simplified_ln"``),
            ``eps``/``delta`` out of range, ``width < n``, or an unsupported ``arch``.

    Examples:
        >>> import torch
        >>> from sharpgen.data import full_cube, xor_labels
        >>> X = full_cube(3, dtype=torch.float64)[:5]
        >>> net = flattest_memorizer(X, xor_labels(X))
        >>> torch.allclose(net(X), xor_labels(X))
        True

    References:
        Wen, Li, Ma. Sharpness Minimization Algorithms Do Not Only Minimize Sharpness To
        Achieve Better Generalization. NeurIPS 2023 (arXiv:2307.11007), Thms 4.1 and 5.1.
    """
    arch = check_arch(arch)
    if arch in ("no_bias", "simplified_bn"):
        theorem = "3.1" if arch == "no_bias" else "3.2"
        raise ValueError(
            f"no flattest memorizer exists for arch={arch!r}: its flattest interpolators "
            f"generalize (Theorem {theorem}); valid archs here are 'bias' and 'simplified_ln'."
        )
    X, y = check_dataset(X, y)
    depth = _check_depth(depth, arch)
    dtype = X.dtype if dtype is None else _check_dtype(dtype)
    device = X.device if device is None else torch.device(device)
    X = X.detach().to(device="cpu", dtype=torch.float64)
    y = y.detach().to(device="cpu", dtype=torch.float64)
    n, d = X.shape
    check_unique_rows("X", X)
    width = _check_width(width, n, f"a memorizer of n={n} training points")

    if arch == "bias":
        if delta is not None:
            raise ValueError("delta is only used by arch='simplified_ln'; leave it None.")
        norms = torch.linalg.vector_norm(X, dim=1)
        if bool((norms == 0).any()):
            raise ValueError(
                "X contains the zero vector, which no unit direction w_i = x_i/||x_i|| "
                "separates; shift the data or drop that point."
            )
        w = X / norms.unsqueeze(1)
        gaps = (w * X).sum(1).unsqueeze(1) - w @ X.T  # gaps[i, j] = w_i . (x_i - x_j)
        gaps.fill_diagonal_(math.inf)
        mu = float(gaps.min())
        if not mu > 0:
            raise ValueError(
                "some training point is not separated from the others by w_i = x_i/||x_i|| "
                "(w_i . x_i <= w_i . x_j for some j != i); the construction needs every point "
                "to be exposed, as on the hypercube or a sphere."
            )
        if eps is None:
            eps = 0.5 * mu if math.isfinite(mu) else 1.0
        eps = check_positive_float("eps", eps)
        if eps >= mu:
            raise ValueError(
                f"eps={eps} must lie in (0, {mu:.6g}) (the smallest separation margin; "
                "2/sqrt(d) on the cube) so that each neuron fires on its own point only."
            )
        r = torch.sqrt(norms.square() + 1)
        if depth > 2:
            alive = y != 0
            t = torch.where(alive, (r / y.abs().clamp(min=1e-300)) ** (1 / depth), 1.0)
            amp = torch.where(alive, r / t, 0.0)
            c = torch.where(alive, 1 / t, 0.0)
            W1 = amp.unsqueeze(1) * w / eps
            b1 = amp * (eps - (w * X).sum(1)) / eps
            WD = torch.sign(y) / t
            return _deep_net(W1, b1, c, WD, depth, width, dtype, device)
        amp = torch.sqrt(r * y.abs())
        W1 = amp.unsqueeze(1) * w / eps
        b1 = amp * (eps - (w * X).sum(1)) / eps
        W2 = torch.sign(y) * torch.sqrt(y.abs() / r)
        net_eps = 1e-3
    else:
        check_cube("X", X)
        eps = 1e-3 if eps is None else check_positive_float("eps", eps)
        delta = 1.0 if delta is None else check_positive_float("delta", delta)
        if not 0 < delta < 2:
            raise ValueError(
                f"delta={delta} must lie in (0, 2): each neuron must fire on its own cube point "
                "(value 2*eps) and on no other (inner products differ by at least 2)."
            )
        scale = 2 * eps / delta
        W1 = scale * X
        b1 = torch.full((n,), scale * (delta - d), dtype=torch.float64)
        W2 = y.clone()
        net_eps = eps
    return TwoLayerNet(
        arch,
        _padded(W1, width).to(dtype=dtype, device=device),
        _padded(W2, width).to(dtype=dtype, device=device),
        b1=_padded(b1, width).to(dtype=dtype, device=device),
        eps=net_eps,
    )


def xor_realizer_no_bias(
    d: int,
    width: int = 4,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TwoLayerNet:
    r"""The width-4 no-bias net computing $x_1 x_2$ on the cube, scaled to be flattest.

    $$ f(x) = c\,[\mathrm{relu}(a(x_1 + x_2)) + \mathrm{relu}(-a(x_1 + x_2))
       - \mathrm{relu}(a(x_1 - x_2)) - \mathrm{relu}(-a(x_1 - x_2))] = 2ac\, x_1 x_2 $$

    on $\{-1,1\}^d$, with $a = d^{1/4}/2$ and $c = 1/(2a)$. Each cube point activates one
    neuron (value $2a$), so $\lVert\nabla f(x)\rVert^2 = 4a^2 + c^2 d = 2\sqrt d$ and the
    trace on any cube training set is $4\sqrt d$ — equal to the no-bias lower bound
    $\frac{4}{n}\sum_i \lVert x_i\rVert |y_i|$: this net is a flattest no-bias interpolator
    of every xor training set. Neurons: ``W1[:, :2]`` $= a(1,1), a(-1,-1), a(1,-1), a(-1,1)$
    and ``W2`` $= c(1, 1, -1, -1)$.

    Note:
        On half of the cube two neurons sit exactly at the ReLU kink (pre-activation 0);
        autograd's convention $\mathrm{relu}'(0) = 0$ gives them zero gradient, which is the
        derivative from the inactive side. Every trace quoted here uses that convention.

    Args:
        d: Input dimension, at least 2.
        width: Number of neurons, at least 4; extra ones are zero.
        dtype: Floating dtype (default ``torch.get_default_dtype()``).
        device: Device.

    Returns:
        A `TwoLayerNet` with ``arch="no_bias"``.

    Raises:
        ValueError: For ``d < 2`` or ``width < 4``.

    Examples:
        >>> import torch
        >>> from sharpgen.data import full_cube, xor_labels
        >>> X = full_cube(4, dtype=torch.float64)
        >>> net = xor_realizer_no_bias(4, dtype=torch.float64)
        >>> torch.allclose(net(X), xor_labels(X))
        True
    """
    d = check_int("d", d, minimum=2)
    width = _check_width(width, 4, "the xor realizer")
    dtype = _check_dtype(dtype)
    a = d**0.25 / 2
    c = 1 / (2 * a)
    W1 = torch.zeros(4, d, dtype=torch.float64)
    W1[:, :2] = a * torch.tensor(
        [[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64
    )
    W2 = c * torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    return TwoLayerNet(
        "no_bias",
        _padded(W1, width).to(dtype=dtype, device=device),
        _padded(W2, width).to(dtype=dtype, device=device),
    )


def flattest_generalizer(
    d: int,
    arch: str = "bias",
    *,
    width: int = 4,
    eps: float | None = None,
    rho: float | None = None,
    reference: Tensor | None = None,
    depth: int = 2,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TwoLayerNet | DeepReLUNet:
    r"""A flattest interpolator of xor data that computes $x_1 x_2$ on the whole cube.

    Four neurons, one per sign pair $(s_1, s_2)$ in the order $(+,+), (+,-), (-,+), (-,-)$;
    neuron $(s_1, s_2)$ fires (only) on the quadrant $x_1 = s_1, x_2 = s_2$.

    * ``"bias"`` (Eq. 5): $W_{1,k} = \rho (s_1, s_2, 0, \dots)$, $b_{1,k} = -\rho$,
      $W_{2,k} = s_1 s_2 / \rho$, $\rho = (d+1)^{1/4}$. Each point activates one neuron
      (value $\rho$): $\lVert \nabla f \rVert^2 = \rho^2 + (d+1)/\rho^2 = 2\sqrt{d+1}$, so the
      trace on any xor training set is $4\sqrt{d+1}$, the bias-net minimum.
    * ``"simplified_ln"`` (Eq. 18): $W_{1,k} = 2\varepsilon (s_1, s_2, 0, \dots)$,
      $b_{1,k} = -2\varepsilon$, $W_{2,k} = s_1 s_2$; trace 2, the minimum.
    * ``"no_bias"``: `xor_realizer_no_bias` (trace $4\sqrt d$, the no-bias minimum).
    * ``"simplified_bn"`` (near-flattest; the infimum is not attained, Theorem 3.2):
      $W_{1,k} = \rho (s_1, s_2, 0, \dots)$, $b_{1,k} = -\rho$ (default $\rho = 10$),
      $\gamma_k = q_k^{1/4}$, $W_{2,k} = s_1 s_2 q_k^{1/4}$, where $q_k$ is the fraction of
      ``reference`` points in quadrant $k$ (all four must occur). With the reference set as
      the training set its trace is exactly
      $4 \sum_k \sqrt{q_k} + \frac{2}{\rho^2} \sum_k q_k V_k$, $V_k$ the mean squared
      distance of the quadrant's points to their mean: it decreases to
      $4 \sum_k \sqrt{q_k}$ ($= 8$ on balanced sets) as $\rho \to \infty$.
    * ``"bias"`` with ``depth=D > 2`` (a `DeepReLUNet`): first layer as Eq. 5 with
      $\rho = r^{1 - 1/D}$, $r = \sqrt{d+1}$, then $D-2$ layers $r^{-1/D} I$ and output
      weights $s_1 s_2 r^{-1/D}$; every layer contributes equally and the trace is
      $2D(d+1)^{1/D}$, the depth-$D$ minimum.

    Args:
        d: Input dimension, at least 2.
        arch: One of ``"no_bias"``, ``"bias"``, ``"simplified_bn"``, ``"simplified_ln"``.
        width: Number of neurons, at least 4; extra ones are zero.
        eps: LayerNorm $\varepsilon > 0$ for ``"simplified_ln"`` (default $10^{-3}$).
        rho: First-layer scale $\rho > 0$ for ``"simplified_bn"``.
        reference: Reference set ``(N, d)`` for ``"simplified_bn"`` (required there).
        depth: Number of layers $D \ge 2$; ``D > 2`` only for ``arch="bias"``.
        dtype: Floating dtype (default ``torch.get_default_dtype()``).
        device: Device.

    Returns:
        A `TwoLayerNet` (a `DeepReLUNet` when ``depth > 2``).

    Raises:
        ValueError: For an unknown ``arch``, ``width < 4``, a non-positive ``eps``/``rho``,
            options that the ``arch`` does not use, or a missing/incomplete reference set.

    Examples:
        >>> import torch
        >>> from sharpgen.data import full_cube, xor_labels
        >>> X = full_cube(4, dtype=torch.float64)
        >>> net = flattest_generalizer(4, "bias", dtype=torch.float64)
        >>> torch.allclose(net(X), xor_labels(X))
        True

    References:
        Wen, Li, Ma (2023), Eq. (5) and Eq. (18).
    """
    arch = check_arch(arch)
    d = check_int("d", d, minimum=2)
    depth = _check_depth(depth, arch)
    width = _check_width(width, 4, "the xor generalizer")
    dtype = _check_dtype(dtype)
    if eps is not None and arch != "simplified_ln":
        raise ValueError(f"eps is only used by arch='simplified_ln', not arch={arch!r}.")
    if (rho is not None or reference is not None) and arch != "simplified_bn":
        raise ValueError(f"rho and reference are only used by arch='simplified_bn', not {arch!r}.")
    if arch == "no_bias":
        return xor_realizer_no_bias(d, width, dtype=dtype, device=device)
    f64 = torch.float64
    signs = _xor_signs(f64)
    gamma = None
    net_eps = 1e-3
    if arch == "bias" and depth > 2:
        r = math.sqrt(d + 1)
        rho_ = r ** (1 - 1 / depth)
        c = torch.full((4,), r ** (-1 / depth), dtype=f64)
        W1, b1 = _xor_first_layer(d, rho_, f64), torch.full((4,), -rho_, dtype=f64)
        return _deep_net(W1, b1, c, signs * r ** (-1 / depth), depth, width, dtype, device)
    if arch == "bias":
        rho_ = (d + 1) ** 0.25
        W1, b1, W2 = (
            _xor_first_layer(d, rho_, f64),
            torch.full((4,), -rho_, dtype=f64),
            signs / rho_,
        )
    elif arch == "simplified_ln":
        net_eps = 1e-3 if eps is None else check_positive_float("eps", eps)
        W1 = _xor_first_layer(d, 2 * net_eps, f64)
        b1, W2 = torch.full((4,), -2 * net_eps, dtype=f64), signs.clone()
    else:
        rho_ = 10.0 if rho is None else check_positive_float("rho", rho)
        if reference is None:
            raise ValueError(
                "arch='simplified_bn' needs the reference set (normally the training set): "
                "pass reference=X_train."
            )
        if not isinstance(reference, Tensor) or reference.ndim != 2 or reference.shape[1] != d:
            shape = tuple(reference.shape) if isinstance(reference, Tensor) else reference
            raise ValueError(f"reference must have shape (N, d) = (N, {d}), got {shape}.")
        first = reference[:, :2].detach().to("cpu", f64)
        check_cube("reference[:, :2]", first)
        s = torch.tensor(_SIGNS, dtype=f64)
        q = (first.unsqueeze(1) == s.unsqueeze(0)).all(-1).to(f64).mean(0)
        if bool((q == 0).any()):
            raise ValueError(
                "the reference set must contain all four sign patterns of (x1, x2); "
                f"quadrant fractions are {q.tolist()}."
            )
        W1, b1 = _xor_first_layer(d, rho_, f64), torch.full((4,), -rho_, dtype=f64)
        gamma = q.pow(0.25)
        W2 = signs * q.pow(0.25)
    kwargs: dict[str, Any] = {"dtype": dtype, "device": device}
    net = TwoLayerNet(
        arch,
        _padded(W1, width).to(**kwargs),
        _padded(W2, width).to(**kwargs),
        b1=_padded(b1.to(f64), width).to(**kwargs),
        gamma=None if gamma is None else _padded(gamma, width).to(**kwargs),
        eps=net_eps,
    )
    if arch == "simplified_bn":
        net.set_reference(reference)
    return net
