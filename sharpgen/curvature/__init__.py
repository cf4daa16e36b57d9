"""Curvature operators of ``(model, loss_fn, data)``: Hessian and generalized Gauss-Newton.

`ModelObjective` is the dataset loss as a value (built once, shared by many measures; its
options are `ObjectiveOptions`, `as_objective` resolves either calling form). The operators
are `sharpgen.linalg.LinearOperator` subclasses computing exact matrix-free products through
`torch.func` (with a double-backward fallback) from small functional kernels
(``_kernels.py``), over one batch or a whole DataLoader, leaving the caller's model exactly
as it was.
"""

from sharpgen.curvature._attention import twice_differentiable_attention
from sharpgen.curvature._data import as_batches, num_samples
from sharpgen.curvature._flatten import flatten_params, unflatten_params
from sharpgen.curvature._ggn import GGNOperator
from sharpgen.curvature._hessian import HessianOperator
from sharpgen.curvature._model_loss import model_loss
from sharpgen.curvature._objective import ModelObjective
from sharpgen.curvature._options import ObjectiveOptions
from sharpgen.curvature._params import select_params
from sharpgen.curvature._plan import MemoryPlan, plan_memory
from sharpgen.curvature._reduce import dataset_reduce
from sharpgen.curvature._resolve import as_objective
from sharpgen.curvature._second_order import SecondDerivativeWarning
from sharpgen.curvature._sharding import shard_indices, without_sampler_padding
from sharpgen.curvature._state import apply_state_policy, model_state_policy, preserve_model_state

__all__ = [
    # operators
    "HessianOperator",
    "GGNOperator",
    # the dataset loss as a function of a parameter dict
    "ModelObjective",
    "ObjectiveOptions",
    "as_objective",
    "dataset_reduce",
    "model_loss",
    "SecondDerivativeWarning",
    # memory
    "MemoryPlan",
    "plan_memory",
    # parameters and vectors
    "select_params",
    "flatten_params",
    "unflatten_params",
    # data
    "as_batches",
    "num_samples",
    # distributed data (torch.distributed)
    "shard_indices",
    "without_sampler_padding",
    # attention through a twice-differentiable path
    "twice_differentiable_attention",
    # model state
    "preserve_model_state",
    "model_state_policy",
    "apply_state_policy",
]
