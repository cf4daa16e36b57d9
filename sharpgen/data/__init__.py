"""The data of Wen, Li & Ma (2023): xor on the hypercube, complete sets, the uniform ball.

Every generator returns a `DataSplit` (training tensors plus an optional test set) in the
requested dtype, drawing randomness only from its ``generator`` argument.
"""

from sharpgen.data._ball import ball_labels, uniform_ball
from sharpgen.data._split import DataSplit
from sharpgen.data._xor import complete_xor, full_cube, xor_cube, xor_labels

__all__ = [
    # result type
    "DataSplit",
    # xor on the hypercube
    "xor_cube",
    "complete_xor",
    "full_cube",
    "xor_labels",
    # uniform ball (appendix)
    "uniform_ball",
    "ball_labels",
]
