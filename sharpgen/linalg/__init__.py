"""Matrix-free linear algebra: the operator protocol and the estimators built on it.

Every estimator takes a dense symmetric tensor, a `LinearOperator` (such as the
curvature operators of `sharpgen.curvature`) or a matvec callable.
"""

from sharpgen.linalg._diagonal import (
    DiagonalEstimate,
    diagpp_diagonal,
    exact_diagonal,
    hutchinson_diagonal,
    xdiag_diagonal,
)
from sharpgen.linalg._hutchinson import hutchinson_trace
from sharpgen.linalg._hutchpp import hutchpp_trace
from sharpgen.linalg._lanczos import lanczos
from sharpgen.linalg._operator import LinearOperator, as_linear_operator
from sharpgen.linalg._power import power_iteration
from sharpgen.linalg._results import EigenResult, SpectralDensity, TraceEstimate
from sharpgen.linalg._slq import stochastic_lanczos_quadrature
from sharpgen.linalg._trace import trace
from sharpgen.linalg._xtrace import xtrace

__all__ = [
    # operator protocol
    "LinearOperator",
    "as_linear_operator",
    # trace estimators
    "trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    # diagonal estimators
    "exact_diagonal",
    "hutchinson_diagonal",
    "diagpp_diagonal",
    "xdiag_diagonal",
    # eigenvalues
    "lanczos",
    "power_iteration",
    # spectral density
    "stochastic_lanczos_quadrature",
    # results
    "EigenResult",
    "SpectralDensity",
    "TraceEstimate",
    "DiagonalEstimate",
]
