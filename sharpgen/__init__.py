"""sharpgen: measure and minimize the sharpness of neural-network loss landscapes.

The public API is re-exported here, grouped by layer; the implementation lives in private
``_modules`` of the subpackages `sharpgen.linalg`, `sharpgen.curvature`,
`sharpgen.sharpness`, `sharpgen.optim`, `sharpgen.models`, `sharpgen.data`,
`sharpgen.theory` and `sharpgen.experiments`.
"""

from sharpgen._version import __version__
from sharpgen.curvature import (
    GGNOperator,
    HessianOperator,
    ModelObjective,
    flatten_params,
    preserve_model_state,
    select_params,
    unflatten_params,
)
from sharpgen.linalg import LinearOperator, as_linear_operator

__all__ = [
    "__version__",
    # linear algebra (sharpgen.linalg)
    "LinearOperator",
    "as_linear_operator",
    # curvature operators (sharpgen.curvature)
    "HessianOperator",
    "GGNOperator",
    "ModelObjective",
    "flatten_params",
    "unflatten_params",
    "select_params",
    "preserve_model_state",
]
