r"""Sharpness measures: the quantities users call on ``(model, loss_fn, data)``.

Hessian-based measures (thin conveniences over `sharpgen.curvature` and `sharpgen.linalg`):
`hessian_trace`, `top_eigenvalues`, `spectral_density`. Perturbation-based measures:
`sam_sharpness` (worst case within a $\rho$-neighbourhood, m-sharpness) and
`average_sharpness` (expected loss increase under random perturbations). `SharpnessTracker`
computes any of them every N steps of a training loop. The pure SAM perturbation and its
projections are shared with the optimizers of `sharpgen.optim`.
"""

from sharpgen.sharpness._average import AverageSharpnessResult, average_sharpness
from sharpgen.sharpness._block_traces import BlockTraces, block_traces
from sharpgen.sharpness._blocks import HessianDiagonal, block_top_eigenvalues, hessian_diagonal
from sharpgen.sharpness._density import spectral_density
from sharpgen.sharpness._eigen import ModelEigenResult, top_eigenvalues
from sharpgen.sharpness._fisher import (
    FisherRaoNorm,
    empirical_fisher_trace,
    fisher_rao_norm,
    ggn_trace,
)
from sharpgen.sharpness._invariant import relative_flatness
from sharpgen.sharpness._pacbayes import PacBayesSigma, pac_bayes_sigma
from sharpgen.sharpness._perturbation import project_perturbation, sam_perturbation
from sharpgen.sharpness._trace import hessian_trace
from sharpgen.sharpness._tracker import SharpnessTracker
from sharpgen.sharpness._worst_case import SharpnessResult, sam_sharpness

__all__ = [
    # Hessian-based measures
    "hessian_trace",
    "top_eigenvalues",
    "spectral_density",
    # per-layer curvature
    "block_traces",
    "hessian_diagonal",
    "block_top_eigenvalues",
    # perturbation-based measures
    "sam_sharpness",
    "average_sharpness",
    # Gauss-Newton / Fisher and reparametrization-invariant measures
    "ggn_trace",
    "empirical_fisher_trace",
    "fisher_rao_norm",
    "relative_flatness",
    "pac_bayes_sigma",
    # SAM perturbation (pure functions on parameter dicts)
    "sam_perturbation",
    "project_perturbation",
    # tracking during training
    "SharpnessTracker",
    # results
    "SharpnessResult",
    "AverageSharpnessResult",
    "ModelEigenResult",
    "FisherRaoNorm",
    "PacBayesSigma",
    "BlockTraces",
    "HessianDiagonal",
]
