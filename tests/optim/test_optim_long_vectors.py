"""SAM's step on a float32 parameter of 1e7 numbers moves the weights by exactly rho.

torch's float32 norms on a CPU are about 1e-3 off at this length (`sharpgen.linalg._reduce`);
the perturbation was as much too long. About a second and under 1 GB.
"""

import pytest
import torch

from sharpgen.optim import SAM

N = 10_000_000


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_sam_first_step_moves_by_rho():
    p = torch.nn.Parameter(torch.zeros(N))
    q = torch.nn.Parameter(torch.zeros(10))
    p.grad = (torch.arange(N) % 997).float().div_(997).add_(1.0)
    q.grad = torch.ones(10)
    opt = SAM([p, q], torch.optim.SGD, rho=0.05, lr=0.1)
    assert opt.first_step()
    moved = float(p.detach().double().square().sum()) + float(q.detach().double().square().sum())
    assert abs(moved**0.5 / 0.05 - 1) < 1e-5
