r"""Relative flatness (Petzka et al. 2021): a layer's Hessian weighted by its weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen.curvature import ModelObjective
from sharpgen.curvature._resolve import resolve_objective
from sharpgen.linalg import LinearOperator, TraceEstimate
from sharpgen.sharpness._common import check_generator
from sharpgen.sharpness._operators import (
    BlockOperator,
    ObjectiveOperator,
    check_trace_options,
    operator_trace,
)

__all__ = ["relative_flatness"]


class _Weighted(LinearOperator):
    r"""$A^{1/2} H A^{1/2}$ with $A^{1/2} = (W W^\top)^{1/2} \otimes I$ on row-major ``vec W``."""

    def __init__(self, inner: LinearOperator, root: Tensor, rows: int, cols: int) -> None:
        super().__init__(inner.shape[0], inner.dtype, inner.device)
        self.inner, self.root, self.rows, self.cols = inner, root.to(inner.dtype), rows, cols

    def _scale(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        M = V.T.reshape(k, self.rows, self.cols)
        return (self.root @ M).reshape(k, -1).T

    def _matmat(self, V: Tensor) -> Tensor:
        return self._scale(self.inner.matmat(self._scale(V)))


def relative_flatness(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    layer: str,
    method: str = "auto",
    num_matvecs: int | None = None,
    rtol: float | None = None,
    max_matvecs: int = 1000,
    generator: torch.Generator | None = None,
    exact_threshold: int = 2000,
    progress: bool = False,
    **objective_options: Any,
) -> TraceEstimate:
    r"""Relative flatness $\kappa_{Tr}$ of one layer (Petzka et al. 2021).

    For the layer's weight $W$ with rows $w_s$ (the weights into output unit $s$; a
    convolution kernel is read as ``W.reshape(out_channels, -1)``),

    $$
    \kappa_{Tr}(W) = \sum_{s, s'} \langle w_s, w_{s'}\rangle\,
        \operatorname{tr} H_{s,s'}
    = \operatorname{tr}\!\big(A^{1/2} H_W A^{1/2}\big),
    \qquad A = (W W^\top) \otimes I,
    $$

    where $H_{s,s'} = \partial^2 L / \partial w_s \partial w_{s'}$ and $H_W$ is the Hessian
    of the dataset loss with respect to $W$ alone (the other parameters fixed). Rescaling
    the layer by $a$ and the following one by $1/a$ (a ReLU network computes the same
    function) multiplies $H_W$ by $a^{-2}$ and $A$ by $a^2$, so $\kappa_{Tr}$ is
    unchanged, unlike $\operatorname{tr} H$. Petzka et al. bound the generalization gap
    of the layer's representation by it.

    ``method="exact"`` uses the $p_W$ diagonal entries of $A^{1/2} H_W A^{1/2}$ (one
    product per entry of $W$); ``"hutchinson"`` and ``"xtrace"`` estimate the trace with
    a standard error (see `sharpgen.hutchinson_trace`, `sharpgen.xtrace`);
    ``"auto"``: exact up to ``exact_threshold`` entries unless ``num_matvecs`` is given.

    Args:
        model: Any ``nn.Module`` or a ready `sharpgen.ModelObjective` (whose parameter
            selection must contain ``layer``).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        layer: Name of the weight parameter, e.g. ``"net.2.weight"``, or of a module with a
            ``weight`` (``"net.2"``).
        method: ``"auto"``, ``"exact"``, ``"hutchinson"`` or ``"xtrace"``.
        num_matvecs: Fixed budget (stochastic methods).
        rtol: Target relative standard error (stochastic methods; default 0.01).
        max_matvecs: Cap on the products with ``rtol``.
        generator: Source of the probes.
        exact_threshold: Largest layer size ``"auto"`` treats exactly.
        progress: A tqdm bar over the exact products.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout``, ``reduction``, ``backend``, ``process_group``,
            ``func_mode``, ``vectorize``.

    Returns:
        A `sharpgen.TraceEstimate` of $\kappa_{Tr}$.

    Raises:
        ValueError: ``layer`` is not a parameter (or module with a weight) of the model,
            or is a 1-D tensor.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> kappa = relative_flatness(model, torch.nn.functional.mse_loss,
        ...                           (x, torch.zeros(2, 1).double()), layer="weight")
        >>> w = model.weight.detach()
        >>> abs(kappa.value - float(w.pow(2).sum() * 2)) < 1e-12  # |w|^2 tr H, H = I
        True

    References:
        H. Petzka, M. Kamp, L. Adilova, C. Sminchisescu, M. Boley, "Relative flatness
        and generalization", NeurIPS 2021.
    """
    generator = check_generator(generator)
    method, num_matvecs, rtol, max_matvecs, exact_threshold = check_trace_options(
        method, num_matvecs, rtol, max_matvecs, exact_threshold, progress
    )
    base = model.model if isinstance(model, ModelObjective) else model
    name = _weight_name(base, layer)
    if isinstance(model, ModelObjective):
        if name not in model.params:
            raise ValueError(
                f"layer {layer!r} ({name}) is not in the objective's parameter selection "
                f"{list(model.params)[:6]}; build the objective with params=[{name!r}] or "
                "pass (model, loss_fn, data)."
            )
        obj = resolve_objective(model, loss_fn, data, objective_options,
                                where="relative_flatness")  # fmt: skip
        inner: LinearOperator = BlockOperator(obj, [name])
    else:
        if "params" in objective_options:
            raise TypeError(
                "relative_flatness got params=...; it selects the weight of `layer` itself, "
                "so drop params (or pass a ready objective)."
            )
        obj = resolve_objective(model, loss_fn, data, {**objective_options, "params": [name]},
                                where="relative_flatness")  # fmt: skip
        inner = ObjectiveOperator(obj, "hvp")
    W = obj.params[name]
    M = W.reshape(W.shape[0], -1) if W.ndim > 1 else W.reshape(1, -1)
    rows = M.shape[0]
    evals, evecs = torch.linalg.eigh(M @ M.T)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    op = _Weighted(inner, root, rows, M.shape[1])
    return operator_trace(op, method=method, num_matvecs=num_matvecs, rtol=rtol,
                          max_matvecs=max_matvecs, generator=generator,
                          exact_threshold=exact_threshold, progress=progress,
                          desc="relative_flatness")  # fmt: skip


def _weight_name(model: nn.Module, layer: str) -> str:
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a parameter or module name (str), got {layer!r}.")
    named = dict(model.named_parameters())
    name = layer if layer in named else f"{layer}.weight" if layer else "weight"
    if name not in named:
        two_d = [n for n, p in named.items() if p.ndim >= 2][:8]
        raise ValueError(
            f"layer {layer!r} is neither a parameter nor a module with a weight; choose one "
            f"of the weight parameters, e.g. {two_d}."
        )
    if named[name].ndim < 1:
        raise ValueError(
            f"layer {layer!r} selects {name} of shape {tuple(named[name].shape)}; relative "
            "flatness needs a weight with rows (a vector counts as one row)."
        )
    return name
