"""Matrix-free linear algebra: the operator protocol and the estimators built on it.

Every estimator takes a dense symmetric tensor, a `LinearOperator` (such as the
curvature operators of `sharpgen.curvature`) or a matvec callable.
"""

from sharpgen.linalg._hutchinson import hutchinson_trace
from sharpgen.linalg._lanczos import lanczos
from sharpgen.linalg._operator import LinearOperator, as_linear_operator
from sharpgen.linalg._results import EigenResult, SpectralDensity, TraceEstimate

__all__ = [
    # operator protocol
    "LinearOperator",
    "as_linear_operator",
    # trace estimators
    "hutchinson_trace",
    # eigenvalues
    "lanczos",
    # results
    "EigenResult",
    "SpectralDensity",
    "TraceEstimate",
]
