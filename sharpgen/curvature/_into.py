r"""A Hessian-vector product added into one flat buffer, each parameter's part as it comes.

A product $Hv$ through a kept gradient graph is one backward pass, $\partial (g^\top v) /
\partial \theta$, whose result for a parameter $\theta_i$ is the sum of its parts, one per
place of the double-backward graph that uses $\theta_i$. A parameter used in several
places (a weight used by the forward pass and again by the gradient's own backward pass;
on Hugging Face GPT-2 the token embedding, tied to the output layer, has four parts, each
of its size) has its parts summed by autograd before they reach the parameter, and that
sum is taken out of place: two parts and their sum, three tensors of the parameter's size,
are held at once beside the result (on a 4-layer GPT-2 of width 768, whose embedding is
57% of the parameters: 1.7 parameter-sized vectors, seen with ``torch.profiler`` in one
product's backward pass; on GPT-2 small, where it is 31%, three of them are 0.9 of one).

`product_into` adds every part into the result as soon as it is computed, and drops it:
a hook on each node of the graph whose output goes to a parameter (directly, or through
a chain of view nodes such as the transpose of a tied output layer, `VIEW_NODES`, applied
to the part first: a backward node is linear in its input, so the view of each part is
the part of the view of the sum) adds the part into the parameter's slice of the result
and passes nothing on. At most one part of a parameter is then held at a time. The
hooks act only during `product_into`'s own backward passes (other passes through the
same graph, e.g. a block product's ``torch.autograd.grad``, see the graph unchanged);
a part whose shape or dtype is not the parameter's (autograd would reshape or cast it)
is passed on unchanged, and autograd adds it into the same slice (the parameters'
``.grad`` are views of the result during the pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["VIEW_NODES", "product_into"]

#: Backward nodes of views, applied to each part on its way to the parameter.
VIEW_NODES = frozenset(
    {
        "TBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "AliasBackward0",
    }
)


class _Target:
    """The per-parameter slices of the result while a pass runs (None: hooks idle).

    Holds no graph node: the hooks that the graph's nodes own refer to it, and a
    reference back to a node would be a cycle through C++ that no collection frees.
    """

    def __init__(self) -> None:
        self.views: list[Tensor] | None = None


def _route(node: Any, leaves: dict[Any, int], memo: dict[Any, Any]) -> Any:
    """``(views, i)``: the view nodes from ``node`` to parameter ``i``'s accumulator, or None."""
    if node in leaves:
        return ((), leaves[node])
    if node in memo:
        return memo[node]
    memo[node] = None
    if node.name() in VIEW_NODES:
        edges = [f for f, _ in node.next_functions if f is not None]
        if len(edges) == 1:
            tail = _route(edges[0], leaves, memo)
            if tail is not None:
                memo[node] = ((node, *tail[0]), tail[1])
    return memo[node]


def _hook(target: _Target, routes: list[tuple[int, tuple[Any, ...], int]]) -> Callable[..., Any]:
    """The hook of one node: its parts for parameters (``(slot, views, i)``) into the result."""

    def hook(grad_inputs: tuple[Tensor | None, ...], _: Any) -> Any:
        views = target.views
        if views is None:
            return None
        new = list(grad_inputs)
        for slot, chain, i in routes:
            part = new[slot]
            if part is None:
                continue
            for view in chain:
                part = view(part)
                part = part[0] if isinstance(part, tuple) else part
            out = views[i]
            if part is None or part.shape != out.shape or part.dtype != out.dtype:
                continue  # autograd reshapes or casts it: left to it (it adds into .grad)
            with torch.no_grad():
                out.add_(part)
            new[slot] = None
            del part
        return tuple(new)

    return hook


def _register(outputs: list[Tensor], params: list[Tensor], target: _Target) -> int:
    """Hook every node of the graph of ``outputs`` that feeds a parameter; how many."""
    get_edge = torch.autograd.graph.get_gradient_edge
    leaves = {get_edge(t).node: i for i, t in enumerate(params)}
    memo: dict[Any, Any] = {}
    stack = [g.grad_fn for g in outputs if g.grad_fn is not None]
    seen: set[Any] = set()
    hooked = 0
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        routes = []
        for slot, (nxt, _) in enumerate(node.next_functions):
            if nxt is None:
                continue
            route = _route(nxt, leaves, memo)
            if route is not None:
                routes.append((slot, *route))
            if nxt not in leaves and nxt not in seen:
                stack.append(nxt)
        if routes:
            node.register_hook(_hook(target, routes))
            hooked += 1
    return hooked


def product_into(
    outputs: list[Tensor], seeds: list[int], params: list[Tensor]
) -> Callable[[list[Tensor], Tensor], None]:
    r"""``into(v, out)``: $H v$ added into the flat buffer ``out`` by one backward pass.

    Args:
        outputs: The gradient's entries that have a graph (the live ones).
        seeds: For each of them, the index of its entry of ``v``.
        params: The graph's leaves (the kernel's detached copies of the parameters, never
            the caller's), in the order of ``out``.

    Every part of a parameter's product is added into its slice of ``out`` as it is
    computed (see the module note); the leaves' ``.grad`` are views of ``out`` during the
    pass, for the parts left to autograd, and reset after it. The hooks are registered
    on the graph at the first call.
    """
    target = _Target()
    registered = [False]

    def into(v: list[Tensor], out: Tensor) -> None:
        views, offset = [], 0
        for t in params:
            views.append(out[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        if not registered[0]:
            _register(outputs, params, target)
            registered[0] = True
        for t, view in zip(params, views, strict=True):
            t.grad = view
        target.views = views
        try:
            with torch.enable_grad():
                torch.autograd.backward(outputs, [v[i] for i in seeds], inputs=params,
                                        retain_graph=True)  # fmt: skip
        finally:
            target.views = None
            for t in params:
                t.grad = None

    return into
