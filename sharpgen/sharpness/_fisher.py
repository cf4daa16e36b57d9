r"""Gauss-Newton and Fisher quantities: their traces and the Fisher-Rao norm.

Next to the Hessian $H = \nabla^2 L$ two positive semi-definite curvature matrices are in
common use: the generalized Gauss-Newton matrix $G = \sum_b w_b J_b^\top H_{\ell,b} J_b$ (the
Hessian without the second derivatives of the model; for cross-entropy it is the Fisher
information of the model's predictive distribution, for the MSE loss twice the Gauss-Newton
matrix $J^\top J$) and the *empirical* Fisher $F = \frac1N\sum_i \nabla\ell_i\nabla\ell_i^\top$
built from the per-sample gradients (``reduction="sum"``: without the $\frac1N$).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen.curvature import ModelObjective, dataset_reduce, flatten_params
from sharpgen.curvature._data import num_samples
from sharpgen.curvature._reduce import check_finite
from sharpgen.curvature._resolve import resolve_objective
from sharpgen.linalg import TraceEstimate
from sharpgen.sharpness._common import (
    check_choice,
    check_generator,
    check_int,
)
from sharpgen.sharpness._operators import (
    ObjectiveOperator,
    check_trace_options,
    operator_trace,
)
from sharpgen.sharpness._persample import in_dims, sq_grad_norms, take, theta_grad_dots
from sharpgen.sharpness._persample import one as one_sample

__all__ = [
    "FISHER_KINDS",
    "FisherRaoNorm",
    "empirical_fisher_trace",
    "fisher_rao_norm",
    "ggn_trace",
    "per_sample_losses",
]

FISHER_KINDS = ("ggn", "empirical")


def ggn_trace(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    method: str = "auto",
    num_matvecs: int | None = None,
    rtol: float | None = None,
    max_matvecs: int = 1000,
    generator: torch.Generator | None = None,
    progress: bool = False,
    exact_threshold: int = 2000,
    **objective_options: Any,
) -> TraceEstimate:
    r"""Trace of the generalized Gauss-Newton matrix, $\operatorname{tr} G$.

    $G = \sum_b w_b J_b^\top H_{\ell,b} J_b$ (see `sharpgen.GGNOperator`). At an
    interpolating point of the MSE loss the residual term of the Hessian vanishes and
    $\operatorname{tr} G = \operatorname{tr} H = \frac2n\sum_i \|\nabla_\theta f(x_i)\|^2$
    (Lemma 4.1 of Wen, Li & Ma 2023); away from it the two differ by the residual term.

    Args:
        model: Any ``nn.Module``, or a ready `sharpgen.ModelObjective` (then ``loss_fn``,
            ``data`` and ``params`` stay None).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        method: ``"exact"`` ($p$ products with basis vectors), ``"hutchinson"``,
            ``"xtrace"`` or ``"auto"`` (exact up to ``exact_threshold`` parameters unless
            ``num_matvecs`` is given, else XTrace).
        num_matvecs: Fixed budget of GGN-vector products (stochastic methods).
        rtol: Target relative standard error (default 0.01 without ``num_matvecs``).
        max_matvecs: Cap on the products with ``rtol``.
        generator: Source of the probes; the global RNG is untouched when given.
        progress: A tqdm bar over the exact products.
        exact_threshold: Largest parameter count ``"auto"`` computes exactly.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout``, ``reduction``, ``backend``, ``process_group``,
            ``func_mode``, ``vectorize``.

    Returns:
        A `sharpgen.TraceEstimate`.

    Raises:
        ValueError: Unknown ``method``; invalid budgets or model/data arguments.

    Examples:
        >>> import torch
        >>> x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> model = torch.nn.Linear(3, 1).double()
        >>> est = ggn_trace(model, torch.nn.functional.mse_loss, (x, torch.ones(16, 1).double()))
        >>> round(est.value, 8) == round(float(2 * (x**2).sum(1).mean() + 2), 8)  # = tr H
        True

    References:
        N. N. Schraudolph, "Fast curvature matrix-vector products for second-order
        gradient descent", Neural Computation 2002. J. Martens, "New insights and
        perspectives on the natural gradient method", JMLR 2020.
    """
    method, num_matvecs, rtol, max_matvecs, exact_threshold = check_trace_options(
        method, num_matvecs, rtol, max_matvecs, exact_threshold, progress
    )
    generator = check_generator(generator)
    obj = resolve_objective(model, loss_fn, data, objective_options, where="ggn_trace")
    return operator_trace(
        ObjectiveOperator(obj, "ggn"), method=method, num_matvecs=num_matvecs, rtol=rtol,
        max_matvecs=max_matvecs, generator=generator, exact_threshold=exact_threshold,
        progress=progress, desc="ggn_trace",
    )  # fmt: skip


# -- per-sample quantities ------------------------------------------------------------------
def _check_per_sample(obj: ModelObjective, where: str) -> None:
    if obj.bn == "batch" or obj.dropout:
        raise ValueError(
            f"{where} needs per-sample losses, which are undefined with bn='batch' (batch "
            "statistics) or dropout=True; build the objective with bn='eval' and "
            "dropout=False."
        )


def per_sample_losses(
    obj: ModelObjective, params: dict[str, Tensor], inputs: Any, targets: Any, others: Any
) -> Tensor:
    """``loss_fn`` on each sample of one batch (``torch.func.vmap``); shape ``(n,)``.

    Must be called inside ``obj.state()``.
    """

    def one(x: Any, y: Any) -> Tensor:
        return obj.batch_loss(params, one_sample(x), one_sample(y), others=others)

    return torch.func.vmap(one, in_dims=(in_dims(inputs), in_dims(targets)))(inputs, targets)


def _others(obj: ModelObjective) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in obj.model.named_parameters() if n not in obj.params}


def empirical_fisher_trace(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    chunk_size: int = 64,
    **objective_options: Any,
) -> TraceEstimate:
    r"""Trace of the empirical Fisher, $\operatorname{tr} F = \frac1N\sum_i \|\nabla\ell_i\|^2$.

    $\ell_i$ is ``loss_fn`` on sample $i$ alone; with ``reduction="sum"`` the factor
    $\frac1N$ is dropped. Exact: per-sample gradients by ``torch.func.vmap`` of
    ``torch.func.grad``, ``chunk_size`` samples at a time (memory: ``chunk_size`` times
    the parameter count). At a minimum the gradient noise this measures is what SGD's
    implicit regularization acts on; for MSE at interpolation $\ell_i$ and its gradient
    vanish, so $\operatorname{tr}F = 0$ there while $\operatorname{tr}G$ does not.

    Args:
        model: Any ``nn.Module`` or a ready `sharpgen.ModelObjective`.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        chunk_size: Samples per vectorized per-sample-gradient call.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout``, ``reduction``, ``backend``, ``process_group``,
            ``func_mode``, ``vectorize``.

    Returns:
        A `sharpgen.TraceEstimate` with ``method="per-sample"`` and ``stderr=0``;
        ``num_matvecs`` counts per-sample gradients.

    Raises:
        ValueError: ``bn="batch"``, invalid ``chunk_size`` or model/data arguments.
        FloatingPointError: A per-sample gradient of any batch holds NaN or Inf.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> torch.nn.init.zeros_(model.weight)  # residual -y, gradient -2 y x
        Parameter containing:
        tensor([[0.]], dtype=torch.float64, requires_grad=True)
        >>> float(empirical_fisher_trace(model, torch.nn.functional.mse_loss, (x, x)))
        34.0

    References:
        F. Kunstner, L. Balles, P. Hennig, "Limitations of the empirical Fisher
        approximation for natural gradient descent", NeurIPS 2019.
    """
    chunk_size = check_int("chunk_size", chunk_size)
    obj = resolve_objective(model, loss_fn, data, objective_options,
                            where="empirical_fisher_trace")  # fmt: skip
    _check_per_sample(obj, "empirical_fisher_trace")
    p = obj.params
    total = torch.zeros((), dtype=obj.accum_dtype, device=obj.device)
    count = 0
    with obj.state():
        others = _others(obj)
        for b, (inputs, targets) in enumerate(obj.batches()):
            n = num_samples(inputs)
            for start in range(0, n, chunk_size):
                stop = start + chunk_size
                xs, ys = take(inputs, start, stop), take(targets, start, stop)
                total = total + sq_grad_norms(obj, p, xs, ys, others, "empirical_fisher_trace")
            check_finite([total], f"squared per-sample gradient norm of batch {b}")
            count += n
    (total,), count = dataset_reduce([total], count, obj.reduction, obj.process_group)
    return TraceEstimate(value=float(total), stderr=0.0, num_matvecs=count, method="per-sample")


@dataclass(frozen=True, repr=False)
class FisherRaoNorm:
    r"""The Fisher-Rao norm computed by `fisher_rao_norm`.

    ``float(result)`` is ``value``.

    Attributes:
        value: $\|\theta\|_{fr} = \sqrt{\theta^\top M \theta}$ (0 for a negative
            ``squared`` within round-off).
        squared: $\theta^\top M \theta$ as computed (it may be negative within round-off).
        fisher: ``"ggn"`` ($M = G$) or ``"empirical"`` ($M = F$).
        num_samples: Number of samples $N$.
    """

    value: float
    squared: float
    fisher: str
    num_samples: int

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        return (
            f"FisherRaoNorm(value={self.value:.6g}, squared={self.squared:.6g}, "
            f"fisher={self.fisher!r}, num_samples={self.num_samples})"
        )


def fisher_rao_norm(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    fisher: str = "ggn",
    **objective_options: Any,
) -> FisherRaoNorm:
    r"""Fisher-Rao norm $\|\theta\|_{fr}^2 = \theta^\top M\,\theta$ (Liang et al. 2019).

    With the empirical Fisher ($M = F$, ``fisher="empirical"``)

    $$\|\theta\|_{fr}^2 = \frac1N \sum_i \langle \theta, \nabla_\theta \ell_i(\theta)\rangle^2,$$

    and with the Gauss-Newton matrix ($M = G$, ``fisher="ggn"``, the model Fisher for
    cross-entropy) $\|\theta\|_{fr}^2 = \sum_b w_b (J_b\theta)^\top H_{\ell,b} (J_b\theta)$.
    Both only see $\langle\theta, \nabla_\theta\,\cdot\rangle$, which a rescaling of a
    ReLU layer by $a$ and the next by $1/a$ leaves unchanged; for a network that is
    positively homogeneous of degree $k$ in its parameters
    $\langle\theta, \nabla_\theta f\rangle = k f$ (Euler), so for the two-layer nets of
    Wen, Li & Ma with the MSE loss $\|\theta\|_{fr,G}^2 = \frac{8}{n}\sum_i f(x_i)^2$, the
    same for every interpolator of the same labels.

    Cost: one GGN-vector product (``"ggn"``) or one forward-mode pass with per-sample
    losses (``"empirical"``).

    $G$ is positive semi-definite only when ``loss_fn`` is convex in the model outputs
    ($H_\ell \succeq 0$). For a loss that is not, $\theta^\top G\theta$ can be negative
    and the norm is undefined: then a `ValueError` is raised (`ggn_trace` reports the
    signed curvature). A negative value within round-off,
    $|\theta^\top G\theta| \le \sqrt{\epsilon}\sum_i|\theta_i (G\theta)_i|$, is
    kept in ``squared`` as computed, and ``value`` is then 0.

    Args:
        model: Any ``nn.Module`` or a ready `sharpgen.ModelObjective`.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        fisher: ``"ggn"`` (default) or ``"empirical"``.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout``, ``reduction``, ``backend``, ``process_group``,
            ``func_mode``, ``vectorize``.

    Returns:
        A `FisherRaoNorm`.

    Raises:
        ValueError: Unknown ``fisher``; ``bn="batch"`` with ``"empirical"``;
            $\theta^\top G\theta < 0$ beyond round-off (a loss not convex in the outputs).
        FloatingPointError: $\theta^\top M\theta$ is NaN or Inf.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> data = (x, torch.zeros(2, 1, dtype=torch.float64))
        >>> res = fisher_rao_norm(model, torch.nn.functional.mse_loss, data)
        >>> w = model.weight.detach()
        >>> abs(res.squared - float(2 * (x @ w.T).pow(2).mean())) < 1e-12  # 2 mean f^2
        True

    References:
        T. Liang, T. Poggio, A. Rakhlin, J. Stokes, "Fisher-Rao metric, geometry, and
        complexity of neural networks", AISTATS 2019. Y. Jiang et al., "Fantastic
        generalization measures and where to find them", ICLR 2020.
    """
    fisher = check_choice("fisher", fisher, FISHER_KINDS)
    obj = resolve_objective(model, loss_fn, data, objective_options, where="fisher_rao_norm")
    p = obj.params
    if fisher == "ggn":
        flat = flatten_params(p).to(obj.accum_dtype)
        terms = [ObjectiveOperator(obj, "ggn").matvec(flat) * flat]
        squared = float(sum(v.sum() for v in terms))
        scale = float(sum(v.abs().sum() for v in terms))  # for the round-off bound
        n_total = obj.num_samples
    else:
        _check_per_sample(obj, "fisher_rao_norm(fisher='empirical')")
        total = torch.zeros((), dtype=obj.accum_dtype, device=obj.device)
        count = 0
        with obj.state(), torch.no_grad():
            others = _others(obj)
            for inputs, targets in obj.batches():
                s = theta_grad_dots(obj, p, inputs, targets, others, "fisher_rao_norm")
                total = total + (s.to(total.dtype) ** 2).sum()
                count += num_samples(inputs)
        (total,), n_total = dataset_reduce([total], count, obj.reduction, obj.process_group)
        squared, scale = float(total), 0.0  # a sum of squares
    if not math.isfinite(squared):
        raise FloatingPointError(f"the Fisher-Rao norm is not finite ({squared}).")
    if squared < -scale * math.sqrt(torch.finfo(obj.dtype).eps):
        raise ValueError(
            f"theta^T G theta = {squared:.6g} < 0: the Gauss-Newton matrix is not positive "
            "semi-definite along theta (loss_fn is not convex in the model outputs), so the "
            "Fisher-Rao norm is undefined; use a loss convex in the outputs (cross-entropy, "
            "MSE), fisher='empirical', or ggn_trace for the signed curvature."
        )
    return FisherRaoNorm(value=math.sqrt(max(squared, 0.0)), squared=squared, fisher=fisher,
                         num_samples=n_total)  # fmt: skip
