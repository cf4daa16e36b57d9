r"""Loss landscapes: the loss around a model along directions, and between two models.

`loss_landscape_1d` and `loss_landscape_2d` evaluate $L(\theta + t d)$ and
$L(\theta + x d_1 + y d_2)$ on a grid along random filter-normalized directions (Li et al.
2018), the top Hessian eigenvectors or directions of your own; `linear_interpolation`
evaluates the segment between two models (Goodfellow et al. 2015) with an explicit choice
for BatchNorm statistics. Grid points are batched through ``torch.func.vmap`` over
``torch.func.functional_call``; the model is never written to.
"""

from sharpgen.landscape._directions import (
    hessian_directions,
    normalize_direction,
    random_direction,
)
from sharpgen.landscape._interpolate import linear_interpolation
from sharpgen.landscape._results import Landscape1D, Landscape2D
from sharpgen.landscape._surface import loss_landscape_1d, loss_landscape_2d

__all__ = [
    # landscapes
    "loss_landscape_1d",
    "loss_landscape_2d",
    "linear_interpolation",
    # directions
    "random_direction",
    "normalize_direction",
    "hessian_directions",
    # results
    "Landscape1D",
    "Landscape2D",
]
