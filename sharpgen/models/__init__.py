"""Two-layer (and deep) ReLU networks of Wen, Li & Ma (2023) and their flattest constructions.

Every model is an ordinary `torch.nn.Module` with stable parameter names (``W1``, ``b1``,
``gamma``, ``W2``; ``W1, b1, W2, ..., WD`` for deep nets) and a pure functional form that can
be ``vmap``-ed over the stacked parameters of many runs.
"""

from sharpgen.models._constructions import (
    flattest_generalizer,
    flattest_memorizer,
    xor_realizer_no_bias,
)
from sharpgen.models._deep import DeepReLUNet, deep_forward, deep_relu
from sharpgen.models._two_layer import TwoLayerNet, two_layer_forward, two_layer_relu

__all__ = [
    # two-layer networks
    "TwoLayerNet",
    "two_layer_relu",
    "two_layer_forward",
    # deep networks (bias in the first layer only)
    "DeepReLUNet",
    "deep_relu",
    "deep_forward",
    # flattest constructions
    "flattest_memorizer",
    "flattest_generalizer",
    "xor_realizer_no_bias",
]
