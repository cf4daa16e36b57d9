"""Layer normalization of a direction for a float32 parameter of 1e7 numbers is exact.

torch's float32 ``.norm()`` on a CPU is about 1e-3 off at this length
(`sharpgen.linalg._reduce`): the direction was scaled as much wrong. About a second, < 1 GB.
"""

import pytest
import torch

from sharpgen.landscape import normalize_direction

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_layer_normalization_matches_the_parameters_norm():
    ref = (torch.arange(10_000_000) % 997).float().div_(997).add_(1.0).reshape(10_000, 1_000)
    d = ref.flip(0).mul(3.0)
    out = normalize_direction({"w": d}, {"w": ref}, "layer")["w"]
    ratio = float(out.double().square().sum()) / float(ref.double().square().sum())
    assert abs(ratio**0.5 - 1) < 1e-5
