r"""Closed-form traces and lower bounds for the two-layer nets of Wen, Li & Ma (2023).

`interpolation_trace` computes $\frac{2}{n}\sum_i \lVert \nabla_\theta f(x_i)\rVert^2$,
the Hessian trace of the MSE loss at an interpolating model; `trace_lower_bound` gives the
smallest value each architecture can reach.
"""

from sharpgen.theory._bounds import simplified_bn_norm_bound, trace_lower_bound
from sharpgen.theory._norms import memorizer_test_error, no_bias_norm, path_norm, zero_one_error
from sharpgen.theory._trace import (
    interpolation_trace,
    squared_gradient_norms,
    two_layer_interpolation_trace,
)

__all__ = [
    # traces at interpolation
    "interpolation_trace",
    "squared_gradient_norms",
    "two_layer_interpolation_trace",
    # lower bounds
    "trace_lower_bound",
    "simplified_bn_norm_bound",
    # norms and errors
    "no_bias_norm",
    "path_norm",
    "zero_one_error",
    "memorizer_test_error",
]
