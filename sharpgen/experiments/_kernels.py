"""The model kernels of an experiment, chosen once per `ExperimentSpec`.

The trainer needs five things from a model family: which parameters it trains, how to complete
the initial parameters, the batched loss and gradient, the outputs on test points and the
Hessian trace. `ClosedFormKernels` (the paper's two-layer ReLU nets, hand-derived and batched
over runs) and `AutogradKernels` (softplus and deep nets, ``torch.func.vmap`` over runs)
provide them with the same signatures, and `kernels_for` decides which one a spec uses, so the
trainer never branches on the model family. A family may also offer a fused batch-1 1-SAM
epoch (`Kernels.fused_sam1_epoch`); the trainer uses it when present.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sharpgen.experiments._batched import forward, loss_and_grad, trace_terms, trainable_names
from sharpgen.experiments._fused import Head, sam1_bn_epoch, sam1_rank_one_epoch
from sharpgen.experiments._generic import (
    generic_forward,
    generic_loss_and_grad,
    generic_trace_gn,
)
from sharpgen.experiments._spec import ExperimentSpec

__all__ = ["Kernels", "ClosedFormKernels", "AutogradKernels", "kernels_for"]

Params = dict[str, Tensor]
Epoch = Callable[[Params, Tensor, Tensor, Tensor, float, float], None]


class Kernels:
    """What the trainer needs from a model family (see the module docstring)."""

    def __init__(self, spec: ExperimentSpec) -> None:
        self.spec = spec

    def names(self, P: Params) -> tuple[str, ...]:
        """The trained parameters (gradients, norms and traces are taken over these)."""
        raise NotImplementedError

    def complete(self, p: Params) -> Params:
        """The initial parameters of one run, completed with any carried extras."""
        return p

    def loss_and_grad(self, P: Params, X: Tensor, Y: Tensor, idx: Tensor):
        """Mean loss ``(R,)`` over the examples ``idx: (R, B)`` and its gradient."""
        raise NotImplementedError

    def forward(self, P: Params, X_test: Tensor, X: Tensor) -> Tensor:
        """Outputs ``(R, T)`` on test points (``X`` is the training set, for Sim-BN)."""
        raise NotImplementedError

    def trace_terms(self, P: Params, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
        """Hessian trace of the training loss and its Gauss-Newton part, each ``(R,)``."""
        raise NotImplementedError

    def fused_sam1_epoch(self) -> Epoch | None:
        """A fused batch-1 1-SAM epoch ``(P, X, Y, idx (R, S), lr, rho)``, or None."""
        return None


class ClosedFormKernels(Kernels):
    """The paper's two-layer ReLU nets: closed-form batched gradients and traces."""

    def __init__(self, spec: ExperimentSpec, *, compile: bool = False) -> None:
        super().__init__(spec)
        self.kw = {"loss": spec.loss, "label_smoothing": spec.label_smoothing, "eps": spec.eps}
        self.compile = compile

    def names(self, P: Params) -> tuple[str, ...]:
        return trainable_names(self.spec.arch)

    def complete(self, p: Params) -> Params:
        spec, ref = self.spec, p["W1"]
        p.setdefault("b1", torch.zeros(spec.width, dtype=ref.dtype))
        p["gamma"] = torch.full((spec.width,), float(spec.gamma_init), dtype=ref.dtype)
        return p

    def loss_and_grad(self, P, X, Y, idx):
        return loss_and_grad(P, self.spec.arch, X, Y, idx, **self.kw)

    def forward(self, P, X_test, X):
        return forward(P, self.spec.arch, X_test, train_X=X, eps=self.spec.eps)

    def trace_terms(self, P, X, Y):
        return trace_terms(P, self.spec.arch, X, Y, **self.kw)

    def fused_sam1_epoch(self) -> Epoch | None:
        spec = self.spec
        if spec.method == "sgd" or spec.batch_size != 1:
            return None
        hd = Head(spec.arch, spec.loss, spec.label_smoothing, spec.eps)
        if spec.arch == "simplified_bn":
            if spec.method == "projected_sam1":
                return None

            def bn(P, X, Y, idx, lr, rho):
                sam1_bn_epoch(P, X, Y, idx[:, :, 0], hd=hd, lr=lr, rho=rho)

            return bn
        kw = {
            "radius": spec.projection_radius if spec.method == "projected_sam1" else None,
            "compile": self.compile,
        }

        def rank_one(P, X, Y, idx, lr, rho):
            sam1_rank_one_epoch(P, X, Y, idx[:, :, 0], hd=hd, lr=lr, rho=rho, **kw)

        return rank_one


class AutogradKernels(Kernels):
    """Softplus and deep nets: ``torch.func.vmap`` of the models' functional forms."""

    def names(self, P: Params) -> tuple[str, ...]:
        return tuple(P)

    def loss_and_grad(self, P, X, Y, idx):
        return generic_loss_and_grad(self.spec, P, X, Y, idx)

    def forward(self, P, X_test, X):
        return generic_forward(self.spec, P, X_test)

    def trace_terms(self, P, X, Y):
        gn = generic_trace_gn(self.spec, P, X, Y)
        # deep ReLU nets: f is linear in each layer, the diagonal of its Hessian vanishes
        trace = gn if self.spec.activation == "relu" else torch.full_like(gn, math.nan)
        return trace, gn


def kernels_for(spec: ExperimentSpec, *, compile: bool = False) -> Kernels:
    """The kernels of ``spec``: closed form for two-layer ReLU nets, autograd otherwise.

    ``compile=True`` runs the rank-one nets' fused 1-SAM step through `torch.compile`
    (`sharpgen.experiments._fused.compiled_example_grad`); it changes nothing elsewhere.
    """
    if spec.activation != "relu" or spec.depth > 2:
        return AutogradKernels(spec)
    return ClosedFormKernels(spec, compile=compile)
