"""Detect operations whose second derivative autograd would silently drop (private).

Curvature products differentiate the gradient graph once more. An operation whose backward is
not itself differentiable contributes nothing to that second derivative, without an error:

* a custom `torch.autograd.Function` whose ``backward`` is decorated with
  `torch.autograd.function.once_differentiable` (its backward runs under ``no_grad``; the
  double-backward graph through it is cut), and
* a custom ``Function`` whose backward returns tensors detached from the graph (computed with
  NumPy, ``.detach()``, ...), although the gradients flowing into it depend on the parameters.

The Hessian (and the autograd GGN) of such a model is wrong, often several times too small. The
check walks the autograd graph of the loss on the first batch (which `ModelObjective` builds
anyway to validate the data): built-in operators are trusted (a missing double backward raises
in torch), a custom Function marked ``once_differentiable`` is flagged from its code, and only
when other custom Functions are present one gradient pass with ``create_graph=True`` on the
first batch checks what their backward returns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from sharpgen.curvature._no_second import BuiltinOp

__all__ = [
    "VALID_SECOND_ORDER",
    "SecondDerivativeWarning",
    "check_second_order",
    "first_order_functions",
]

VALID_SECOND_ORDER = ("raise", "warn", "ignore")


class SecondDerivativeWarning(RuntimeWarning):
    """A curvature product goes through an operation without a second derivative."""


def _once_code() -> Any:
    def backward(ctx: Any, *grads: Any) -> Any:
        return grads

    return once_differentiable(backward).__code__


_ONCE_CODE = _once_code()


def _custom_nodes(loss: Tensor) -> list[Any]:
    """The nodes of ``loss``'s graph that run a Python `torch.autograd.Function` backward."""
    seen: set[int] = set()
    stack = [loss.grad_fn]
    out = []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "_forward_cls"):
            out.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return out


def _is_once_differentiable(node: Any) -> bool:
    backward = getattr(node._forward_cls, "backward", None)
    return getattr(backward, "__code__", None) is _ONCE_CODE


def first_order_functions(loss: Tensor, params: Sequence[Tensor]) -> list[str]:
    """Names of the custom Functions in ``loss``'s graph whose backward is not differentiable.

    Args:
        loss: A scalar loss computed with ``params`` requiring grad.
        params: The tensors the curvature is taken with respect to.

    Returns:
        The class names (sorted, unique) of the offending ``autograd.Function``s; empty when
        every operation has a second derivative.
    """
    nodes = _custom_nodes(loss)
    bad = {n._forward_cls.__name__ for n in nodes if _is_once_differentiable(n)}
    others = [n for n in nodes if not _is_once_differentiable(n)]
    if others:
        bad.update(_detached_backwards(loss, params, others))
    return sorted(bad)


def _detached_backwards(loss: Tensor, params: Sequence[Tensor], nodes: list[Any]) -> set[str]:
    """Run one ``create_graph`` gradient pass; flag Functions that return detached gradients."""
    flagged: set[str] = set()

    def hook_for(node: Any) -> Callable[[Any, Any], None]:
        def hook(grad_inputs: Any, grad_outputs: Any) -> None:
            incoming = any(isinstance(g, Tensor) and g.requires_grad for g in grad_outputs)
            outgoing = any(isinstance(g, Tensor) and g.requires_grad for g in grad_inputs)
            if incoming and not outgoing:
                flagged.add(node._forward_cls.__name__)

        return hook

    handles = [n.register_hook(hook_for(n)) for n in nodes]
    try:
        with torch.enable_grad():
            torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return flagged


def check_second_order(names: Sequence[str], policy: str, where: str) -> bool:
    """Act on the result of `first_order_functions` according to ``policy``.

    Returns:
        Whether the curvature products are exact (no offending Function, or none found).

    Raises:
        ValueError: ``policy == "raise"`` and ``names`` holds a custom Function (the
            built-in operations, `BuiltinOp`, are left to the kernel routing of
            `sharpgen.curvature._ggn_reverse.route_kernel`).
    """
    # the built-in operations are `route_kernel`'s (`sharpgen.curvature._ggn_reverse`)
    names = [n for n in names if not isinstance(n, BuiltinOp)]
    if not names:
        return True
    listed = ", ".join(names)
    message = (
        f"{where}: the model's loss goes through custom autograd.Function(s) {listed} whose "
        "backward is not differentiable (marked @once_differentiable, or returning tensors "
        "detached from the graph), so autograd silently drops their second derivative and every "
        "Hessian (or GGN) product would be wrong. Fix: write the backward with differentiable "
        "torch operations and remove @once_differentiable (or implement the Function's "
        "double backward), or replace the Function by plain torch code."
    )
    if policy == "raise":
        raise ValueError(
            message + " To compute anyway, pass second_order='warn' (to the measure, or where "
            "the ModelObjective or operator is built); the objective is then marked "
            "exact_second_order=False."
        )
    if policy == "warn":
        warnings.warn(message, SecondDerivativeWarning, stacklevel=4)
    return False


def check_policy(policy: object) -> str:
    """Validate the ``second_order`` argument."""
    if policy not in VALID_SECOND_ORDER:
        raise ValueError(
            f"second_order must be one of {VALID_SECOND_ORDER} ('raise': error when an operation "
            "has no second derivative; 'warn': warn and mark the products inexact; 'ignore': "
            f"no check), got {policy!r}."
        )
    return str(policy)
