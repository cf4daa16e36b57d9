"""Result dataclasses returned by the estimators of `sharpgen.linalg`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["EigenResult", "SpectralDensity", "TraceEstimate"]


@dataclass(frozen=True, repr=False)
class TraceEstimate:
    r"""A stochastic estimate of $\operatorname{tr}(A)$ with its standard error.

    ``float(result)`` is the estimate. A 95% confidence interval is
    ``value ± 1.96 * stderr`` (asymptotically, for the averaged estimators).

    Attributes:
        value: The trace estimate.
        stderr: Estimated standard error of ``value`` (``inf`` when it cannot be estimated,
            e.g. from a single sample).
        num_matvecs: Matrix-vector products spent.
        method: ``"hutchinson"``, ``"hutchpp"``, ``"xtrace"`` or ``"exact"`` (the method
            actually used; `trace` with ``method="auto"`` reports its choice).
        samples: The per-probe estimates whose mean is ``value`` (Hutchinson:
            $z_i^\top A z_i$; Hutch++: the deflated-remainder samples; XTrace: the
            exchangeable leave-one-out estimates), or None. For Hutchinson and Hutch++ the
            standard error is computed from them; XTrace's combines their spread with a
            delete-a-group jackknife of the whole estimator (see `xtrace`).
        converged: False only when a target ``rtol`` was asked for and not reached within
            ``max_matvecs``; True otherwise.
        rtol: The requested relative standard error, or None for a fixed budget.
        frobenius_sq: Estimate of $\|A\|_F^2 = \operatorname{tr}(A^2)$ from the same
            probes (Hutchinson only, else None).
        frobenius_sq_stderr: Its standard error (or None).
        memory: The memory plan of the measure that made the estimate
            (`sharpgen.curvature.MemoryPlan`), or None.
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str
    samples: Tensor | None = None
    converged: bool = True
    rtol: float | None = None
    frobenius_sq: float | None = None
    frobenius_sq_stderr: float | None = None
    memory: Any = None

    def __float__(self) -> float:
        return float(self.value)

    @property
    def relative_stderr(self) -> float:
        """``stderr / |value|`` (``inf`` when the value is 0)."""
        return self.stderr / abs(self.value) if self.value != 0 else math.inf

    def __repr__(self) -> str:
        parts = [
            f"value={self.value:.6g} ± {self.stderr:.2g}",
            f"method={self.method!r}",
            f"num_matvecs={self.num_matvecs}",
        ]
        if self.rtol is not None:
            parts.append(f"converged={self.converged}")
        if self.frobenius_sq is not None:
            parts.append(f"frobenius_sq={self.frobenius_sq:.6g}")
        return f"TraceEstimate({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class EigenResult:
    r"""Eigenvalue estimates of a symmetric operator with their residuals.

    Attributes:
        eigenvalues: Ritz values, shape ``(k,)``, ordered by ``which`` (see `lanczos`).
        eigenvectors: Ritz vectors as unit-norm columns, shape ``(n, k)``. For a
            curvature operator ``H``, ``H.unflatten(result.eigenvectors[:, i])`` turns a
            column back into a parameter dict (`sharpgen.unflatten_params` does the same).
        residuals: Residual norms $\|A x_i - \theta_i x_i\|$, shape ``(k,)``. For
            symmetric $A$ each $\theta_i$ is within ``residuals[i]`` of an eigenvalue
            of $A$.
        converged: Whether every residual met the stopping test (see `lanczos`).
        num_matvecs: Matrix-vector products spent.
        num_iterations: Iterations (Lanczos or power steps) performed.
        method: ``"lanczos"`` or ``"power_iteration"``.
        which: The part of the spectrum that was asked for.
        tol: The relative tolerance of the stopping test.
        num_restarts: Thick restarts performed (Lanczos only).
        num_reorth: Lanczos steps whose product was orthogonalized against the whole
            basis: every step with ``reorth="full"``; with ``"partial"`` those that
            Simon's estimate asked for and the first step after each thick restart.
        memory: The memory plan of the measure that made the result
            (`sharpgen.curvature.MemoryPlan`), or None.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: bool
    num_matvecs: int
    num_iterations: int
    method: str = "lanczos"
    which: str = "largest"
    tol: float = 1e-3
    num_restarts: int = 0
    memory: Any = None
    num_reorth: int = 0

    def __float__(self) -> float:
        if self.eigenvalues.numel() != 1:
            raise TypeError(
                f"float() needs a single eigenvalue, this result has {self.eigenvalues.numel()}; "
                "index result.eigenvalues instead."
            )
        return float(self.eigenvalues[0])

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.eigenvalues.tolist())
        res = max(self.residuals.tolist()) if self.residuals.numel() else 0.0
        return (
            f"{type(self).__name__}(eigenvalues=[{vals}], which={self.which!r}, "
            f"converged={self.converged}, max_residual={res:.2g}, "
            f"num_matvecs={self.num_matvecs}, method={self.method!r})"
        )


def gaussian_smoothing(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    r"""$\phi(t) = \frac{1}{P}\sum_{p,j} w_{pj}\, g_\sigma(t - \theta_{pj})$, Gaussian kernel."""
    num_probes = nodes.shape[0]
    diff = grid.reshape(-1, 1, 1) - nodes.unsqueeze(0)
    kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (kernel * weights.unsqueeze(0)).sum(dim=(1, 2)) / num_probes


@dataclass(frozen=True, repr=False)
class SpectralDensity:
    r"""A spectral density estimated by stochastic Lanczos quadrature.

    The estimated spectral measure is $\frac{1}{P}\sum_{p=1}^{P}\sum_{j=1}^{m}
    w_{pj}\,\delta_{\theta_{pj}}$ (total mass 1, i.e. the eigenvalue distribution
    $\frac{1}{n}\sum_i \delta_{\lambda_i}$); ``density`` is it convolved with a Gaussian
    of width ``sigma`` and sampled on ``grid``.

    Attributes:
        nodes: Quadrature nodes (Ritz values), shape ``(num_probes, num_steps)``.
        weights: Quadrature weights (squared first eigenvector components), same shape;
            each row sums to 1. Rows of probes whose Krylov space closed early are padded
            with zero weights.
        grid: Points where the density was evaluated, shape ``(num_points,)``.
        density: The smoothed density on ``grid``.
        sigma: Width of the Gaussian kernel.
        num_matvecs: Matrix-vector products spent.
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    sigma: float
    num_matvecs: int

    def evaluate(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Evaluate the smoothed density on another ``grid`` (optionally another ``sigma``).

        Args:
            grid: 1-D tensor of points.
            sigma: Kernel width; defaults to ``self.sigma``.

        Returns:
            The density at ``grid``, same dtype as the nodes.
        """
        sigma = self.sigma if sigma is None else float(sigma)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}.")
        grid = torch.as_tensor(grid, dtype=self.nodes.dtype, device=self.nodes.device)
        return gaussian_smoothing(self.nodes, self.weights, grid.reshape(-1), sigma)

    def moment(self, power: int) -> float:
        r"""Quadrature estimate of $\frac{1}{n}\operatorname{tr}(A^{power})$."""
        return float((self.weights * self.nodes**power).sum() / self.nodes.shape[0])

    def plot(self, ax: Any = None, *, log: bool = False, **kwargs: Any) -> Any:
        """Plot the density with matplotlib (imported only here).

        Args:
            ax: A matplotlib ``Axes``; a new figure is created when None.
            log: Use a logarithmic density axis (as in Ghorbani et al. 2019).
            **kwargs: Passed on to ``ax.plot``.

        Returns:
            The ``Axes``.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3))
        ax.plot(self.grid.cpu().numpy(), self.density.cpu().numpy(), **kwargs)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax

    def __repr__(self) -> str:
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        return (
            f"SpectralDensity(num_probes={self.nodes.shape[0]}, num_steps={self.nodes.shape[1]}, "
            f"support≈[{lo:.4g}, {hi:.4g}], sigma={self.sigma:.3g}, "
            f"num_points={self.grid.numel()}, num_matvecs={self.num_matvecs})"
        )
