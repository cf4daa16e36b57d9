r"""Per-sample gradient quantities of the empirical Fisher, with a plain-autograd fallback.

Two quantities of one chunk of samples: $\sum_i \|\nabla\ell_i\|^2$ (`sq_grad_norms`, the
empirical Fisher trace) and $\langle\theta, \nabla\ell_i\rangle$ per sample
(`theta_grad_dots`, the empirical Fisher-Rao norm). Both are computed with ``torch.func``
(``vmap`` of ``grad``, ``jvp``); when ``torch.func`` cannot trace the model (a classic
``forward(ctx, ...)`` ``autograd.Function``, data-dependent control flow, ...) they are
computed one sample at a time with ``torch.autograd.grad``, with the same `RuntimeWarning`
and the same rule as the curvature products (`sharpgen.curvature._backend`): the
objective's ``backend`` (``"auto"`` tries ``torch.func`` first, ``"func"`` only it,
``"autograd"`` only the loop).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from sharpgen.curvature import ModelObjective
from sharpgen.curvature._backend import run_with_fallback
from sharpgen.curvature._data import num_samples

__all__ = ["in_dims", "one", "sq_grad_norms", "take", "theta_grad_dots"]


def in_dims(tree: Any) -> Any:
    """``vmap``'s ``in_dims`` of a batch: 0 for every tensor."""
    return tree_map(lambda t: 0 if isinstance(t, Tensor) else None, tree)


def one(tree: Any) -> Any:
    """One sample as a batch of one (a leading dimension added)."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, tree)


def take(tree: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch."""
    return tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) else t, tree)


def _per_sample_grads(
    obj: ModelObjective, p: dict[str, Tensor], xs: Any, ys: Any, others: Any, backend: str
) -> list[dict[str, Tensor]] | dict[str, Tensor]:
    """Per-sample gradients: ``vmap`` (a dict of ``(n, *shape)``) or a loop (a list)."""
    if backend == "func":

        def sample_loss(q: dict[str, Tensor], x: Any, y: Any) -> Tensor:
            return obj.batch_loss(q, one(x), one(y), others=others)

        grad = torch.func.vmap(
            torch.func.grad(sample_loss), in_dims=(None, in_dims(xs), in_dims(ys))
        )
        return {n: g.detach() for n, g in grad(p, xs, ys).items()}
    out = []
    with torch.enable_grad():
        q = {n: t.detach().requires_grad_(True) for n, t in p.items()}
        for i in range(num_samples(xs)):
            loss = obj.batch_loss(q, take(xs, i, i + 1), take(ys, i, i + 1), others=others)
            grads = torch.autograd.grad(loss, list(q.values()), allow_unused=True)
            out.append({n: torch.zeros_like(t) if g is None else g.detach()
                        for (n, t), g in zip(q.items(), grads, strict=True)})  # fmt: skip
    return out


def _run(obj: ModelObjective, fn: Any, owner: str) -> Tensor:
    backend = obj.backend if obj.backend in ("func", "autograd") else "auto"
    out, _, _ = run_with_fallback(lambda b, _m: fn(b), backend, "rev", owner=owner)
    return out


def sq_grad_norms(
    obj: ModelObjective, p: dict[str, Tensor], xs: Any, ys: Any, others: Any, owner: str
) -> Tensor:
    r"""$\sum_i \|\nabla_\theta \ell_i\|^2$ over the samples of ``xs`` (a 0-d tensor)."""

    def fn(backend: str) -> Tensor:
        per = _per_sample_grads(obj, p, xs, ys, others, backend)
        grads = per if isinstance(per, list) else [per]
        total = torch.zeros((), dtype=obj.accum_dtype, device=obj.device)
        for g in grads:
            total = total + sum((v.to(total.dtype) ** 2).sum() for v in g.values())
        return total

    return _run(obj, fn, owner)


def theta_grad_dots(
    obj: ModelObjective, p: dict[str, Tensor], xs: Any, ys: Any, others: Any, owner: str
) -> Tensor:
    r"""$\langle\theta, \nabla_\theta \ell_i\rangle$ for each sample of ``xs``, shape ``(n,)``."""

    def fn(backend: str) -> Tensor:
        if backend == "func":

            def losses(q: dict[str, Tensor]) -> Tensor:
                def single(x: Any, y: Any) -> Tensor:
                    return obj.batch_loss(q, one(x), one(y), others=others)

                return torch.func.vmap(single, in_dims=(in_dims(xs), in_dims(ys)))(xs, ys)

            return torch.func.jvp(losses, (p,), (p,))[1].detach()
        per = _per_sample_grads(obj, p, xs, ys, others, backend)
        assert isinstance(per, list)
        dots = [sum((g[n] * t).sum() for n, t in p.items()) for g in per]
        return torch.stack([torch.as_tensor(d, dtype=obj.dtype, device=obj.device) for d in dots])

    return _run(obj, fn, owner)
