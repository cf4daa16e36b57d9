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
    shard_indices,
    unflatten_params,
    without_sampler_padding,
)
from sharpgen.data import (
    DataSplit,
    ball_labels,
    complete_xor,
    full_cube,
    uniform_ball,
    xor_cube,
    xor_labels,
)
from sharpgen.experiments import (
    ExperimentSpec,
    Phase,
    RunResult,
    get_preset,
    run_experiments,
    train,
)
from sharpgen.linalg import (
    EigenResult,
    LinearOperator,
    SpectralDensity,
    TraceEstimate,
    as_linear_operator,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    stochastic_lanczos_quadrature,
    xtrace,
)
from sharpgen.models import (
    DeepReLUNet,
    TwoLayerNet,
    deep_forward,
    deep_relu,
    flattest_generalizer,
    flattest_memorizer,
    two_layer_forward,
    two_layer_relu,
    xor_realizer_no_bias,
)
from sharpgen.optim import (
    GSAM,
    SAM,
    SAMStepInfo,
    ddp_sam_step,
    disable_running_stats,
    perturbed,
    sam_gradient,
)
from sharpgen.sharpness import (
    AverageSharpnessResult,
    ModelEigenResult,
    SharpnessResult,
    SharpnessTracker,
    average_sharpness,
    hessian_trace,
    project_perturbation,
    sam_perturbation,
    sam_sharpness,
    spectral_density,
    top_eigenvalues,
)
from sharpgen.theory import (
    interpolation_trace,
    memorizer_test_error,
    no_bias_norm,
    path_norm,
    simplified_bn_norm_bound,
    squared_gradient_norms,
    trace_lower_bound,
    two_layer_interpolation_trace,
    zero_one_error,
)

__all__ = [
    "__version__",
    # linear algebra (sharpgen.linalg)
    "LinearOperator",
    "as_linear_operator",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    "lanczos",
    "power_iteration",
    "stochastic_lanczos_quadrature",
    "TraceEstimate",
    "EigenResult",
    "SpectralDensity",
    # curvature operators (sharpgen.curvature)
    "HessianOperator",
    "GGNOperator",
    "ModelObjective",
    "flatten_params",
    "unflatten_params",
    "select_params",
    "preserve_model_state",
    # sharpness measures (sharpgen.sharpness)
    "hessian_trace",
    "top_eigenvalues",
    "spectral_density",
    "sam_sharpness",
    "average_sharpness",
    "SharpnessTracker",
    "SharpnessResult",
    "AverageSharpnessResult",
    "ModelEigenResult",
    "sam_perturbation",
    "project_perturbation",
    # SAM-family optimizers (sharpgen.optim)
    "SAM",
    "GSAM",
    "SAMStepInfo",
    "sam_gradient",
    "perturbed",
    "disable_running_stats",
    # distributed (torch.distributed helpers)
    "ddp_sam_step",
    "shard_indices",
    "without_sampler_padding",
    # paper models (sharpgen.models)
    "TwoLayerNet",
    "two_layer_relu",
    "two_layer_forward",
    "DeepReLUNet",
    "deep_relu",
    "deep_forward",
    "flattest_memorizer",
    "flattest_generalizer",
    "xor_realizer_no_bias",
    # paper data (sharpgen.data)
    "DataSplit",
    "xor_cube",
    "complete_xor",
    "full_cube",
    "xor_labels",
    "uniform_ball",
    "ball_labels",
    # theory (sharpgen.theory)
    "interpolation_trace",
    "squared_gradient_norms",
    "two_layer_interpolation_trace",
    "trace_lower_bound",
    "simplified_bn_norm_bound",
    "no_bias_norm",
    "path_norm",
    "zero_one_error",
    "memorizer_test_error",
    # experiments (sharpgen.experiments)
    "ExperimentSpec",
    "Phase",
    "train",
    "run_experiments",
    "get_preset",
    "RunResult",
]
