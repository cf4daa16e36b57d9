r"""Deep ReLU networks with a bias in the first layer only (the paper's Fig. 11 model).

$$ f(x) = W_D \, \sigma(W_{D-1} \cdots \sigma(W_2 \, \sigma(W_1 x + b_1))) $$

with parameters ``W1`` $(m_1, d)$, ``b1`` $(m_1,)$, ``W2`` $(m_2, m_1)$, ...,
``WD`` $(m_{D-1},)$ (a vector: scalar output).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from sharpgen.models._checks import check_activation, check_float_tensor, check_int
from sharpgen.models._checks import check_positive_float as _check_pos
from sharpgen.models._init import _uniform, _weight_bound
from sharpgen.models._two_layer import _activate

__all__ = ["DeepReLUNet", "deep_forward", "deep_relu"]


def deep_forward(params: Mapping[str, Tensor], x: Tensor, *, activation: str = "relu") -> Tensor:
    """Output of a deep net given its parameters ``W1, b1, W2, ..., WD`` as plain tensors.

    A pure function usable under `torch.func.grad` and ``vmap``.

    Args:
        params: ``W1`` $(m_1, d)$, ``b1`` $(m_1,)$, ``W2`` ... ``WD`` (the last 1-D).
        x: Inputs ``(..., d)``.
        activation: ``"relu"`` or ``"softplus"``.

    Returns:
        Outputs of shape ``x.shape[:-1]``.

    Raises:
        ValueError: If ``x``'s last dimension does not match ``W1``.

    Examples:
        >>> import torch
        >>> params = {"W1": torch.eye(2), "b1": torch.zeros(2), "W2": torch.eye(2),
        ...           "W3": torch.ones(2)}
        >>> deep_forward(params, torch.tensor([[1.0, -2.0]]))
        tensor([1.])
    """
    activation = check_activation(activation)
    W1 = params["W1"]
    if x.shape[-1] != W1.shape[-1]:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but W1 has shape "
            f"{tuple(W1.shape)}; pass inputs of shape (n, {W1.shape[-1]})."
        )
    depth = sum(1 for k in params if k.startswith("W"))
    h = _activate(x @ W1.transpose(-1, -2) + params["b1"], activation)
    for layer in range(2, depth):
        h = _activate(h @ params[f"W{layer}"].transpose(-1, -2), activation)
    return (h * params[f"W{depth}"]).sum(dim=-1)


class DeepReLUNet(nn.Module):
    """A deep net with first-layer bias only; parameters ``W1, b1, W2, ..., WD``.

    Args:
        weights: ``[W1, W2, ..., WD]`` with ``W1`` $(m_1, d)$, ``Wk`` $(m_k, m_{k-1})$ and
            the last one 1-D $(m_{D-1},)$; copied into parameters. At least two.
        b1: First-layer bias $(m_1,)$.
        activation: ``"relu"`` or ``"softplus"``.

    Raises:
        ValueError: For inconsistent shapes or fewer than two weights.

    Examples:
        >>> import torch
        >>> net = DeepReLUNet([torch.eye(2), torch.eye(2), torch.ones(2)], torch.zeros(2))
        >>> [name for name, _ in net.named_parameters()]
        ['W1', 'b1', 'W2', 'W3']
    """

    def __init__(self, weights: Sequence[Tensor], b1: Tensor, *, activation: str = "relu") -> None:
        super().__init__()
        self.activation = check_activation(activation)
        if len(weights) < 2:
            raise ValueError(f"weights needs at least two layers, got {len(weights)}.")
        shapes = []
        for k, W in enumerate(weights, start=1):
            last = k == len(weights)
            check_float_tensor(f"W{k}", W, ndim=1 if last else 2)
            shapes.append(tuple(W.shape))
        for k in range(1, len(weights)):
            fan_in = shapes[k][-1]
            if fan_in != shapes[k - 1][0]:
                raise ValueError(
                    f"W{k + 1} has shape {shapes[k]} but W{k} has {shapes[k - 1][0]} outputs."
                )
        check_float_tensor("b1", b1, ndim=1)
        if b1.shape[0] != shapes[0][0]:
            raise ValueError(f"b1 must have shape ({shapes[0][0]},), got {tuple(b1.shape)}.")
        ref = weights[0]
        self.W1 = nn.Parameter(ref.detach().clone())
        self.b1 = nn.Parameter(b1.detach().to(ref).clone())
        for k, W in enumerate(weights[1:], start=2):
            setattr(self, f"W{k}", nn.Parameter(W.detach().to(ref).clone()))
        self.depth = len(weights)

    @property
    def d(self) -> int:
        """Input dimension."""
        return int(self.W1.shape[1])

    def functional_forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """`deep_forward` with this net's activation."""
        return deep_forward(params, x, activation=self.activation)

    def forward(self, x: Tensor) -> Tensor:
        """Outputs of shape ``x.shape[:-1]`` for inputs ``(..., d)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
        if x.ndim == 0 or x.shape[-1] != self.d:
            raise ValueError(
                f"x must have shape (n, {self.d}) for this net with d={self.d} inputs, "
                f"got shape {tuple(x.shape)}."
            )
        if x.dtype != self.W1.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the net's parameters are {self.W1.dtype}; "
                f"convert the inputs with x.to({self.W1.dtype})."
            )
        return self.functional_forward(dict(self.named_parameters()), x)

    def extra_repr(self) -> str:
        return f"d={self.d}, depth={self.depth}, activation={self.activation!r}"


def deep_relu(
    d: int,
    widths: Sequence[int],
    *,
    activation: str = "relu",
    init_scale: float = 1.0,
    first_layer_init_scale: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> DeepReLUNet:
    r"""A randomly initialized deep net with bias in the first layer only.

    ``widths = [m_1, ..., m_{D-1}]`` gives depth $D$ = ``len(widths) + 1``. Initialization
    as in `two_layer_relu`: PyTorch's default ``nn.Linear`` init, drawn from ``generator``
    in the order ``W1, b1, W2, ..., WD``; then ``W1, b1`` are multiplied by
    ``init_scale * first_layer_init_scale`` and ``W2 ... WD`` by ``init_scale``.

    Args:
        d: Input dimension.
        widths: Hidden widths, at least one.
        activation: ``"relu"`` or ``"softplus"``.
        init_scale: Multiplies every initial weight and bias.
        first_layer_init_scale: Multiplies ``W1`` and ``b1`` as well.
        generator: Source of randomness.
        dtype: Floating dtype.
        device: Device (default: the generator's).

    Returns:
        A `DeepReLUNet`.

    Raises:
        ValueError: For empty or non-positive widths or scales.

    Examples:
        >>> import torch
        >>> net = deep_relu(3, [4, 5], generator=torch.Generator().manual_seed(0))
        >>> net(torch.ones(2, 3)).shape
        torch.Size([2])
    """
    d = check_int("d", d)
    if isinstance(widths, int) or len(widths) == 0:
        raise ValueError(f"widths must be a non-empty list of hidden widths, got {widths!r}.")
    widths = [check_int(f"widths[{k}]", w) for k, w in enumerate(widths)]
    init_scale = _check_pos("init_scale", init_scale)
    first = init_scale * _check_pos("first_layer_init_scale", first_layer_init_scale)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    if device is None and generator is not None:
        device = generator.device
    W1 = _uniform((widths[0], d), _weight_bound(d), generator, dtype, device) * first
    b1 = _uniform((widths[0],), 1.0 / math.sqrt(d), generator, dtype, device) * first
    weights = [W1]
    fan_in = widths[0]
    for m in widths[1:]:
        weights.append(_uniform((m, fan_in), _weight_bound(fan_in), generator, dtype, device))
        fan_in = m
    weights.append(_uniform((fan_in,), _weight_bound(fan_in), generator, dtype, device))
    weights[1:] = [W * init_scale for W in weights[1:]]
    return DeepReLUNet(weights, b1, activation=activation)
