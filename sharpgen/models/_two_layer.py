r"""Two-layer networks of Wen, Li & Ma (2023) with scalar output.

The four architectures of the paper (Table 1), all with a first layer $W_1 \in
\mathbb{R}^{m \times d}$ and a second layer $W_2 \in \mathbb{R}^m$:

* ``"no_bias"``: $f(x) = W_2 \cdot \sigma(W_1 x)$, parameters ``W1``, ``W2``;
* ``"bias"``: $f(x) = W_2 \cdot \sigma(W_1 x + b_1)$, parameters ``W1``, ``b1``, ``W2``;
* ``"simplified_bn"``: $f(x) = W_2 \cdot \mathrm{SBN}_\gamma(\sigma(W_1 x + b_1))$,
  parameters ``W1``, ``b1``, ``gamma``, ``W2``;
* ``"simplified_ln"``: $f(x) = W_2 \cdot h / \max(\lVert h \rVert_2, \varepsilon)$ with
  $h = \sigma(W_1 x + b_1)$, parameters ``W1``, ``b1``, ``W2``;

with $\sigma$ = ReLU (or softplus, the appendix variant) and the simplified BatchNorm

$$ \mathrm{SBN}_\gamma(h)[j] = \gamma_j \, \frac{h[j]}{\sqrt{\tfrac{1}{N} \sum_{k=1}^N
h_k[j]^2}}, $$

whose statistics run over a fixed **reference set** $x_1, \dots, x_N$ (the training set),
recomputed from the current $W_1, b_1$ in every forward pass.

The pure function `two_layer_forward` holds the maths; `TwoLayerNet.forward` calls it, so
the module and the functional form agree bit for bit, and the functional form can be
``vmap``-ed over stacked parameters of many runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharpgen.models._checks import (
    check_activation,
    check_arch,
    check_float_tensor,
    check_int,
    check_positive_float,
)
from sharpgen.models._init import _uniform, _weight_bound

__all__ = ["TwoLayerNet", "two_layer_forward", "two_layer_relu"]

_NEEDS_BIAS = ("bias", "simplified_bn", "simplified_ln")


def _activate(z: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.relu(z)
    return F.softplus(z)


def _reference_scale(h_ref: Tensor) -> Tensor:
    r"""Per-neuron $1/\sqrt{\mathrm{mean}_k h_k[j]^2}$ with dead neurons mapped to 0."""
    second_moment = h_ref.square().mean(dim=-2)
    alive = second_moment > 0
    safe = torch.where(alive, second_moment, torch.ones_like(second_moment))
    return torch.where(alive, torch.rsqrt(safe), torch.zeros_like(second_moment))


def two_layer_forward(
    params: Mapping[str, Tensor],
    x: Tensor,
    *,
    arch: str,
    activation: str = "relu",
    eps: float = 1e-3,
    reference: Tensor | None = None,
) -> Tensor:
    r"""Output $f(x)$ of a two-layer network given its parameters as plain tensors.

    A pure function (no module, no state): it works under `torch.func.grad`, `vmap` and
    `functional_call`, for example over the stacked parameters of many runs.

    Args:
        params: ``{"W1": (m, d), "W2": (m,)}`` plus ``"b1": (m,)`` for every arch but
            ``"no_bias"`` and ``"gamma": (m,)`` for ``"simplified_bn"``.
        x: Inputs of shape ``(..., d)`` (a batch ``(n, d)`` or one example ``(d,)``).
        arch: ``"no_bias"``, ``"bias"``, ``"simplified_bn"`` or ``"simplified_ln"``.
        activation: ``"relu"`` or ``"softplus"``.
        eps: The $\varepsilon$ of simplified LayerNorm, $h / \max(\lVert h\rVert, \varepsilon)$.
        reference: Reference set ``(N, d)`` of simplified BatchNorm (ignored otherwise).

    Returns:
        The outputs, of shape ``x.shape[:-1]``.

    Raises:
        ValueError: For an unknown ``arch``/``activation``, missing parameters, a last input
            dimension that does not match ``W1``, or ``"simplified_bn"`` without ``reference``.

    Note:
        Simplified BatchNorm of a neuron that is zero on the whole reference set (statistic
        0) would divide by zero. Such a *dead* neuron is given scale 0 (its normalized
        output is 0 and so are its gradients), implemented with ``torch.where`` so that
        neither the forward nor the backward pass produces NaN. Simplified LayerNorm uses
        $\sqrt{\max(\lVert h\rVert^2, \varepsilon^2)} = \max(\lVert h\rVert, \varepsilon)$,
        which is NaN-free for $h = 0$ as well.

    Examples:
        >>> import torch
        >>> params = {"W1": torch.eye(2), "b1": torch.zeros(2), "W2": torch.ones(2)}
        >>> two_layer_forward(params, torch.tensor([[1.0, -2.0]]), arch="bias")
        tensor([1.])
    """
    arch = check_arch(arch)
    activation = check_activation(activation)
    W1, W2 = params["W1"], params["W2"]
    if x.shape[-1] != W1.shape[-1]:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but W1 has shape "
            f"{tuple(W1.shape)} (d = {W1.shape[-1]}); pass inputs of shape (n, {W1.shape[-1]})."
        )
    if arch in _NEEDS_BIAS and "b1" not in params:
        raise ValueError(f"arch={arch!r} needs a first-layer bias 'b1' in params.")
    if arch == "simplified_bn" and "gamma" not in params:
        raise ValueError("arch='simplified_bn' needs a per-neuron scale 'gamma' in params.")

    z = x @ W1.transpose(-1, -2)
    if arch != "no_bias":
        z = z + params["b1"]
    h = _activate(z, activation)

    if arch == "simplified_bn":
        if reference is None:
            raise ValueError(
                "arch='simplified_bn' normalizes with statistics over a reference set, but "
                "reference is None: call model.set_reference(X_train) (or pass "
                "reference=X_train to two_layer_relu / two_layer_forward)."
            )
        h_ref = _activate(reference @ W1.transpose(-1, -2) + params["b1"], activation)
        h = h * (params["gamma"] * _reference_scale(h_ref))
    elif arch == "simplified_ln":
        sq_norm = h.square().sum(dim=-1, keepdim=True)
        h = h / torch.sqrt(torch.clamp(sq_norm, min=eps * eps))
    return (h * W2).sum(dim=-1)


class TwoLayerNet(nn.Module):
    r"""A two-layer network of the paper with parameters ``W1``, ``b1``, ``gamma``, ``W2``.

    Holds the given tensors (copied) as parameters named exactly

    * ``W1`` of shape ``(m, d)``,
    * ``b1`` of shape ``(m,)`` — every ``arch`` except ``"no_bias"``,
    * ``gamma`` of shape ``(m,)`` — only ``"simplified_bn"`` (default all ones),
    * ``W2`` of shape ``(m,)`` (scalar output),

    registered in that order. Inputs ``(n, d)`` give outputs ``(n,)``; one example ``(d,)``
    gives a 0-dim output. Build randomly initialized nets with `two_layer_relu` and the
    paper's flattest ones with `flattest_memorizer` / `flattest_generalizer`.

    For ``"simplified_bn"`` the reference set is stored as the buffer ``reference`` (set it
    with `set_reference`); the statistics are recomputed from the current ``W1``, ``b1`` in
    every forward pass, so gradients flow through them, and a single-example forward
    normalizes with the full reference-set statistics.

    Args:
        arch: ``"no_bias"``, ``"bias"``, ``"simplified_bn"`` or ``"simplified_ln"``.
        W1: First-layer weights ``(m, d)``.
        W2: Second-layer weights ``(m,)``.
        b1: First-layer bias ``(m,)``; required unless ``arch="no_bias"`` (where it must be
            None).
        gamma: Simplified-BatchNorm scales ``(m,)``; only for ``"simplified_bn"``
            (default ones).
        activation: ``"relu"`` (default) or ``"softplus"``.
        eps: Simplified-LayerNorm $\varepsilon > 0$ in $\max(\lVert h\rVert, \varepsilon)$.
        reference: Optional reference set ``(N, d)`` for ``"simplified_bn"``.

    Attributes:
        arch: The architecture name.
        activation: The activation name.
        eps: The simplified-LayerNorm $\varepsilon$.

    Raises:
        ValueError: For an unknown ``arch``/``activation``, inconsistent shapes, a bias
            given to ``"no_bias"`` (or missing elsewhere), ``gamma`` outside
            ``"simplified_bn"``, or a non-positive ``eps``.
        TypeError: If a weight is not a floating tensor.

    Examples:
        >>> import torch
        >>> net = TwoLayerNet("no_bias", torch.eye(2), torch.tensor([1.0, -1.0]))
        >>> net(torch.tensor([[2.0, 1.0], [0.0, 3.0]]))
        tensor([ 1., -3.], grad_fn=<SumBackward1>)
    """

    reference: Tensor | None

    def __init__(
        self,
        arch: str,
        W1: Tensor,
        W2: Tensor,
        *,
        b1: Tensor | None = None,
        gamma: Tensor | None = None,
        activation: str = "relu",
        eps: float = 1e-3,
        reference: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.arch = check_arch(arch)
        self.activation = check_activation(activation)
        self.eps = check_positive_float("eps", eps)
        W1 = check_float_tensor("W1", W1, ndim=2)
        W2 = check_float_tensor("W2", W2, ndim=1)
        m, d = W1.shape
        if m == 0 or d == 0:
            raise ValueError(f"W1 must have shape (m, d) with m, d >= 1, got {tuple(W1.shape)}.")
        if W2.shape != (m,):
            raise ValueError(
                f"W2 must have shape (m,) = ({m},) to match W1, got {tuple(W2.shape)}."
            )
        if self.arch == "no_bias":
            if b1 is not None:
                raise ValueError("arch='no_bias' has no first-layer bias; pass b1=None.")
        elif b1 is None:
            raise ValueError(f"arch={arch!r} needs a first-layer bias b1 of shape ({m},).")
        if gamma is not None and self.arch != "simplified_bn":
            raise ValueError(f"gamma is only used by arch='simplified_bn', not arch={arch!r}.")
        if self.arch == "simplified_bn" and gamma is None:
            gamma = torch.ones(m, dtype=W1.dtype, device=W1.device)
        self.W1 = nn.Parameter(W1.detach().clone())
        if b1 is not None:
            b1 = check_float_tensor("b1", b1, ndim=1)
            if b1.shape != (m,):
                raise ValueError(f"b1 must have shape ({m},), got {tuple(b1.shape)}.")
            self.b1 = nn.Parameter(b1.detach().to(W1).clone())
        if gamma is not None:
            gamma = check_float_tensor("gamma", gamma, ndim=1)
            if gamma.shape != (m,):
                raise ValueError(f"gamma must have shape ({m},), got {tuple(gamma.shape)}.")
            self.gamma = nn.Parameter(gamma.detach().to(W1).clone())
        self.W2 = nn.Parameter(W2.detach().to(W1).clone())
        self.register_buffer("reference", None)
        if reference is not None:
            self.set_reference(reference)

    # -- shape ------------------------------------------------------------------------
    @property
    def d(self) -> int:
        """Input dimension."""
        return int(self.W1.shape[1])

    @property
    def width(self) -> int:
        """Number of hidden neurons ``m``."""
        return int(self.W1.shape[0])

    # -- reference set ----------------------------------------------------------------
    def set_reference(self, X: Tensor | None) -> TwoLayerNet:
        """Set (or clear with None) the simplified-BatchNorm reference set.

        Args:
            X: Reference inputs ``(N, d)`` (normally the training set), copied to the
                dtype and device of the parameters; None removes the reference set.

        Returns:
            The module itself.

        Raises:
            ValueError: If the shape does not match the model, or ``arch`` is not
                ``"simplified_bn"``.
        """
        if X is None:
            self.reference = None
            return self
        if self.arch != "simplified_bn":
            raise ValueError(
                f"only arch='simplified_bn' uses a reference set; this net has arch={self.arch!r}."
            )
        X = check_float_tensor("X", X, ndim=2)
        if X.shape[1] != self.d or X.shape[0] == 0:
            raise ValueError(
                f"the reference set must have shape (N, d) = (N, {self.d}) with N >= 1, "
                f"got {tuple(X.shape)}."
            )
        self.reference = X.detach().to(dtype=self.W1.dtype, device=self.W1.device).clone()
        return self

    # -- forward ----------------------------------------------------------------------
    def functional_forward(
        self, params: Mapping[str, Tensor], x: Tensor, reference: Tensor | None = None
    ) -> Tensor:
        """`two_layer_forward` with this net's ``arch``, ``activation``, ``eps``.

        Args:
            params: Parameters with the names of `named_parameters` (any values, e.g.
                stacked under ``vmap``).
            x: Inputs ``(..., d)``.
            reference: Reference set for ``"simplified_bn"``; default the stored one.

        Returns:
            The outputs, of shape ``x.shape[:-1]``.
        """
        if reference is None:
            reference = self.reference
        return two_layer_forward(
            params,
            x,
            arch=self.arch,
            activation=self.activation,
            eps=self.eps,
            reference=reference,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Outputs $f(x)$ of shape ``x.shape[:-1]`` for inputs ``x`` of shape ``(..., d)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
        if x.ndim == 0 or x.shape[-1] != self.d:
            raise ValueError(
                f"x must have shape (n, {self.d}) (or ({self.d},) for one example) for this "
                f"net with d={self.d} inputs, got shape {tuple(x.shape)}."
            )
        if x.dtype != self.W1.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the net's parameters are {self.W1.dtype}; "
                f"convert the inputs with x.to({self.W1.dtype})."
            )
        params = dict(self.named_parameters())
        return self.functional_forward(params, x)

    def extra_repr(self) -> str:
        extra = f", eps={self.eps}" if self.arch == "simplified_ln" else ""
        return (
            f"d={self.d}, width={self.width}, arch={self.arch!r}, "
            f"activation={self.activation!r}{extra}"
        )


def two_layer_relu(
    d: int,
    width: int,
    *,
    bias: bool = True,
    norm: str | None = None,
    activation: str = "relu",
    init_scale: float = 1.0,
    first_layer_init_scale: float = 1.0,
    eps: float = 1e-3,
    reference: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TwoLayerNet:
    r"""A randomly initialized two-layer network of the paper.

    ``bias`` and ``norm`` select the architecture: ``bias=False`` gives ``"no_bias"``,
    ``bias=True`` gives ``"bias"``, ``norm="simplified_bn"`` / ``"simplified_ln"`` give the
    normalized nets (which always have a first-layer bias, as in the paper).

    **Initialization** is PyTorch's default ``nn.Linear`` one (Kaiming-uniform with
    $a=\sqrt 5$, i.e. $U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})$ for weights and
    biases), drawn with ``Tensor.uniform_`` from ``generator`` only, in the fixed order

    1. ``W1`` $\sim U(-1/\sqrt d, 1/\sqrt d)^{m \times d}$,
    2. ``b1`` $\sim U(-1/\sqrt d, 1/\sqrt d)^m$ (skipped for ``"no_bias"``),
    3. ``W2`` $\sim U(-1/\sqrt m, 1/\sqrt m)^m$,

    on the generator's device (CPU when ``generator`` is None, which uses the global RNG),
    then moved to ``device``. With the same seed this equals, bit for bit, ``nn.Linear(d, m)``
    followed by ``nn.Linear(m, 1, bias=False)``. Then

    $$ W_1 \leftarrow s\,s_1 W_1,\quad b_1 \leftarrow s\,s_1 b_1,\quad W_2 \leftarrow s W_2, $$

    with $s$ = ``init_scale`` and $s_1$ = ``first_layer_init_scale`` (the paper's Sim-LN run
    uses $s_1 = 1/100$). ``gamma`` (simplified BatchNorm) starts at 1 and is not scaled; the
    paper states no initialization, and with $\gamma = 1$ the paper's learning rate is
    unstable for 1-SAM (see the paper summary), so experiments may rescale it.

    Args:
        d: Input dimension.
        width: Number of hidden neurons ``m``.
        bias: Whether the first layer has a bias (must be True when ``norm`` is given).
        norm: None, ``"simplified_bn"`` or ``"simplified_ln"``.
        activation: ``"relu"`` or ``"softplus"`` (the appendix variant, $\log(1+e^z)$).
        init_scale: $s > 0$, multiplies every initial weight and bias.
        first_layer_init_scale: $s_1 > 0$, multiplies ``W1`` and ``b1`` as well.
        eps: Simplified-LayerNorm $\varepsilon > 0$.
        reference: Reference set ``(N, d)`` for ``"simplified_bn"`` (or call
            `TwoLayerNet.set_reference` later).
        generator: Source of randomness; the global RNG is untouched when given.
        dtype: Floating dtype of the parameters.
        device: Device of the parameters (default: the generator's device, else CPU).

    Returns:
        A `TwoLayerNet`.

    Raises:
        ValueError: For non-positive ``d``/``width``/scales/``eps``, an unknown ``norm`` or
            ``activation``, or ``bias=False`` together with a ``norm``.
        TypeError: For non-integer ``d``/``width`` or a non-floating ``dtype``.

    Examples:
        >>> import torch
        >>> net = two_layer_relu(3, 5, generator=torch.Generator().manual_seed(0))
        >>> [name for name, _ in net.named_parameters()]
        ['W1', 'b1', 'W2']
        >>> net(torch.ones(4, 3)).shape
        torch.Size([4])
    """
    d = check_int("d", d)
    width = check_int("width", width)
    init_scale = check_positive_float("init_scale", init_scale)
    first_layer_init_scale = check_positive_float("first_layer_init_scale", first_layer_init_scale)
    check_positive_float("eps", eps)
    activation = check_activation(activation)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    if norm is None:
        arch = "bias" if bias else "no_bias"
    elif norm in ("simplified_bn", "simplified_ln"):
        if not bias:
            raise ValueError(
                f"norm={norm!r} is defined with a first-layer bias in the paper; use bias=True."
            )
        arch = norm
    else:
        raise ValueError(
            f"unknown norm {norm!r}; valid values are None, 'simplified_bn', 'simplified_ln'."
        )
    if device is None and generator is not None:
        device = generator.device

    W1 = _uniform((width, d), _weight_bound(d), generator, dtype, device)
    if arch != "no_bias":
        b1 = _uniform((width,), 1.0 / math.sqrt(d), generator, dtype, device)
    else:
        b1 = None
    W2 = _uniform((width,), _weight_bound(width), generator, dtype, device)
    first = init_scale * first_layer_init_scale
    if first != 1.0:
        W1 = W1 * first
        b1 = b1 * first if b1 is not None else None
    if init_scale != 1.0:
        W2 = W2 * init_scale
    return TwoLayerNet(arch, W1, W2, b1=b1, activation=activation, eps=eps, reference=reference)
