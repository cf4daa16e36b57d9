"""Sharpness measures: the quantities users call on (model, loss, data).

Only the pure SAM perturbation and its projections are here so far; the Hessian-based
measures and the worst-case / average-case sharpness are added by the sharpness layer.
"""

from sharpgen.sharpness._perturbation import project_perturbation, sam_perturbation

__all__ = [
    # SAM perturbation (pure functions on parameter dicts)
    "project_perturbation",
    "sam_perturbation",
]
