"""The constructions' closed-form traces through the library's generic exact Hessian trace."""

from __future__ import annotations

import math

import pytest
import torch

from sharpgen.data import complete_xor, xor_cube
from sharpgen.models import flattest_generalizer, flattest_memorizer, xor_realizer_no_bias
from sharpgen.sharpness import hessian_trace
from sharpgen.theory import interpolation_trace

F64 = torch.float64
D = 5


def mse(outputs, targets):
    return (outputs - targets).square().mean()


def _data():
    return xor_cube(D, 9, generator=torch.Generator().manual_seed(0), unique=True, dtype=F64)


CASES = {
    "bias memorizer": (
        lambda s: flattest_memorizer(s.X, s.y, "bias", width=11),
        4 * math.sqrt(D + 1),
    ),
    "bias generalizer": (
        lambda s: flattest_generalizer(D, "bias", width=6, dtype=F64),
        4 * math.sqrt(D + 1),
    ),
    "Sim-LN memorizer": (lambda s: flattest_memorizer(s.X, s.y, "simplified_ln"), 2.0),
    "Sim-LN generalizer": (lambda s: flattest_generalizer(D, "simplified_ln", dtype=F64), 2.0),
    "no-bias realizer": (lambda s: xor_realizer_no_bias(D, dtype=F64), 4 * math.sqrt(D)),
    "deep bias memorizer": (
        lambda s: flattest_memorizer(s.X, s.y, "bias", depth=3),
        6 * (D + 1) ** (1 / 3),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_hessian_trace_equals_closed_form(case):
    build, closed = CASES[case]
    data = _data()
    net = build(data)
    result = hessian_trace(net, mse, data.train, method="exact")
    assert result.value == pytest.approx(closed, rel=1e-12)
    assert result.value == pytest.approx(float(interpolation_trace(net, data.X)), rel=1e-12)


def test_exact_hessian_trace_of_the_simplified_bn_generalizer():
    data = complete_xor(D, dtype=F64)
    X = data.X
    spread = sum(0.25 * (X[k::4] - X[k::4].mean(0)).square().sum(1).mean() for k in range(4))
    net = flattest_generalizer(D, "simplified_bn", rho=2.0, reference=X, dtype=F64)
    result = hessian_trace(net, mse, data.train, method="exact")
    assert result.value == pytest.approx(8 + 2 / 4 * float(spread), rel=1e-12)
