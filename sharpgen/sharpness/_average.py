r"""Average-case sharpness: the expected loss increase under random perturbations."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._distributed import check_generator_agrees
from sharpgen._validation import check_rho
from sharpgen.curvature import ModelObjective, flatten_params, unflatten_params
from sharpgen.linalg import LinearOperator
from sharpgen.sharpness._common import (
    MeasureSource,
    check_adaptive,
    check_bool,
    check_choice,
    check_generator,
    check_int,
    draw,
    progress_bar,
)

__all__ = ["DISTRIBUTIONS", "AverageSharpnessResult", "average_sharpness"]

DISTRIBUTIONS = ("gaussian", "uniform")


@dataclass(frozen=True, repr=False)
class AverageSharpnessResult:
    r"""The expected loss increase estimated by `average_sharpness`.

    ``float(result)`` is ``value``; ``value ± 1.96 * stderr`` is an approximate 95%
    confidence interval.

    Attributes:
        value: Monte Carlo estimate of $\mathbb{E}_\varepsilon L(\theta+\varepsilon) -
            L(\theta)$.
        stderr: Its standard error (``inf`` with a single sample).
        loss: $L(\theta)$.
        samples: The per-draw estimates the mean and standard error come from, shape
            ``(num_samples,)`` float64 on the CPU (with antithetic pairs
            $\frac12[L(\theta+\varepsilon)+L(\theta-\varepsilon)] - L(\theta)$).
        rho: The scale $\rho$.
        distribution: ``"gaussian"`` or ``"uniform"``.
        adaptive: Whether the perturbation was scaled by $|\theta| + \eta$.
        antithetic: Whether antithetic pairs were used.
        num_samples: Number of random draws.
        num_loss_evals: Loss evaluations (forward passes over the data) spent.
    """

    value: float
    stderr: float
    loss: float
    samples: Tensor
    rho: float
    distribution: str
    adaptive: bool
    antithetic: bool
    num_samples: int
    num_loss_evals: int

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        return (
            f"AverageSharpnessResult(value={self.value:.6g} ± {self.stderr:.2g}, "
            f"loss={self.loss:.6g}, rho={self.rho:g}, distribution={self.distribution!r}, "
            f"adaptive={self.adaptive}, num_samples={self.num_samples}, "
            f"num_loss_evals={self.num_loss_evals})"
        )


def average_sharpness(
    model: nn.Module | ModelObjective | LinearOperator,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    rho: float | None = None,
    *,
    num_samples: int = 32,
    distribution: str = "gaussian",
    adaptive: bool = False,
    eta: float = 0.0,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **objective_options: Any,
) -> AverageSharpnessResult:
    r"""Average-case sharpness $\mathbb{E}_{\varepsilon}\, L(\theta+\varepsilon) - L(\theta)$.

    The perturbation acts on the selected parameters, independently per coordinate:

    * ``distribution="gaussian"``: $\varepsilon_i \sim \mathcal N(0, \rho^2 t_i^2)$,
    * ``distribution="uniform"``: $\varepsilon_i \sim \mathcal U[-\rho t_i, \rho t_i]$
      (uniform in the $\ell_\infty$ box of `sam_sharpness` with ``norm="linf"``),

    with $t_i = |\theta_i| + \eta$ when ``adaptive`` (the scale-invariant version of
    Andriushchenko et al. 2023) and $t_i = 1$ otherwise. Note that $\rho$ is the
    *per-coordinate* scale: a Gaussian perturbation has norm about $\rho\sqrt p$.

    By Taylor expansion (exact for a quadratic loss)

    $$
    \mathbb{E}\, L(\theta+\varepsilon) - L(\theta) = \tfrac{1}{2}\operatorname{tr}(\Sigma H)
    + O(\rho^4), \qquad \Sigma = \rho^2 T^2 \ (\text{Gaussian}), \quad
    \Sigma = \tfrac{\rho^2}{3} T^2 \ (\text{uniform}),
    $$

    so for small $\rho$ the Gaussian value is $\frac{\rho^2}{2}\operatorname{tr} H$, the
    connection between average sharpness and the Hessian trace used by Wen, Li & Ma.

    **Antithetic pairs** (default): each draw $\varepsilon$ is evaluated at
    $\theta \pm \varepsilon$ and contributes
    $\frac12[L(\theta+\varepsilon) + L(\theta-\varepsilon)] - L(\theta)$. The odd terms of
    the Taylor expansion (the gradient term $g^\top\varepsilon$, whose variance
    $\rho^2\|g\|^2$ dominates away from a minimum) cancel exactly, at twice the cost per
    draw; the estimate stays unbiased. ``stderr`` is the sample standard deviation of the
    per-draw estimates over $\sqrt{N}$.

    Cost: ``1 + num_samples`` (or ``1 + 2 * num_samples`` with antithetic pairs) loss
    evaluations, each a forward pass over the data.

    Args:
        model: Any ``nn.Module`` (left exactly as it was), with ``loss_fn`` and ``data``;
            or a ready `sharpgen.curvature.ModelObjective` or curvature operator alone
            (then pass ``rho`` by keyword).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        rho: Per-coordinate scale $\rho \ge 0$ ($\rho = 0$ gives exactly 0).
        num_samples: Number of random draws $N \ge 1$ (2 or more for a finite stderr).
        distribution: ``"gaussian"`` or ``"uniform"``.
        adaptive: Scale coordinate $i$ by $|\theta_i| + \eta$.
        eta: Offset $\eta \ge 0$ of the adaptive scaling.
        antithetic: Use antithetic pairs $\pm\varepsilon$.
        generator: Source of the perturbations; the global RNG is untouched when given.
        progress: Show a tqdm progress bar over the draws.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout`` (adds its own noise), ``reduction`` and
            ``process_group`` (``"auto"`` (default), ``None`` or a ``torch.distributed``
            group over which every loss evaluation is all-reduced; each process passes
            its shard and the same ``generator`` seed, which is checked; see the
            Distributed guide). ``backend`` is accepted and unused.

    Returns:
        An `AverageSharpnessResult`.

    Raises:
        ValueError: ``rho <= 0``, ``num_samples < 1``, ``eta < 0``, an unknown
            ``distribution`` (the valid ones are listed), invalid model/data arguments.
        TypeError: Wrongly typed arguments.
        FloatingPointError: A non-finite loss.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> res = average_sharpness(model, torch.nn.functional.mse_loss, (x, model(x).detach()),
        ...                         rho=0.1, num_samples=200,
        ...                         generator=torch.Generator().manual_seed(0))
        >>> truth = 0.1**2 / 2 * 5.0  # rho^2 / 2 * tr(H), H = diag(1, 4)
        >>> abs(res.value - truth) < 4 * res.stderr
        True

    References:
        M. Andriushchenko, F. Croce, M. Müller, M. Hein, N. Flammarion, "A modern look at
        the relationship between sharpness and generalization", ICML 2023. Y. Jiang et
        al., "Fantastic generalization measures and where to find them", ICLR 2020.
    """
    source = MeasureSource(model, loss_fn, data, objective_options, where="average_sharpness")
    if rho is None:
        raise TypeError("average_sharpness needs the scale rho, e.g. rho=0.01.")
    rho = check_rho(rho)  # rho = 0 is allowed: the sharpness is then exactly 0
    num_samples = check_int("num_samples", num_samples)
    distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
    adaptive, eta = check_adaptive(adaptive, eta)
    antithetic = check_bool("antithetic", antithetic)
    generator = check_generator(generator)
    check_bool("progress", progress)
    obj = source.objective()
    if obj.process_group is not None:
        check_generator_agrees(generator, obj.process_group, obj.device,
                               where="average_sharpness")  # fmt: skip
    theta = obj.params
    flat = flatten_params(theta)
    scale = (flat.abs() + eta) * rho if adaptive else None
    loss0 = obj.loss()
    evals = 1
    samples = []
    with progress_bar(progress, total=num_samples, desc="average_sharpness", unit="draw") as bar:
        for _ in range(num_samples):
            z = draw(distribution, (flat.numel(),), generator=generator, dtype=obj.dtype,
                     device=obj.device)  # fmt: skip
            z = z * scale if scale is not None else z * rho
            eps = unflatten_params(z, theta)
            plus = obj.loss({n: t + eps[n] for n, t in theta.items()})
            evals += 1
            if antithetic:
                minus = obj.loss({n: t - eps[n] for n, t in theta.items()})
                evals += 1
                sample = (plus + minus) / 2 - loss0
            else:
                sample = plus - loss0
            samples.append(sample.to(device="cpu", dtype=torch.float64))
            bar.update(1)
    values = torch.stack(samples)
    stderr = float(values.std() / math.sqrt(num_samples)) if num_samples > 1 else math.inf
    return AverageSharpnessResult(
        value=float(values.mean()),
        stderr=stderr,
        loss=float(loss0),
        samples=values,
        rho=rho,
        distribution=distribution,
        adaptive=adaptive,
        antithetic=antithetic,
        num_samples=num_samples,
        num_loss_evals=evals,
    )
