"""sharpgen: measure and minimize the sharpness of neural-network loss landscapes.

The public API is re-exported here, grouped by layer; the implementation lives in private
``_modules`` of the subpackages `sharpgen.linalg`, `sharpgen.curvature`,
`sharpgen.sharpness`, `sharpgen.landscape`, `sharpgen.optim`, `sharpgen.models`,
`sharpgen.data`, `sharpgen.theory` and `sharpgen.experiments`.

The names are imported lazily (PEP 562): ``import sharpgen`` itself imports neither PyTorch nor
any subpackage, so the ``sharpgen`` command line answers ``--help`` and ``--version`` at
once; the first public name used (``sharpgen.hessian_trace``, ``from sharpgen import SAM``)
imports the subpackages, as ``import sharpgen`` did before. ``sharpgen.<subpackage>`` works
without importing it first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sharpgen._version import __version__

if TYPE_CHECKING:  # what the names are, for type checkers; at run time see __getattr__
    from sharpgen.curvature import (
        GGNOperator,
        HessianOperator,
        MemoryPlan,
        ModelObjective,
        ObjectiveOptions,
        as_objective,
        flatten_params,
        model_loss,
        plan_memory,
        preserve_model_state,
        select_params,
        shard_indices,
        twice_differentiable_attention,
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
    from sharpgen.landscape import (
        Landscape1D,
        Landscape2D,
        hessian_directions,
        linear_interpolation,
        loss_landscape_1d,
        loss_landscape_2d,
        normalize_direction,
        random_direction,
    )
    from sharpgen.linalg import (
        DiagonalEstimate,
        EigenResult,
        LinearOperator,
        SpectralDensity,
        TraceEstimate,
        as_linear_operator,
        diagpp_diagonal,
        exact_diagonal,
        hutchinson_diagonal,
        hutchinson_trace,
        hutchpp_trace,
        lanczos,
        power_iteration,
        stochastic_lanczos_quadrature,
        xdiag_diagonal,
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
        BSAM,
        ESAM,
        GSAM,
        MSAM,
        SAM,
        WSAM,
        FriendlySAM,
        LookSAM,
        SAMStepInfo,
        ddp_sam_step,
        disable_running_stats,
        perturbed,
        sam_gradient,
    )
    from sharpgen.sharpness import (
        AverageSharpnessResult,
        BlockTraces,
        FisherRaoNorm,
        HessianDiagonal,
        ModelEigenResult,
        PacBayesSigma,
        SharpnessResult,
        SharpnessTracker,
        average_sharpness,
        block_top_eigenvalues,
        block_traces,
        empirical_fisher_trace,
        fisher_rao_norm,
        ggn_trace,
        hessian_diagonal,
        hessian_trace,
        pac_bayes_sigma,
        project_perturbation,
        relative_flatness,
        sam_perturbation,
        sam_sharpness,
        spectral_density,
        top_eigenvalues,
    )
    from sharpgen.study import (
        StopRule,
        StudyAnalysis,
        StudyResult,
        StudySpec,
        StudyTable,
        TrainedModel,
        analyze,
        measure_models,
        run_study,
        write_report,
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
    "exact_diagonal",
    "hutchinson_diagonal",
    "diagpp_diagonal",
    "xdiag_diagonal",
    "lanczos",
    "power_iteration",
    "stochastic_lanczos_quadrature",
    "TraceEstimate",
    "EigenResult",
    "SpectralDensity",
    "DiagonalEstimate",
    # curvature operators (sharpgen.curvature)
    "HessianOperator",
    "GGNOperator",
    "ModelObjective",
    "ObjectiveOptions",
    "as_objective",
    "model_loss",
    "flatten_params",
    "unflatten_params",
    "select_params",
    "preserve_model_state",
    "twice_differentiable_attention",
    "MemoryPlan",
    "plan_memory",
    # sharpness measures (sharpgen.sharpness)
    "hessian_trace",
    "top_eigenvalues",
    "spectral_density",
    "sam_sharpness",
    "average_sharpness",
    "ggn_trace",
    "empirical_fisher_trace",
    "fisher_rao_norm",
    "relative_flatness",
    "pac_bayes_sigma",
    "block_traces",
    "hessian_diagonal",
    "block_top_eigenvalues",
    "SharpnessTracker",
    "SharpnessResult",
    "AverageSharpnessResult",
    "ModelEigenResult",
    "FisherRaoNorm",
    "PacBayesSigma",
    "BlockTraces",
    "HessianDiagonal",
    "sam_perturbation",
    "project_perturbation",
    # loss landscapes (sharpgen.landscape)
    "loss_landscape_1d",
    "loss_landscape_2d",
    "linear_interpolation",
    "random_direction",
    "normalize_direction",
    "hessian_directions",
    "Landscape1D",
    "Landscape2D",
    # SAM-family optimizers (sharpgen.optim)
    "SAM",
    "GSAM",
    "MSAM",
    "LookSAM",
    "WSAM",
    "FriendlySAM",
    "BSAM",
    "ESAM",
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
    # studies of generalization (sharpgen.study)
    "TrainedModel",
    "StudyTable",
    "measure_models",
    "analyze",
    "StudyAnalysis",
    "write_report",
    "StudySpec",
    "StopRule",
    "run_study",
    "StudyResult",
]

# the subpackages that hold the names of __all__, in import order (the layers, bottom up)
_SOURCES = (
    "linalg",
    "curvature",
    "sharpness",
    "landscape",
    "optim",
    "models",
    "data",
    "theory",
    "experiments",
    "study",
)


def _load_public_names() -> None:
    """Import the subpackages of `_SOURCES` and bind every name of ``__all__`` here."""
    modules = [importlib.import_module(f"sharpgen.{sub}") for sub in _SOURCES]
    for name in __all__:
        if name in globals():
            continue
        for module in modules:
            if hasattr(module, name):
                globals()[name] = getattr(module, name)
                break


def __getattr__(name: str) -> Any:
    """A public name (imported on first use) or a subpackage such as ``sharpgen.linalg``."""
    if name in __all__:
        _load_public_names()
        if name in globals():
            return globals()[name]
    elif not name.startswith("_"):
        try:
            return importlib.import_module(f"sharpgen.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"sharpgen.{name}":
                raise  # the subpackage exists but needs a missing package: say which
    raise AttributeError(f"module 'sharpgen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
