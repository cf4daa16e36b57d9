"""Matrix-free linear algebra: the operator protocol and the estimators built on it.

Every estimator takes a dense symmetric tensor, a `LinearOperator` (such as the
curvature operators of `sharpgen.curvature`) or a matvec callable.
"""

from sharpgen.linalg._operator import LinearOperator, as_linear_operator

__all__ = [
    # operator protocol
    "LinearOperator",
    "as_linear_operator",
]
