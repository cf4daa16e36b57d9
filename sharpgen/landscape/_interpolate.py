r"""Linear interpolation between two models (Goodfellow et al. 2015), BatchNorm made explicit."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._validation import check_choice
from sharpgen.curvature import ModelObjective
from sharpgen.curvature._data import as_batches
from sharpgen.landscape._args import (
    check_grid_options,
    check_num_points,
    check_span,
    loss_callable,
)
from sharpgen.landscape._grid import DEFAULT_MEMORY, evaluate_points, points_per_chunk
from sharpgen.landscape._results import Landscape1D
from sharpgen.sharpness._common import progress_bar

__all__ = ["BN_STATS", "linear_interpolation"]

BN_STATS = ("interpolate", "recompute", "batch")


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]  # fmt: skip


def _check_pair(a: nn.Module, b: nn.Module) -> None:
    for kind, ta, tb in (
        ("parameters", dict(a.named_parameters()), dict(b.named_parameters())),
        ("buffers", dict(a.named_buffers()), dict(b.named_buffers())),
    ):
        if list(ta) != list(tb):
            raise ValueError(
                f"model_a and model_b must have the same {kind}; model_a has {list(ta)[:5]}..., "
                f"model_b {list(tb)[:5]}... (interpolate between two copies of one architecture)."
            )
        for n in ta:
            if ta[n].shape != tb[n].shape:
                raise ValueError(
                    f"{kind[:-1]} {n!r} has shape {tuple(ta[n].shape)} in model_a and "
                    f"{tuple(tb[n].shape)} in model_b."
                )


def linear_interpolation(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    data: Any,
    *,
    num_points: int = 25,
    span: tuple[float, float] = (0.0, 1.0),
    bn_stats: str | None = None,
    metric: Callable[[Any, Any], Tensor] | None = None,
    chunk_size: int | None = None,
    memory: int = DEFAULT_MEMORY,
    progress: bool = False,
    reduction: str = "mean",
) -> Landscape1D:
    r"""The loss on the segment $\theta(\alpha) = (1-\alpha)\,\theta_A + \alpha\,\theta_B$.

    Goodfellow, Vinyals & Saxe (2015) looked at this path between an initialization and a
    trained model (or between two trained models: a barrier on it means the two minima are
    not linearly mode-connected). ``span`` beyond ``(0, 1)`` extrapolates.

    **BatchNorm.** The running statistics of $A$ and $B$ belong to their own weights, so
    the statistics at $\theta(\alpha)$ are a choice, and for a model with BatchNorm layers
    it must be made explicitly with ``bn_stats``:

    * ``"interpolate"``: interpolate the running buffers like the weights (what writing the
      interpolated ``state_dict`` into a model does; may show a spurious barrier);
    * ``"recompute"``: re-estimate them at every $\alpha$ by a forward pass over ``data`` in
      training mode with cumulative averaging (``momentum=None``), on a private copy of
      $A$ (the "reset BN statistics" of Frankle et al. 2020 and Jordan et al. 2023); one
      extra pass over the data per point, evaluated point by point;
    * ``"batch"``: normalize with the statistics of each batch of ``data``.

    Without BatchNorm running statistics ``bn_stats`` is ignored. Both models are left
    exactly as they were; the points are evaluated with ``torch.func.vmap`` in chunks
    (except ``"recompute"``), both models in evaluation mode otherwise.

    Args:
        model_a: The model at $\alpha = 0$.
        model_b: The model at $\alpha = 1$ (same parameter and buffer names and shapes).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar; None: the loss the model
            returns (`sharpgen.model_loss`, a Hugging Face model with the labels in the batch).
        data: One batch or an iterable of batches.
        num_points: Grid points ($\ge 2$).
        span: ``(low, high)`` of $\alpha$.
        bn_stats: ``"interpolate"``, ``"recompute"`` or ``"batch"``; required when the
            models have BatchNorm running statistics.
        metric: Optional ``metric(outputs, targets)`` evaluated from the same passes.
        chunk_size: Points per vectorized forward pass.
        memory: Byte budget of one chunk when ``chunk_size`` is None.
        progress: A tqdm bar.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        A `Landscape1D` with ``coords`` the values of $\alpha$, ``direction="interpolation"``
        and ``bn_stats`` the policy used (None without BatchNorm).

    Raises:
        ValueError: Models of different architectures; BatchNorm without ``bn_stats``.

    Examples:
        >>> import torch
        >>> a = torch.nn.Linear(1, 1, bias=False).double()
        >>> b = torch.nn.Linear(1, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = a.weight.fill_(-1.0), b.weight.fill_(1.0)
        >>> x = torch.ones(1, 1, dtype=torch.float64)
        >>> path = linear_interpolation(a, b, torch.nn.functional.mse_loss, (x, x), num_points=3)
        >>> path.loss.tolist()  # (w - 1)^2 at w = -1, 0, 1
        [4.0, 1.0, 0.0]

    References:
        I. J. Goodfellow, O. Vinyals, A. M. Saxe, "Qualitatively characterizing neural
        network optimization problems", ICLR 2015. J. Frankle, G. K. Dziugaite, D. M. Roy,
        M. Carbin, "Linear mode connectivity and the lottery ticket hypothesis", ICML 2020.
        K. Jordan, H. Sedghi, O. Saukh, R. Entezari, B. Neyshabur, "REPAIR:
        Renormalizing permuted activations for interpolation repair", ICLR 2023.
    """
    for name, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}.")
    _check_pair(model_a, model_b)
    loss_fn = loss_callable(loss_fn)
    lo, hi = check_span("span", span)
    (num_points,) = check_num_points(num_points)
    chunk, memory = check_grid_options(metric=metric, chunk_size=chunk_size, memory=memory,
                                       progress=progress, reduction=reduction)  # fmt: skip
    has_bn = bool(_batchnorms(model_a))
    if has_bn and bn_stats is None:
        raise ValueError(
            "the models have BatchNorm running statistics, which belong to each endpoint's "
            "weights; choose how to treat them along the path: bn_stats='interpolate' "
            "(interpolate the buffers too), 'recompute' (re-estimate them on data at every "
            "point) or 'batch' (use batch statistics)."
        )
    if bn_stats is not None:
        check_choice("bn_stats", bn_stats, BN_STATS)
    used = bn_stats if has_bn else None
    alphas = torch.linspace(lo, hi, num_points, dtype=torch.float64)
    names = [n for n, _ in model_a.named_parameters()]
    pb: dict[str, Tensor] = dict(model_b.named_parameters())
    if used == "recompute":
        loss, met = _recompute(model_a, pb, loss_fn, data, alphas, metric, progress, reduction)
    else:
        bn = "batch" if used == "batch" else "eval"
        obj = ModelObjective(model_a, loss_fn, data, names, bn=bn, reduction=reduction,
                             process_group=None)  # fmt: skip
        direction = {n: pb[n].detach().to(obj.dtype) - obj.params[n] for n in names}
        buffers = None
        if used == "interpolate":
            ba, bb = dict(model_a.named_buffers()), dict(model_b.named_buffers())
            buffers = {
                n: (t.detach(), bb[n].detach() - t.detach())
                for n, t in ba.items() if t.is_floating_point()
            }  # fmt: skip
        loss, met = evaluate_points(obj, [direction], alphas[:, None], metric=metric,
                                    chunk_size=chunk, max_chunk=points_per_chunk(obj, memory),
                                    progress=progress,
                                    desc="linear_interpolation", buffers=buffers)  # fmt: skip
    center = float(loss[0]) if lo == 0.0 else float("nan")
    return Landscape1D(coords=alphas, loss=loss, metric=met, center_loss=center,
                       direction="interpolation", normalization="none",
                       num_loss_evals=num_points, bn_stats=used)  # fmt: skip


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _recompute(
    model_a: nn.Module,
    pb: dict[str, Tensor],
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    alphas: Tensor,
    metric: Callable[[Any, Any], Tensor] | None,
    progress: bool,
    reduction: str,
) -> tuple[Tensor, Tensor | None]:
    """Point by point on a private copy: set weights, re-estimate BN statistics, evaluate.

    ``data`` is visited twice per point: a one-shot iterator is collected once, up front
    (`sharpgen.curvature.as_batches`, with its warning), like every objective does.
    """
    data = as_batches(data)
    work = copy.deepcopy(model_a)
    pa = {n: p.detach().clone() for n, p in model_a.named_parameters()}
    losses, metrics = [], []
    bns = _batchnorms(work)
    with progress_bar(progress, total=alphas.numel(), desc="linear_interpolation",
                      unit="point") as bar:  # fmt: skip
        for alpha in alphas.tolist():
            with torch.no_grad():
                for n, p in work.named_parameters():
                    p.copy_(pa[n] + alpha * (pb[n].detach() - pa[n]))
                work.eval()
                for bn in bns:
                    bn.reset_running_stats()
                    bn.momentum = None
                    bn.train()
                obj = ModelObjective(work, loss_fn, data, bn="batch", process_group=None,
                                     reduction=reduction)  # fmt: skip
                for inputs, _ in obj.batches():  # training-mode passes update the statistics
                    _forward(work, inputs)
                work.eval()
            obj = ModelObjective(work, loss_fn, data, bn="eval", process_group=None,
                                 reduction=reduction)  # fmt: skip
            zero = {n: torch.zeros_like(t) for n, t in obj.params.items()}
            loss, met = evaluate_points(obj, [zero], torch.zeros(1, 1), metric=metric, chunk_size=1)
            losses.append(loss)
            if met is not None:
                metrics.append(met)
            bar.update(1)
    return torch.cat(losses), (torch.cat(metrics) if metric is not None else None)
