r"""Functional curvature kernels: the products of ONE batch, as plain functions.

What each kernel computes (for one batch $b$ with loss $\ell_b(\theta)$, model outputs
$f_b(\theta)$, at the point $p$ of the selected parameters; $V$ holds $k$ tangent
directions as a dict name -> ``(k, *shape)``):

* `hessian_kernel` -- $\nabla^2_\theta \ell_b(p)\, V$, the Hessian-vector product.

  - ``backend="func"``: ``torch.func``. ``mode="rev"``: the vjp of ``torch.func.grad``
    (reverse-over-reverse; exact because the Hessian is symmetric). ``mode="fwd"``: the jvp
    of ``torch.func.grad`` (forward-over-reverse).
  - ``backend="autograd"``: double backward; the gradient graph
    (``create_graph=True``) is built once per batch and each column is one more backward,
    or a chunk of columns one batched backward (``is_grads_batched``) where a probe of the
    objective found that faster (`sharpgen.curvature._columns`).

* `ggn_kernel` -- $J_b^\top H_{\ell,b} J_b\, V$, the generalized Gauss-Newton product, with
  $J_b = \partial f_b / \partial \theta$ and $H_{\ell,b} = \nabla^2_f \ell(f_b, y_b)$.

  - ``backend="func"``: $J v$ by ``torch.func.jvp``, $H_\ell(Jv)$ by `second_order` on the
    loss of the outputs, $J^\top(\cdot)$ by the model's ``torch.func.vjp``.
  - ``backend="autograd"``: $Jv$ by the double-vjp trick, then reverse mode.

``kernel(objective, others, p, inputs, targets, backend=..., mode=..., keep=...)`` returns
``apply(V)``: a dict of ``(k, *shape)`` tensors (``vmap``) or a list of ``k`` per-column
dicts (double backward). What ``apply`` closes over (a gradient graph, a ``vjp``) is reused
for every later column and call: the graph cache of `sharpgen.curvature._products` (which
combines, weights and reduces the batches; ``keep=True``). `sharpgen.curvature._backend`
picks the backend and mode. A new curvature matrix is a small module with a kernel of this
signature and a `~sharpgen.curvature._base.CurvatureOperator` subclass (see ``_hessian.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from sharpgen.curvature._columns import Column, ColumnPlan, SavedBytes, column_plan, take_columns
from sharpgen.curvature._interface import BatchFunctions
from sharpgen.curvature._into import product_into
from sharpgen.curvature._model_loss import check_loss_of_outputs

__all__ = [
    "GGN",
    "HESSIAN",
    "FLAT_GRADIENT_BYTES",
    "ColumnProduct",
    "Kernel",
    "accumulate",
    "apply_block",
    "ggn_kernel",
    "hessian_kernel",
    "second_order",
    "zeros_block",
]

BatchProduct = Callable[[dict[str, Tensor]], Any]

#: Most bytes of selected parameters for which the Hessian's kept graph ends in the
#: concatenated gradient (`_flat_product`): that concatenation holds one more copy of the
#: gradient as long as the graph is kept; above it a flat vector is split into views.
FLAT_GRADIENT_BYTES = 1 << 26


class KernelFn(Protocol):
    """``kernel(objective, others, p, inputs, targets, *, backend, mode, keep) -> apply``."""

    def __call__(
        self,
        obj: BatchFunctions,
        others: dict[str, Tensor],
        p: dict[str, Tensor],
        inputs: Any,
        targets: Any,
        *,
        backend: str,
        mode: str,
        keep: bool,
    ) -> BatchProduct: ...


@dataclass(frozen=True)
class Kernel:
    """A named per-batch product: ``build`` is the kernel, ``what`` names it in errors.

    ``func_keeps``: whether the ``backend="func"`` ``apply`` may be kept between products
    (it must not call the model: a kept ``apply`` runs outside the objective's state).
    """

    name: str
    what: str
    build: KernelFn
    func_keeps: bool = True


# -- building blocks -----------------------------------------------------------------------
def second_order(f: Callable[[Any], Tensor], primal: Any, mode: str) -> Callable[[Any], Any]:
    """Return ``v -> Hessian(f)(primal) @ v`` (pytrees) by torch.func.

    ``mode="fwd"``: forward-over-reverse (``jvp`` of ``grad``). ``mode="rev"``:
    reverse-over-reverse (``vjp`` of ``grad``, valid because the Hessian is symmetric), for
    ops without a forward-mode formula of their backward.
    """
    grad_f = torch.func.grad(f)
    if mode == "fwd":
        return lambda v: torch.func.jvp(grad_f, (primal,), (v,))[1]
    vjp_fn = torch.func.vjp(grad_f, primal)[1]
    return lambda v: vjp_fn(v)[0]


def apply_block(
    one: Callable[[Any], dict[str, Tensor]], V: dict[str, Tensor], vectorize: bool
) -> Any:
    """Apply ``one`` to the ``k`` tangents of ``V`` (``vmap``, or a loop over columns).

    Returns a dict of ``(k, *shape)`` tensors (``vmap``) or a list of ``k`` per-column dicts
    (loop; it reuses whatever ``one`` closes over, such as a gradient graph).
    """
    k = next(iter(V.values())).shape[0]
    if k == 1 or not vectorize:
        return [one({n: t[j].contiguous() for n, t in V.items()}) for j in range(k)]
    return torch.func.vmap(one, randomness="same")(V)


def accumulate(acc: dict[str, Tensor], out: Any, w: float, first: bool) -> None:
    """``acc (+)= w * out`` for a dict of blocks or a list of per-column dicts.

    The per-column dicts are emptied as they are copied (the caller's ``out`` is spent).
    """

    def put(dst: Tensor, src: Tensor) -> None:
        if first and w == 1.0:
            dst.copy_(src)
        elif first:
            torch.mul(src, w, out=dst)
        else:
            dst.add_(src, alpha=w)

    if isinstance(out, list):  # each column's products freed once copied: on a CPU the
        for j, col in enumerate(out):  # buffer's pages are touched as the copies go
            for name, a in acc.items():
                put(a[j], col.pop(name))
    else:
        for name, a in acc.items():
            put(a, out[name])


def zeros_block(d: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Zeros of shape ``(k, *shape)`` for every entry of ``d``."""
    return {n: t.new_zeros((k, *t.shape)) for n, t in d.items()}


def _requiring_grad(p: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().requires_grad_(True) for n, t in p.items()}


def _live(grads: tuple[Tensor | None, ...]) -> list[tuple[int, Tensor]]:
    return [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]


class ColumnProduct:
    """``apply(V)`` by double backward: the ``k`` columns by loop or batched, by ``plan``.

    ``column`` takes the entries of the parameters with a live gradient (in the order of
    ``live``); without any, the product is zero. See `sharpgen.curvature._columns`.
    `single` is the product with one vector given as one tensor per parameter;
    ``flat``, where the kernel has one, the product with one flat vector as one flat
    tensor (both the lean path of `sharpgen.curvature._products.kept_matvec`).
    ``gradient`` is the batch gradient the graph was built from (detached, zeros for
    unused parameters), or None. ``into``, where the kernel has one, accumulates the
    product with one vector (one tensor per parameter) into a flat buffer of zeros, with
    no parameter-sized copy beside it (`hessian_kernel`).
    """

    def __init__(
        self,
        plan: ColumnPlan,
        p: dict[str, Tensor],
        live: list[tuple[int, Tensor]],
        column: Column,
        keep: bool,
        gradient: list[Tensor] | None = None,
        flat: Callable[[Tensor], Tensor] | None = None,
        into: Callable[[list[Tensor], Tensor], None] | None = None,
    ) -> None:
        self.plan, self.p, self.column, self.keep = plan, p, column, keep
        self.names = list(p)
        self.live = [i for i, _ in live]
        self.gradient = gradient
        self.flat = flat if live else None
        self.into = into if live else None
        #: what the forward pass saved before the build (a kept validation graph)
        self.forward_saved: SavedBytes | None = None
        #: bytes the kept graph holds beyond the model (0: not counted), see `account`
        self.graph_bytes = 0
        self._outputs = [g for _, g in live]
        self._releasable = False

    def account(self, counter: SavedBytes, saved: int) -> None:
        """Count the graph's bytes: ``saved`` by the build (forward included), the gradient's.

        ``counter`` is the build's `SavedBytes`: a gradient whose storage the graph did
        not save may have its values freed by `release_gradient` (the graph needs only
        its outputs' metadata).
        """
        grads = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes()
                 for g in self._outputs if not counter.saved(g)}  # fmt: skip
        self.graph_bytes = saved + sum(grads.values())
        every = len(grads) == len({g.untyped_storage().data_ptr() for g in self._outputs})
        self._releasable = bool(self._outputs) and self.flat is None and every

    def release_gradient(self) -> int:
        """Free the values of the gradient the graph ends in; the bytes freed (0: none).

        Products need only the graph (and its outputs' shapes); the gradient values were
        read already (`gradient`, now None). Only where `account` found none of them
        saved by the graph, and not for the flat path (its concatenation reads them).
        """
        if not self._releasable:
            return 0
        freed = 0
        for g in self._outputs:
            storage = g.untyped_storage()
            freed += storage.nbytes()
            storage.resize_(0)
        self._releasable, self.gradient = False, None
        self.graph_bytes -= freed
        return freed

    def __call__(self, V: dict[str, Tensor]) -> Any:
        k = next(iter(V.values())).shape[0]
        if not self.live:
            return zeros_block(self.p, k)
        names = self.names
        with torch.enable_grad():
            cols = take_columns(self.plan, [V[names[i]] for i in self.live], self.column,
                                self.keep)  # fmt: skip
        return [dict(zip(names, c, strict=True)) for c in cols]

    def single(self, v: list[Tensor]) -> list[Tensor] | None:
        """The product with one vector (``v``: one contiguous tensor per parameter, in order).

        Returns one tensor per parameter, or None for a zero product (no live gradient).
        The graph is kept (``retain_graph``), as for a kept ``apply``.
        """
        if not self.live:
            return None
        with torch.enable_grad():
            return self.column([v[i] for i in self.live], True, False)


def _grads(
    outputs: list[Tensor] | Tensor,
    inputs: list[Tensor],
    v: list[Tensor] | Tensor,
    batched: bool,
    *,
    retain: bool = True,
) -> list[Tensor]:
    """``torch.autograd.grad`` with zeros for unused inputs, per column or batched."""
    grads = torch.autograd.grad(outputs, inputs, v, retain_graph=retain, allow_unused=True,
                                is_grads_batched=batched)  # fmt: skip
    lead = (next(iter(v)) if isinstance(v, list) else v).shape[:1] if batched else ()
    return [
        g if g is not None else x.new_zeros((*lead, *x.shape))
        for g, x in zip(grads, inputs, strict=True)
    ]


# -- the Hessian -----------------------------------------------------------------------------
def hessian_kernel(
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
    r"""``apply(V)`` $= \nabla^2_\theta \ell_b(p)\, V$ on one batch (see the module note)."""
    if backend == "func":

        def f(q: dict[str, Tensor]) -> Tensor:
            return obj.batch_loss(q, inputs, targets, others=others)

        one = second_order(f, p, mode)
        return lambda V: apply_block(one, V, obj.vectorize)
    with torch.enable_grad():
        first = obj._take_first_graph(p, inputs)  # the validation's forward, if still valid
        if first is not None:
            preq, loss = first.params, first.loss
        else:
            preq = _requiring_grad(p)
            loss = obj.batch_loss(preq, inputs, targets, others=others)
        grads = torch.autograd.grad(loss, list(preq.values()), create_graph=True, allow_unused=True)
    live = _live(grads)
    params = list(preq.values())
    live_grads = [g for _, g in live]

    def column(v: list[Tensor], retain: bool, batched: bool) -> list[Tensor]:
        return _grads(live_grads, params, v, batched, retain=retain)

    # the gradient is a by-product of the graph (a detached view, no copy)
    gradient = [
        torch.zeros_like(t) if g is None else g.detach() for t, g in zip(params, grads, strict=True)
    ]
    nbytes = sum(t.numel() * t.element_size() for t in params)
    flat = _flat_product(grads, params) if nbytes <= FLAT_GRADIENT_BYTES else None
    into = product_into([g for _, g in live], [i for i, _ in live], params)
    out = ColumnProduct(column_plan(obj, "hvp"), p, live, column, keep, gradient, flat, into)
    out.forward_saved = first.saved if first is not None else None
    return out


def _flat_product(
    grads: tuple[Tensor | None, ...], params: list[Tensor]
) -> Callable[[Tensor], Tensor]:
    r"""$v \mapsto H v$ for flat vectors through the gradient graph, one backward per call.

    The gradient is concatenated once, with its graph (zeros for the parameters without a
    live gradient), so a flat $v$ is the backward's seed as it is: no split into
    per-parameter views and one shape check instead of one per parameter.
    """
    flat: list[Tensor] = []

    def apply(v: Tensor) -> Tensor:
        if not flat:
            with torch.enable_grad():
                parts = [g if g is not None and g.requires_grad else t.new_zeros(t.shape)
                         for g, t in zip(grads, params, strict=True)]  # fmt: skip
                flat.append(torch.cat([g.reshape(-1) for g in parts]))
        return torch.cat([g.reshape(-1) for g in _grads(flat[0], params, v, False)])

    return apply


# -- the generalized Gauss-Newton matrix -------------------------------------------------------
def ggn_kernel(
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
    r"""``apply(V)`` $= J_b^\top H_{\ell,b} J_b\, V$ on one batch (see the module note)."""
    if backend == "func":
        return _ggn_func(obj, others, p, inputs, targets, mode)
    return _ggn_autograd(obj, others, p, inputs, targets)


def _ggn_func(
    obj: BatchFunctions,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    inputs: Any,
    targets: Any,
    mode: str,
) -> BatchProduct:
    def out_fn(q: dict[str, Tensor]) -> Any:
        return obj._forward(others, q, inputs)

    def loss_of_out(o: Any) -> Tensor:
        return obj._apply_loss(o, targets)

    outputs, vjp_fn = torch.func.vjp(out_fn, p)[:2]
    check_loss_of_outputs(outputs, loss_of_out(outputs))
    h_loss = second_order(loss_of_out, outputs, mode)

    def one(v: dict[str, Tensor]) -> dict[str, Tensor]:
        jv = torch.func.jvp(out_fn, (p,), (v,))[1]
        return vjp_fn(h_loss(jv))[0]

    return lambda V: apply_block(one, V, obj.vectorize)


def _ggn_autograd(
    obj: BatchFunctions,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    inputs: Any,
    targets: Any,
) -> BatchProduct:
    with torch.enable_grad():
        preq = _requiring_grad(p)
        outputs = obj._forward(others, preq, inputs)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                "backend='autograd' for the GGN needs a model that returns one tensor, got "
                f"{type(outputs).__name__}; use backend='func'."
            )
        o = outputs.detach().requires_grad_(True)
        (gl,) = torch.autograd.grad(obj._apply_loss(o, targets), o, create_graph=True)
        live: list[tuple[int, Tensor]] = []
        if gl.requires_grad:  # else the loss is linear in the outputs: H_loss = 0
            u = torch.zeros_like(outputs, requires_grad=True)
            gu = torch.autograd.grad(outputs, list(preq.values()), u, create_graph=True,
                                     allow_unused=True)  # fmt: skip
            live = _live(gu)
    params = list(preq.values())
    live_grads = [g for _, g in live]

    def column(v: list[Tensor], retain: bool, batched: bool) -> list[Tensor]:
        (jv,) = _grads(live_grads, [u], v, batched)
        (hjv,) = _grads(gl, [o], jv, batched)
        return _grads(outputs, params, hjv, batched)

    return ColumnProduct(column_plan(obj, "ggn"), p, live, column, True)


HESSIAN = Kernel("hvp", "Hessian-vector product", hessian_kernel)
# the func GGN's apply runs the model's forward (torch.func.jvp) at every product
GGN = Kernel("ggn", "GGN-vector product", ggn_kernel, func_keeps=False)
