"""The autograd backend: ``torch.func.vmap`` over runs, for nets without a closed form.

Used for the softplus variant (the paper's Fig. 5) and the deep nets with bias in the first
layer only (Fig. 11): the per-run gradient is ``vmap(grad(loss))`` over the stacked
parameters, with the models' own pure functional forms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sharpgen.experiments._batched import loss_derivatives
from sharpgen.experiments._spec import ExperimentSpec

__all__ = ["generic_forward", "generic_loss_and_grad", "generic_trace_gn"]


def _single_forward(spec: ExperimentSpec):
    from sharpgen.models import deep_forward, two_layer_forward

    if spec.depth > 2:
        return lambda p, x: deep_forward(p, x, activation=spec.activation)
    return lambda p, x: two_layer_forward(
        p, x, arch=spec.arch, activation=spec.activation, eps=spec.eps
    )


def generic_forward(spec: ExperimentSpec, P: dict[str, Tensor], X: Tensor) -> Tensor:
    """Outputs ``(R, B)`` of every run on its own inputs ``X: (R, B, d)``."""
    return torch.func.vmap(_single_forward(spec))(P, X)


def generic_loss_and_grad(
    spec: ExperimentSpec, P: dict[str, Tensor], X: Tensor, Y: Tensor, idx: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss over ``idx: (R, B)`` of every run and its gradient, by ``vmap(grad)``."""
    fwd = _single_forward(spec)

    def loss(p, x, y, i):
        value, _, _ = loss_derivatives(fwd(p, x[i]), y[i], spec.loss, spec.label_smoothing)
        return value.mean()

    with torch.enable_grad():
        grads, value = torch.func.vmap(torch.func.grad_and_value(loss))(P, X, Y, idx)
    return value.detach(), {k: v.detach() for k, v in grads.items()}


def generic_trace_gn(spec: ExperimentSpec, P: dict[str, Tensor], X: Tensor, Y: Tensor) -> Tensor:
    r"""Gauss-Newton part of the trace, $\frac1n\sum_i \ell''(f_i)\lVert\nabla f(x_i)\rVert^2$.

    One run at a time, per-example gradients with ``vmap`` over the training points.
    """
    fwd = _single_forward(spec)
    out = []
    with torch.enable_grad():
        for r in range(X.shape[0]):
            p = {k: v[r] for k, v in P.items()}
            f = fwd(p, X[r])
            _, _, d2 = loss_derivatives(f.detach(), Y[r], spec.loss, spec.label_smoothing)
            grads = torch.func.vmap(torch.func.grad(fwd), in_dims=(None, 0))(p, X[r])
            sq = sum(g.flatten(1).square().sum(1) for g in grads.values())
            out.append((d2 * sq).mean().detach())
    return torch.stack(out)
