"""Hypothesis property tests: symmetry and linearity of the curvature products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sharpgen.curvature import GGNOperator, HessianOperator

DT = torch.float64
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def operators():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = model.to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, dtype=DT, generator=g)
    y = torch.randint(0, 3, (9,), generator=g)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    return {
        "hessian-func": HessianOperator(model, F.cross_entropy, batches, backend="func"),
        "hessian-autograd": HessianOperator(model, F.cross_entropy, batches, backend="autograd"),
        "ggn-func": GGNOperator(model, F.cross_entropy, batches, backend="func"),
    }


def _vec(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["hessian-func", "hessian-autograd", "ggn-func"])
@SETTINGS
@given(s1=st.integers(0, 2**31 - 1), s2=st.integers(0, 2**31 - 1))
def test_symmetry(operators, name, s1, s2):
    A = operators[name]
    n = A.shape[0]
    v, w = _vec(s1, n), _vec(s2, n)
    lhs, rhs = v @ (A @ w), w @ (A @ v)
    assert abs(lhs - rhs) <= 1e-12 * (v.norm() * w.norm() * 10)


@pytest.mark.parametrize("name", ["hessian-func", "ggn-func"])
@SETTINGS
@given(
    s1=st.integers(0, 2**31 - 1),
    s2=st.integers(0, 2**31 - 1),
    a=st.floats(-5, 5, allow_nan=False),
    b=st.floats(-5, 5, allow_nan=False),
)
def test_linearity_and_block_consistency(operators, name, s1, s2, a, b):
    A = operators[name]
    n = A.shape[0]
    v, w = _vec(s1, n), _vec(s2, n)
    combo = A @ (a * v + b * w)
    block = A.matmat(torch.stack([v, w], 1))
    expected = a * block[:, 0] + b * block[:, 1]
    scale = (abs(a) + abs(b) + 1) * block.abs().max()
    assert (combo - expected).abs().max() <= 1e-12 * scale
