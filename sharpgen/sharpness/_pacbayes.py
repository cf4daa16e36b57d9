r"""PAC-Bayes flatness: the largest Gaussian perturbation scale that keeps the loss low."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen.curvature import ModelObjective, flatten_params, unflatten_params
from sharpgen.curvature._resolve import resolve_objective
from sharpgen.sharpness._common import (
    check_bool,
    check_generator,
    check_int,
    check_positive,
    progress_bar,
)

__all__ = ["PacBayesSigma", "pac_bayes_sigma"]


@dataclass(frozen=True, repr=False)
class PacBayesSigma:
    r"""The flatness scale found by `pac_bayes_sigma`.

    ``float(result)`` is ``sigma``. The true $\sigma^\ast$ lies in ``[lower, upper]``
    when every bisection decision was statistically clear (``uncertain_decisions == 0``).

    Attributes:
        sigma: Midpoint of the final bracket.
        lower: Largest scale whose estimated increase was below ``target``.
        upper: Smallest scale whose estimated increase was above it (``inf`` if none
            was found below ``sigma_max``).
        target: The allowed expected loss increase.
        loss: $L(\theta)$.
        magnitude_aware: Whether the variance was $\sigma^2\theta_i^2 + \epsilon^2$.
        evaluations: ``(sigma, mean increase, stderr, draws)`` for every scale tried.
        uncertain_decisions: Bisection decisions taken with the target inside the
            confidence interval after ``max_samples`` draws.
        num_loss_evals: Loss evaluations (forward passes over the data) spent.
    """

    sigma: float
    lower: float
    upper: float
    target: float
    loss: float
    magnitude_aware: bool
    evaluations: tuple[tuple[float, float, float, int], ...]
    uncertain_decisions: int
    num_loss_evals: int

    def __float__(self) -> float:
        return float(self.sigma)

    def __repr__(self) -> str:
        return (
            f"PacBayesSigma(sigma={self.sigma:.6g} in [{self.lower:.6g}, {self.upper:.6g}], "
            f"target={self.target:g}, magnitude_aware={self.magnitude_aware}, "
            f"uncertain_decisions={self.uncertain_decisions}, "
            f"num_loss_evals={self.num_loss_evals})"
        )

    def plot(self, ax: Any = None) -> Any:
        """Plot the estimated increase (± 2 stderr) against sigma with the target line."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        ev = sorted(self.evaluations)
        s = [e[0] for e in ev]
        ax.errorbar(s, [e[1] for e in ev], yerr=[2 * e[2] for e in ev], fmt="o", ms=3)
        ax.axhline(self.target, color="k", ls="--", lw=1, label="target")
        ax.axvline(self.sigma, color="C3", lw=1, label=f"sigma = {self.sigma:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
        ax.set_ylabel("E L(theta + u) - L(theta)")
        ax.legend()
        return ax.figure


class _Increase:
    """Mean loss increase at a scale, from a common sequence of antithetic Gaussian draws."""

    def __init__(
        self, obj: ModelObjective, scale: Tensor, eps: float, generator: Any, bar: Any
    ) -> None:
        self.obj, self.scale, self.eps, self.bar = obj, scale, eps, bar
        self.theta = obj.params
        self.flat = flatten_params(self.theta)
        self.loss0 = obj.loss()
        self.generator = generator
        self.seeds: list[int] = []
        self.evals = 1

    def _seed(self, j: int) -> int:
        while len(self.seeds) <= j:  # the draws are common to every sigma
            self.seeds.append(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        return self.seeds[j]

    def sample(self, sigma: float, j: int) -> float:
        g = torch.Generator().manual_seed(self._seed(j))
        z = torch.randn(self.flat.shape, generator=g, dtype=self.flat.dtype)
        std = torch.sqrt((sigma * self.scale) ** 2 + self.eps**2)
        u = unflatten_params(z.to(self.flat.device) * std, self.theta)
        plus = self.obj.loss({n: t + u[n] for n, t in self.theta.items()})
        minus = self.obj.loss({n: t - u[n] for n, t in self.theta.items()})
        self.evals += 2
        self.bar.update(1)
        return float((plus + minus) / 2 - self.loss0)


def pac_bayes_sigma(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    target: float = 0.1,
    magnitude_aware: bool = False,
    eps: float = 1e-3,
    num_samples: int = 16,
    max_samples: int = 128,
    confidence: float = 2.0,
    sigma_init: float = 0.01,
    sigma_max: float = 100.0,
    rtol: float = 0.02,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **objective_options: Any,
) -> PacBayesSigma:
    r"""PAC-Bayes flatness: largest $\sigma$ with $\mathbb{E}_u L(\theta+u) - L(\theta) \le$ target.

    The perturbation $u$ is Gaussian with independent coordinates,
    $u_i \sim \mathcal N(0, \sigma^2)$ (isotropic) or
    $u_i \sim \mathcal N(0, \sigma^2\theta_i^2 + \epsilon^2)$ (``magnitude_aware=True``,
    invariant to rescaling ReLU layers when ``eps=0``). Jiang et al. (2020) found
    $1/\sigma'^2$ among the measures best correlated with generalization ("PAC-Bayes
    flatness", their Eqs. 48-51; they use a target of 0.1 on the training error, here it
    is the loss of the objective). For a quadratic $L$ around a minimum
    $\mathbb{E}\,L(\theta+u) - L(\theta) = \frac{\sigma^2}{2}\operatorname{tr}H$, so
    $\sigma^\ast = \sqrt{2\,\text{target}/\operatorname{tr}H}$.

    **Search.** $\sigma$ is doubled from ``sigma_init`` until the increase exceeds the
    target (or ``sigma_max`` is passed), then bisected (geometrically) until
    ``upper / lower - 1 <= rtol``. At each $\sigma$ the increase is estimated from
    antithetic pairs $\frac12[L(\theta+u)+L(\theta-u)] - L(\theta)$ over the same
    sequence of draws (common random numbers: the estimate is monotone in the scale of
    $u$ for a convex $L$); starting with ``num_samples`` draws, more are added (doubling,
    up to ``max_samples``) while the target lies within ``confidence`` standard errors of
    the mean. Decisions still inside the interval are counted in
    ``uncertain_decisions``.

    Args:
        model: Any ``nn.Module`` or a ready `sharpgen.ModelObjective`.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        target: Allowed expected loss increase (> 0).
        magnitude_aware: Scale coordinate $i$ by $|\theta_i|$ (plus ``eps``).
        eps: The $\epsilon$ of the magnitude-aware variance (Jiang et al. use 1e-3).
        num_samples: Draws at each scale to start with ($\ge 2$).
        max_samples: Most draws at one scale.
        confidence: Width of the decision interval in standard errors.
        sigma_init: First scale tried.
        sigma_max: Largest scale tried.
        rtol: Relative width of the final bracket.
        generator: Source of the draws; the global RNG is untouched when given.
        progress: A tqdm bar over the draws.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout``, ``reduction``, ``backend``, ``process_group``,
            ``func_mode``, ``vectorize``.

    Returns:
        A `PacBayesSigma` (``.plot()`` draws the increases it measured).

    Raises:
        ValueError: Non-positive ``target``, ``rtol``, ``sigma_init``, ``confidence``;
            ``max_samples < num_samples``; ``sigma_max <= sigma_init``.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> res = pac_bayes_sigma(model, torch.nn.functional.mse_loss, (x, model(x).detach()),
        ...                       target=0.01, generator=torch.Generator().manual_seed(0))
        >>> truth = (2 * 0.01 / 5.0) ** 0.5  # tr H = 5
        >>> abs(res.sigma / truth - 1) < 0.2
        True

    References:
        Y. Jiang, B. Neyshabur, H. Mobahi, D. Krishnan, S. Bengio, "Fantastic
        generalization measures and where to find them", ICLR 2020. G. K. Dziugaite,
        D. M. Roy, "Computing nonvacuous generalization bounds for deep (stochastic)
        neural networks", UAI 2017.
    """
    target = check_positive("target", target, hint="an allowed loss increase, e.g. 0.1.")
    check_bool("magnitude_aware", magnitude_aware)
    eps = check_positive("eps", eps, allow_zero=True)
    num_samples = check_int("num_samples", num_samples, minimum=2)
    max_samples = check_int("max_samples", max_samples, minimum=num_samples,
                            hint="max_samples must be at least num_samples.")  # fmt: skip
    confidence = check_positive("confidence", confidence)
    sigma_init = check_positive("sigma_init", sigma_init)
    sigma_max = check_positive("sigma_max", sigma_max)
    if sigma_max <= sigma_init:
        raise ValueError(f"sigma_max={sigma_max} must exceed sigma_init={sigma_init}.")
    rtol = check_positive("rtol", rtol)
    generator = check_generator(generator)
    obj = resolve_objective(model, loss_fn, data, objective_options, where="pac_bayes_sigma")
    flat = flatten_params(obj.params)
    scale = flat.abs() if magnitude_aware else torch.ones_like(flat)
    eps_used = eps if magnitude_aware else 0.0
    with progress_bar(progress, total=None, desc="pac_bayes_sigma", unit="draw") as bar:
        inc = _Increase(obj, scale, eps_used, generator, bar)
        search = _Search(inc, target, num_samples, max_samples, confidence)
        lo, hi = 0.0, sigma_init
        while not search.above(hi):
            lo, hi = hi, 2 * hi
            if hi > sigma_max:
                hi = math.inf
                break
        while math.isfinite(hi) and (lo == 0.0 or hi / lo - 1 > rtol):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
            if search.above(mid):
                hi = mid
            else:
                lo = mid
            if lo == 0.0 and hi < sigma_init * 1e-6:
                break
    sigma = math.sqrt(lo * hi) if lo > 0 and math.isfinite(hi) else (lo if lo > 0 else hi / 2)
    return PacBayesSigma(
        sigma=sigma, lower=lo, upper=hi, target=target, loss=float(inc.loss0),
        magnitude_aware=magnitude_aware, evaluations=tuple(search.log),
        uncertain_decisions=search.uncertain, num_loss_evals=inc.evals,
    )  # fmt: skip


class _Search:
    """The decision "mean increase at sigma > target" with sequential sampling."""

    def __init__(
        self, inc: _Increase, target: float, n0: int, n_max: int, confidence: float
    ) -> None:
        self.inc, self.target, self.n0, self.n_max, self.z = inc, target, n0, n_max, confidence
        self.log: list[tuple[float, float, float, int]] = []
        self.uncertain = 0

    def above(self, sigma: float) -> bool:
        values = [self.inc.sample(sigma, j) for j in range(self.n0)]
        while True:
            t = torch.tensor(values, dtype=torch.float64)
            mean, se = float(t.mean()), float(t.std() / math.sqrt(len(values)))
            clear = abs(mean - self.target) > self.z * se
            if clear or len(values) >= self.n_max:
                break
            more = min(len(values), self.n_max - len(values))
            values += [self.inc.sample(sigma, len(values) + j) for j in range(more)]
        self.log.append((sigma, mean, se, len(values)))
        if not clear:
            self.uncertain += 1
        return mean > self.target
