r"""SAM-family optimizers and functional SAM gradients.

`SAM` (with the ASAM, USAM and $\ell_\infty$ variants) and `GSAM` wrap any
`torch.optim.Optimizer`; `sam_gradient` computes SAM, m-SAM and 1-SAM gradients of a
functional loss with `torch.func.vmap`; `perturbed` and `disable_running_stats` are the
building blocks for custom training loops.
"""

from sharpgen.optim._batchnorm import disable_running_stats
from sharpgen.optim._bsam import BSAM
from sharpgen.optim._ddp import ddp_sam_step
from sharpgen.optim._esam import ESAM
from sharpgen.optim._fsam import FriendlySAM
from sharpgen.optim._functional import perturbed, sam_gradient
from sharpgen.optim._gsam import GSAM
from sharpgen.optim._looksam import LookSAM
from sharpgen.optim._msam import MSAM
from sharpgen.optim._sam import SAM, SAMStepInfo
from sharpgen.optim._wsam import WSAM

__all__ = [
    # optimizers
    "SAM",
    "GSAM",
    "MSAM",
    "LookSAM",
    "WSAM",
    "FriendlySAM",
    "BSAM",
    "ESAM",
    "SAMStepInfo",
    # functional forms
    "sam_gradient",
    "perturbed",
    # training-loop helpers
    "disable_running_stats",
    # distributed (DistributedDataParallel / process groups)
    "ddp_sam_step",
]
