r"""The Hessian trace at an interpolating model, from per-example gradients (Lemma 4.1).

For the MSE loss without 1/2, $L(\theta) = \frac1n \sum_i (f_\theta(x_i) - y_i)^2$,

$$ \mathrm{Tr}\,\nabla^2 L(\theta) = \frac{2}{n} \sum_i \lVert \nabla_\theta f_\theta(x_i)
\rVert^2 + \frac{2}{n} \sum_i (f_\theta(x_i) - y_i)\, \mathrm{Tr}\,\nabla^2 f_\theta(x_i), $$

and the second sum vanishes at an interpolating model. The first sum (the Gauss-Newton
trace) is computed here exactly, with ``vmap`` of ``grad`` over the examples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from sharpgen.models import two_layer_forward

__all__ = ["interpolation_trace", "squared_gradient_norms", "two_layer_interpolation_trace"]


def _check_model_inputs(model: nn.Module, X: Tensor) -> dict[str, Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[0] == 0:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"X must be a tensor of shape (n, d) with n >= 1, got {shape}.")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True).")
    ref = next(iter(params.values()))
    if X.dtype != ref.dtype or X.device != ref.device:
        raise TypeError(
            f"X has dtype {X.dtype} on {X.device} but the model's parameters are {ref.dtype} on "
            f"{ref.device}; convert with X.to(...)."
        )
    return params


def squared_gradient_norms(model: nn.Module, X: Tensor) -> dict[str, Tensor]:
    r"""Per-example squared gradient norms $\lVert \nabla_{\theta_p} f(x_i) \rVert^2$ per parameter.

    ``model`` maps inputs ``(n, d)`` to outputs ``(n,)`` (or ``(n, 1)``); each example is
    evaluated alone as a batch of one, so a simplified-BatchNorm `TwoLayerNet` normalizes
    with its stored reference set. Gradients are taken with respect to the trainable
    parameters (``requires_grad=True``), with `torch.func`; the model is not modified.

    Args:
        model: A scalar-output network, e.g. a `sharpgen.models.TwoLayerNet`.
        X: Inputs ``(n, d)`` in the model's dtype and device.

    Returns:
        ``{name: tensor (n,)}`` for every trainable parameter.

    Raises:
        TypeError: If ``model`` is not a module or ``X``'s dtype/device differ from it.
        ValueError: If ``X`` is not a non-empty 2-D tensor.
        FloatingPointError: If a gradient is NaN or infinite.

    Examples:
        >>> import torch
        >>> from sharpgen.models import TwoLayerNet
        >>> net = TwoLayerNet("no_bias", torch.eye(2), torch.ones(2))
        >>> norms = squared_gradient_norms(net, torch.tensor([[3.0, -1.0]]))
        >>> {k: v.tolist() for k, v in norms.items()}
        {'W1': [10.0], 'W2': [9.0]}
    """
    params = _check_model_inputs(model, X)
    buffers = dict(model.named_buffers())

    def output(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (p, buffers), (x.unsqueeze(0),)).reshape(())

    grads = vmap(grad(output), in_dims=(None, 0))(params, X)
    norms = {k: g.reshape(g.shape[0], -1).square().sum(1) for k, g in grads.items()}
    for k, v in norms.items():
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError(f"non-finite gradient of the output for parameter {k!r}.")
    return norms


def interpolation_trace(model: nn.Module, X: Tensor) -> Tensor:
    r"""The loss-Hessian trace at interpolation, $\frac{2}{n} \sum_i \lVert \nabla f(x_i)\rVert^2$.

    Equal to $\mathrm{Tr}\,\nabla^2 L(\theta)$ of the MSE loss (no 1/2) whenever the model
    interpolates the training set ``X`` (Lemma 4.1); in general it is the Gauss-Newton
    part of that trace. Exact (no sampling), batched over examples with ``vmap``; see
    `squared_gradient_norms` for the conventions.

    Args:
        model: A scalar-output network.
        X: Training inputs ``(n, d)``.

    Returns:
        A 0-dim tensor in the model's dtype.

    Raises:
        TypeError: If ``model`` is not a module or ``X``'s dtype/device differ from it.
        ValueError: If ``X`` is not a non-empty 2-D tensor.
        FloatingPointError: If a gradient is NaN or infinite.

    Examples:
        >>> import torch
        >>> from sharpgen.data import full_cube
        >>> from sharpgen.models import flattest_generalizer
        >>> X = full_cube(3, dtype=torch.float64)
        >>> net = flattest_generalizer(3, "bias", dtype=torch.float64)
        >>> round(float(interpolation_trace(net, X)), 10)  # 4 * sqrt(d + 1)
        8.0
    """
    norms = squared_gradient_norms(model, X)
    return 2 * torch.stack(list(norms.values())).sum(0).mean()


def two_layer_interpolation_trace(
    params: Mapping[str, Tensor],
    X: Tensor,
    *,
    arch: str,
    activation: str = "relu",
    eps: float = 1e-3,
    reference: Tensor | None = None,
) -> Tensor:
    r"""`interpolation_trace` of a two-layer net given as plain tensors (pure, ``vmap``-able).

    Computes $\frac{2}{n} \sum_i \lVert \nabla_\theta f(x_i) \rVert^2$ over all entries of
    ``params`` for `sharpgen.models.two_layer_forward`. Being a pure function of
    ``params`` it can be ``vmap``-ed over the stacked parameters of many runs, e.g.
    ``vmap(lambda p: two_layer_interpolation_trace(p, X, arch="bias"))(stacked)``.
    No finiteness check is made (it would not be ``vmap``-able); check the result.

    Args:
        params: ``W1``, ``W2`` and, depending on ``arch``, ``b1``, ``gamma``.
        X: Training inputs ``(n, d)``.
        arch: The architecture (see `sharpgen.models.two_layer_forward`).
        activation: ``"relu"`` or ``"softplus"``.
        eps: Simplified-LayerNorm $\varepsilon$.
        reference: Simplified-BatchNorm reference set (normally ``X``).

    Returns:
        A 0-dim tensor.

    Examples:
        >>> import torch
        >>> from sharpgen.data import full_cube
        >>> from sharpgen.models import flattest_generalizer
        >>> net = flattest_generalizer(3, "simplified_ln", dtype=torch.float64)
        >>> params = {k: v.detach() for k, v in net.named_parameters()}
        >>> X = full_cube(3, dtype=torch.float64)
        >>> float(two_layer_interpolation_trace(params, X, arch="simplified_ln"))
        2.0
    """

    def output(p: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return two_layer_forward(
            p, x, arch=arch, activation=activation, eps=eps, reference=reference
        )

    grads = vmap(grad(output), in_dims=(None, 0))(dict(params), X)
    total = sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values())
    return 2 * total.mean()
