"""SAM's perturbation on a float32 parameter of 1e7 numbers has length rho (float64 truth).

torch's float32 ``vector_norm``/``dot`` on a CPU are about 1e-3 off at this length (see
`sharpgen.linalg._reduce`), which made the perturbation as much too long. Each test takes
about a second and under 1 GB.
"""

import pytest
import torch

from sharpgen.sharpness import sam_perturbation
from sharpgen.sharpness._sam_kernel import total_dot

N = 10_000_000
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _positive(n):
    """A float32 vector of ``n`` numbers in [1, 2), cheap to make."""
    return (torch.arange(n) % 997).float().div_(997).add_(1.0)


def _norm64(tensors):
    return sum(float(t.double().square().sum()) for t in tensors) ** 0.5


def test_sam_perturbation_has_length_rho():
    g = {"w": _positive(N), "b": torch.ones(10)}
    w = {"w": torch.zeros(N), "b": torch.zeros(10)}
    eps = sam_perturbation(g, w, 0.05)
    assert abs(_norm64(eps.values()) / 0.05 - 1) < TOL
    # ASAM: ||T^{-1} eps|| = rho with T = |w| + eta
    eps = sam_perturbation(g, w, 0.05, adaptive=True, eta=0.5)
    assert abs(_norm64([e / 0.5 for e in eps.values()]) / 0.05 - 1) < TOL


def test_total_dot_matches_float64():
    a = _positive(N)
    truth = float(a.double().square().sum()) + 10.0
    out = total_dot([a, torch.ones(10)], [a, torch.ones(10)])
    assert out.dtype == torch.float32
    assert abs(float(out) / truth - 1) < TOL
