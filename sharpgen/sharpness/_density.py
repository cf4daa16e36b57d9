r"""The eigenvalue density of the loss Hessian of a model (stochastic Lanczos quadrature)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen.curvature import ModelObjective
from sharpgen.linalg import LinearOperator, SpectralDensity, stochastic_lanczos_quadrature
from sharpgen.sharpness._common import (
    MeasureSource,
    ProgressOperator,
    check_choice,
    check_generator,
    check_int,
    progress_bar,
)

__all__ = ["spectral_density"]

_DISTRIBUTIONS = ("rademacher", "gaussian")


def spectral_density(
    model: nn.Module | ModelObjective | LinearOperator,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    num_probes: int = 10,
    num_steps: int = 30,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    grid: Tensor | None = None,
    sigma: float | None = None,
    num_points: int = 512,
    progress: bool = False,
    **objective_options: Any,
) -> SpectralDensity:
    r"""Eigenvalue density of the loss Hessian by stochastic Lanczos quadrature (SLQ).

    Runs `sharpgen.linalg.stochastic_lanczos_quadrature` on the
    `sharpgen.curvature.HessianOperator`: ``num_probes`` random start vectors, each with
    ``num_steps`` Lanczos steps, give Gauss quadrature nodes $\theta_{pj}$ and weights
    $w_{pj}$ whose average estimates the eigenvalue distribution
    $\frac1p\sum_i \delta_{\lambda_i}$ (Ghorbani et al. 2019). The quadrature integrates
    polynomials of degree $< 2\,$``num_steps`` exactly for each probe, so
    ``result.moment(j)`` is an unbiased estimate of $\operatorname{tr}(H^j)/p$ for such
    $j$; the extreme nodes converge to the extreme eigenvalues.

    Cost: ``num_probes * num_steps`` Hessian-vector products (all probes advance together,
    one block product per step); memory ``num_probes * num_steps * p`` numbers.

    Args:
        model: Any ``nn.Module`` (left exactly as it was), with ``loss_fn`` and ``data``;
            or a ready `sharpgen.curvature.ModelObjective` or curvature operator alone.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        num_probes: Number of random start vectors (variance of the moments
            $\propto 1/$``num_probes``).
        num_steps: Lanczos steps per probe (resolution of the density).
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` start vectors.
        generator: Source of the start vectors; the global RNG is untouched when given.
        grid: Points at which to evaluate the smoothed density (default: ``num_points``
            points covering the nodes).
        sigma: Width of the Gaussian smoothing kernel (default 1% of the node range).
        num_points: Size of the default grid.
        progress: Show a tqdm progress bar over the products.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout`` (not meaningful for Lanczos; leave it off),
            ``reduction``, ``backend`` (of the `sharpgen.curvature.HessianOperator`),
            ``process_group`` (see the Distributed guide), ``func_mode``, ``vectorize``.

    Returns:
        A `sharpgen.linalg.SpectralDensity` (``nodes``, ``weights``, ``grid``,
        ``density``, ``moment(j)``, ``plot()``).

    Raises:
        ValueError: Non-positive counts, an unknown ``distribution`` (the valid ones are
            listed), invalid model/data arguments.
        TypeError: Wrongly typed arguments.
        FloatingPointError: A non-finite loss or product.

    Examples:
        >>> import torch
        >>> x = torch.eye(4, dtype=torch.float64)
        >>> model = torch.nn.Linear(4, 1, bias=False).double()
        >>> d = spectral_density(model, torch.nn.functional.mse_loss,
        ...                      (x, torch.zeros(4, 1, dtype=torch.float64)), num_probes=2,
        ...                      num_steps=4, generator=torch.Generator().manual_seed(0))
        >>> round(d.moment(1), 10)  # H = (2/4) I: every eigenvalue is 0.5
        0.5

    References:
        B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into neural net optimization
        via Hessian eigenvalue density", ICML 2019. L. Lin, Y. Saad, C. Yang,
        "Approximating spectral densities of large matrices", SIAM Review 2016.
    """
    num_probes = check_int("num_probes", num_probes)
    num_steps = check_int("num_steps", num_steps)
    num_points = check_int("num_points", num_points, minimum=2)
    distribution = check_choice("distribution", distribution, _DISTRIBUTIONS)
    generator = check_generator(generator)
    source = MeasureSource(model, loss_fn, data, objective_options, where="spectral_density")
    H = source.hessian()
    total = num_probes * min(num_steps, H.shape[0])
    with progress_bar(progress, total=total, desc="spectral_density", unit="matvec") as bar:
        return stochastic_lanczos_quadrature(
            ProgressOperator(H, bar), num_probes=num_probes, num_steps=num_steps,
            distribution=distribution, generator=generator, grid=grid, sigma=sigma,
            num_points=num_points,
        )  # fmt: skip
