r"""The GGN through operations without a second derivative: reverse mode only.

The generalized Gauss-Newton matrix $G_b = J_b^\top H_{\ell,b} J_b$ needs only the model's
first derivatives $J_b = \partial f_b / \partial \theta$ and the loss's second derivative in
the outputs $H_{\ell,b} = \nabla^2_f \ell(f_b, y_b)$. The usual GGN kernel
(`sharpgen.curvature._kernels.ggn_kernel`) takes $J v$ by forward mode or by the double-vjp
trick, and both fail through an operation whose backward torch cannot differentiate and that
has no forward-mode derivative (``nn.EmbeddingBag``; see `sharpgen.curvature._no_second`).
Reverse mode alone still works there: `ggn_reverse_kernel` builds, per batch,

* $J_b$ densely, one row per output entry: $e_i^\top J_b$ is one ``torch.autograd.grad``
  through the model's graph with the one-hot cotangent $e_i$;
* $H_{\ell,b}$ densely, one row per output entry, by double backward of the loss in the
  outputs only (the loss must be twice differentiable there; the model need not be),

and applies $G_b V = ((V J_b^\top) H_{\ell,b}^\top) J_b$ to a block of $k$ vectors with
three matrix products. `route_kernel` sends the GGN products of a `ModelObjective` here
when the first batch's scan found such an operation inside the model, and keeps the
Hessian's error for every other product.

**Cost.** Per batch with $m$ output entries and $n$ selected parameters: one forward, $m$
backward passes through the model and $m$ through the loss's gradient (built once; kept
with the graph cache, so later products are matrix products only), and $m n + m^2$ numbers
held for $J_b$ and $H_{\ell,b}$. Outputs above `MAX_REVERSE_OUTPUTS` entries per batch, or
a Jacobian above `MAX_REVERSE_JACOBIAN_BYTES`, are refused with a `ValueError` naming the
size and the fix (smaller batches, or the operation's twice-differentiable replacement).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sharpgen.curvature._interface import BatchFunctions, Objective
from sharpgen.curvature._kernels import GGN, BatchProduct, Kernel, _grads
from sharpgen.curvature._model_loss import check_loss_of_outputs
from sharpgen.curvature._no_second import BuiltinOp, builtin_message

__all__ = [
    "GGN_REVERSE",
    "MAX_REVERSE_JACOBIAN_BYTES",
    "MAX_REVERSE_OUTPUTS",
    "ggn_reverse_kernel",
    "route_kernel",
]

#: Most output entries per batch for the reverse-mode GGN (one backward pass each).
MAX_REVERSE_OUTPUTS = 4096
#: Most bytes of one batch's dense output Jacobian $J_b$ for the reverse-mode GGN.
MAX_REVERSE_JACOBIAN_BYTES = 1 << 30


def _too_large(what: str) -> ValueError:
    return ValueError(
        f"the GGN through an operation without a second derivative is computed by reverse "
        f"mode alone, one backward pass per output entry of a batch, holding the batch's "
        f"dense output Jacobian; {what}. Fix: pass smaller batches (the data as a DataLoader "
        "with a smaller batch_size, or the objective's batch_size), select fewer parameters "
        "(params=...), or replace the operation by its twice-differentiable equivalent (see "
        "the Hessian's error for it) so that the usual GGN kernel runs."
    )


def ggn_reverse_kernel(
    obj: BatchFunctions,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    inputs: Any,
    targets: Any,
    *,
    backend: str,
    mode: str,
    keep: bool,
) -> BatchProduct:
    r"""``apply(V)`` $= J_b^\top H_{\ell,b} J_b\, V$ on one batch by reverse mode only.

    ``backend`` and ``mode`` are ignored (there is one route). Cost: one forward, $m$
    backward passes through the model and $m$ through the loss's gradient for a batch with
    $m$ output entries (see the module note); ``apply`` itself is three matrix products.

    Raises:
        TypeError: The model returns more than one tensor.
        ValueError: More than `MAX_REVERSE_OUTPUTS` output entries, or a Jacobian above
            `MAX_REVERSE_JACOBIAN_BYTES`.
    """
    names = list(p)
    m = 0
    with torch.enable_grad():
        preq = {n: t.detach().requires_grad_(True) for n, t in p.items()}
        params = list(preq.values())
        outputs = obj._forward(others, preq, inputs)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                "the GGN through an operation without a second derivative needs a model that "
                f"returns one tensor, got {type(outputs).__name__}; replace the operation by "
                "its twice-differentiable equivalent (see the Hessian's error for it)."
            )
        m, n = outputs.numel(), sum(t.numel() for t in params)
        if m > MAX_REVERSE_OUTPUTS:
            raise _too_large(f"a batch gives {m} output entries, above {MAX_REVERSE_OUTPUTS}")
        nbytes = m * n * outputs.element_size()
        if nbytes > MAX_REVERSE_JACOBIAN_BYTES:
            raise _too_large(
                f"a batch's Jacobian ({m} outputs x {n} parameters) takes {nbytes} bytes, above "
                f"{MAX_REVERSE_JACOBIAN_BYTES}"
            )
        o = outputs.detach().requires_grad_(True)
        loss = obj._apply_loss(o, targets)
        check_loss_of_outputs(o, loss)
        (gl,) = torch.autograd.grad(loss, o, create_graph=True)
        eye = torch.eye(m, dtype=outputs.dtype, device=outputs.device)
        jac = outputs.new_empty((m, n))
        hess = outputs.new_zeros((m, m))
        for i in range(m):
            seed = eye[i].view_as(outputs)
            row = _grads(outputs, params, seed, False, retain=i < m - 1)
            jac[i] = torch.cat([g.reshape(-1) for g in row])
            if gl.requires_grad:  # else the loss is linear in the outputs: H_loss = 0
                (h,) = _grads(gl, [o], seed, False)
                hess[i] = h.reshape(-1)
    del outputs, gl, loss
    sizes = [t.numel() for t in params]
    shapes = [t.shape for t in params]

    def apply(V: dict[str, Tensor]) -> dict[str, Tensor]:
        k = next(iter(V.values())).shape[0]
        flat = torch.cat([V[name].reshape(k, -1) for name in names], dim=1)
        out = ((flat @ jac.T) @ hess.T) @ jac
        return {
            name: piece.reshape(k, *shape)
            for name, piece, shape in zip(names, out.split(sizes, dim=1), shapes, strict=True)
        }

    return apply


GGN_REVERSE = Kernel("ggn_rev", "GGN-vector product (reverse mode)", ggn_reverse_kernel)


def _in_model(ops: list[BuiltinOp]) -> bool:
    return all(not o.place.startswith("loss_fn") for o in ops)


def route_kernel(obj: Objective, kernel: Kernel, where: str) -> Kernel:
    """The kernel that computes ``kernel``'s products on ``obj``, or the builtin-op error.

    Without a built-in operation lacking a second derivative (`sharpgen.curvature._no_second`)
    this is ``kernel``. With one inside the model, GGN products go to `GGN_REVERSE`; every
    other product, and the GGN when the operation is in ``loss_fn``, raises.

    Raises:
        ValueError: The products cannot run through the operations found.
    """
    ops = [o for o in obj._first_order if isinstance(o, BuiltinOp)]
    if not ops:
        return kernel
    if kernel.name == GGN.name and _in_model(ops):
        return GGN_REVERSE
    raise ValueError(builtin_message(ops, where, ggn_works=_in_model(ops)))
