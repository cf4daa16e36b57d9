r"""Functional SAM: the SAM gradient of a functional loss, per example or per micro-batch.

`sam_gradient` computes, for a functional loss $L(w; B)$ (a mean over the batch $B$),

$$
\nabla_w^{\mathrm{SAM}} = \frac{1}{K} \sum_{k=1}^{K}
  \nabla L\bigl(w + \varepsilon_k;\ B_k\bigr), \qquad
\varepsilon_k = \varepsilon\bigl(\nabla L(w; B_k)\bigr),
$$

with $B_1, \dots, B_K$ the batch itself ($K = 1$, SAM), its chunks of size $m$ (m-SAM) or its
examples (1-SAM), and $\varepsilon(\cdot)$ the perturbation of `sam_perturbation`. The chunks
are processed together with `torch.func.vmap`, not a Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._validation import check_rho, check_tensor_dict, is_int
from sharpgen.sharpness import sam_perturbation
from sharpgen.sharpness._sam_kernel import check_eta, check_norm

__all__ = ["perturbed", "sam_gradient"]


def _leaves(tree: Any) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _leaves(item)]
    if isinstance(tree, Mapping):
        return [leaf for item in tree.values() for leaf in _leaves(item)]
    raise TypeError(
        "batch must be a Tensor or a (nested) tuple/list/dict of Tensors with a common leading "
        f"batch dimension, got a {type(tree).__name__} inside it."
    )


def _map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map(fn, item) for item in tree)
    return {k: _map(fn, v) for k, v in tree.items()}


def _check_finite(grads: Mapping[str, Tensor], where: str) -> None:
    bad = [k for k, g in grads.items() if not bool(torch.isfinite(g).all())]
    if bad:
        raise FloatingPointError(
            f"non-finite gradient {where} for {bad[:5]}; check the loss (NaN/Inf) or the data."
        )


def sam_gradient(
    loss_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    rho: float,
    *,
    per_example: bool = False,
    micro_batch: int | None = None,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    r"""The SAM gradient of a functional loss; per example (1-SAM) or per micro-batch (m-SAM).

    Without ``per_example``/``micro_batch``: $\nabla L(w + \varepsilon; B)$ with
    $\varepsilon$ from $\nabla L(w; B)$. With ``micro_batch=m`` the batch is cut into
    $K = |B|/m$ consecutive chunks, each perturbed by its own gradient, and the $K$ SAM
    gradients are averaged (m-SAM); ``per_example=True`` is ``micro_batch=1`` (1-SAM).
    The chunks are mapped with `torch.func.vmap`: ``loss_fn`` then receives a chunk that
    keeps its leading batch dimension (size ``m``, so size 1 per example), and must return
    the *mean* loss over what it receives (so that the average of the chunk gradients is the
    gradient of the batch mean). ``loss_fn`` must be vmap-compatible: no in-place updates of
    module buffers (use eval-mode BatchNorm or none), no dropout (randomness is an error under
    vmap), no ``.item()``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` (e.g. with
            `torch.func.functional_call`); differentiated with `torch.func.grad`.
        params: ``{name: Tensor}`` at which to evaluate (detached; not modified).
        batch: A Tensor or (nested) tuple/list/dict of Tensors sharing the leading dimension.
        rho: Radius $\rho \ge 0$.
        per_example: 1-SAM (each example perturbed by its own gradient).
        micro_batch: m-SAM chunk size ``m``; must divide the batch size.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: ASAM scaling $T_w = \operatorname{diag}(|w| + \eta)$.
        eta: $\eta \ge 0$.
        normalize: ``False`` for USAM.
        chunk_size: Passed to `torch.func.vmap` to bound memory (chunks processed at once).

    Returns:
        ``{name: gradient}`` (detached), the mean of the chunks' SAM gradients.

    Raises:
        ValueError: bad ``rho``/``eta``/``norm``; both ``per_example`` and ``micro_batch``;
            ``micro_batch`` that is not a positive divisor of the batch size; leaves with
            different leading dimensions.
        TypeError: ``loss_fn`` not callable, ``params`` not a dict of tensors, a bad batch.
        FloatingPointError: a non-finite gradient.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import sam_gradient
        >>> def loss_fn(p, batch):
        ...     x, y = batch
        ...     return ((x @ p["w"] - y) ** 2).mean()
        >>> x, y = torch.randn(8, 3), torch.randn(8)
        >>> g = sam_gradient(loss_fn, {"w": torch.zeros(3)}, (x, y), rho=0.05, per_example=True)
        >>> g["w"].shape
        torch.Size([3])

    References:
        Foret et al. (2021) (m-sharpness); Andriushchenko & Flammarion (2022) (1-SAM).
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    rho = check_rho(rho)
    norm = check_norm(norm)
    eta = check_eta(eta)
    if not normalize and norm != "l2":
        raise ValueError("normalize=False (unnormalized SAM) is only defined for norm='l2'.")
    if not isinstance(params, Mapping) or not all(isinstance(v, Tensor) for v in params.values()):
        raise TypeError("params must be a dict {name: Tensor}.")
    if not params:
        raise ValueError("params is empty; pass the parameters to differentiate.")
    leaves = _leaves(batch)
    if not leaves or any(leaf.dim() == 0 for leaf in leaves):
        raise ValueError("batch must contain tensors with a leading batch dimension.")
    size = leaves[0].shape[0]
    if any(leaf.shape[0] != size for leaf in leaves):
        raise ValueError(
            f"the tensors in batch have different leading (batch) dimensions "
            f"{[leaf.shape[0] for leaf in leaves]}."
        )
    if per_example and micro_batch is not None:
        raise ValueError(
            f"per_example=True and micro_batch={micro_batch!r} are exclusive (per_example is "
            "micro_batch=1); pass one of them."
        )
    m = 1 if per_example else micro_batch
    if m is not None:
        if not is_int(m) or m < 1:
            raise ValueError(f"micro_batch must be a positive int, got {m!r}.")
        if m > size or size % m:
            raise ValueError(
                f"micro_batch={m} must divide the batch size {size} (and not exceed it); use a "
                f"divisor such as {[d for d in range(1, size + 1) if size % d == 0][-2:]}."
            )
    w = {k: v.detach() for k, v in params.items()}
    grad_fn = torch.func.grad(loss_fn)
    options: dict[str, Any] = {
        "norm": norm,
        "adaptive": adaptive,
        "eta": eta,
        "normalize": normalize,
    }

    if m is None:
        g = grad_fn(w, batch)
        eps = sam_perturbation(g, w, rho, **options)
        out = grad_fn({k: w[k] + eps[k] for k in w}, batch)
        _check_finite(out, "at w + eps")
        return {k: v.detach() for k, v in out.items()}

    def one(chunk: Any) -> dict[str, Tensor]:
        g = grad_fn(w, chunk)
        eps = sam_perturbation(g, w, rho, check_finite=False, **options)
        return grad_fn({k: w[k] + eps[k] for k in w}, chunk)

    chunks = _map(lambda x: x.reshape(size // m, m, *x.shape[1:]), batch)
    per_chunk = torch.func.vmap(one, chunk_size=chunk_size)(chunks)
    _check_finite(per_chunk, "in a chunk")
    return {k: v.mean(dim=0).detach() for k, v in per_chunk.items()}


@contextmanager
def perturbed(model: nn.Module, eps: Mapping[str, Tensor | None]) -> Iterator[nn.Module]:
    """Add ``eps`` to the model's named parameters inside the block; restore them exactly.

    On exit (also on an exception) every modified parameter is copied back from a copy saved
    on entry, bit for bit (no add-then-subtract drift). Parameters missing from ``eps`` (or
    mapped to ``None``) are untouched; ``.grad``, ``requires_grad``, buffers and training flags
    are not changed.

    Args:
        model: The model.
        eps: ``{parameter name: perturbation}`` (names of ``model.named_parameters()``).

    Yields:
        The model, with perturbed parameters.

    Raises:
        ValueError: an unknown parameter name or a shape mismatch (before anything changes).
        TypeError: ``model`` not a module or ``eps`` not a dict.
        FloatingPointError: a non-finite perturbation.

    Examples:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> before = lin.weight.detach().clone()
        >>> with perturbed(lin, {"weight": torch.ones(1, 2)}):
        ...     torch.equal(lin.weight, before + 1)
        True
        >>> torch.equal(lin.weight, before)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    named = dict(model.named_parameters())
    hint = f"valid names are those of model.named_parameters(), e.g. {list(named)[:5]}."
    given = check_tensor_dict(
        "eps", eps, named, what="parameters of the model", hint=hint, finite=True
    )
    targets = [(named[k], e) for k, e in given.items()]
    saved = [p.detach().clone() for p, _ in targets]
    try:
        with torch.no_grad():
            for p, e in targets:
                p.add_(e.to(device=p.device, dtype=p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for (p, _), copy in zip(targets, saved, strict=True):
                p.copy_(copy)
