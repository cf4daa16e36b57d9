"""Reliability of the measures: non-finite values in any batch, signed Gauss-Newton curvature."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpgen as sg

DT = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _batches(bad: bool = True):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, dtype=DT, generator=g), torch.randn(8, 2, dtype=DT, generator=g)
    if bad:
        x[6, 1] = float("nan")  # in the second batch only
    return [(x[:4], y[:4]), (x[4:], y[4:])]


mse = nn.functional.mse_loss

LATER_BATCH = {
    "empirical_fisher_trace": lambda m, d: sg.empirical_fisher_trace(m, mse, d),
    "empirical_fisher_chunks": lambda m, d: sg.empirical_fisher_trace(m, mse, d, chunk_size=1),
    "ggn_trace": lambda m, d: sg.ggn_trace(m, mse, d, method="exact"),
    "fisher_rao_ggn": lambda m, d: sg.fisher_rao_norm(m, mse, d),
    "fisher_rao_empirical": lambda m, d: sg.fisher_rao_norm(m, mse, d, fisher="empirical"),
    "hessian_trace": lambda m, d: sg.hessian_trace(m, mse, d, method="exact"),
    "block_traces": lambda m, d: sg.block_traces(m, mse, d),
    "hessian_diagonal": lambda m, d: sg.hessian_diagonal(m, mse, d),
    "relative_flatness": lambda m, d: sg.relative_flatness(m, mse, d, layer="2"),
}


@pytest.mark.parametrize("name", list(LATER_BATCH))
def test_non_finite_value_in_a_later_batch_raises(state_check, name):
    model = _mlp()
    LATER_BATCH[name](model, _batches(bad=False))  # finite data: a number
    check = state_check(model)
    with pytest.raises(FloatingPointError, match="not finite|NaN or Inf"):
        LATER_BATCH[name](model, _batches())
    check()


def test_empirical_fisher_names_the_batch():
    with pytest.raises(FloatingPointError, match="batch 1"):
        sg.empirical_fisher_trace(_mlp(), mse, _batches())


def _concave(out, y):
    """A loss concave in the outputs: its Gauss-Newton matrix is negative semi-definite."""
    return -((out - y) ** 2).mean()


def test_fisher_rao_norm_refuses_a_negative_curvature_and_ggn_trace_reports_it():
    model, data = _mlp(), _batches(bad=False)
    trace = sg.ggn_trace(model, _concave, data, method="exact")
    assert trace.value < 0  # the signed value
    with pytest.raises(ValueError, match=r"theta\^T G theta = -.*not convex in the model outputs"):
        sg.fisher_rao_norm(model, _concave, data)
    # the empirical Fisher is a sum of squares: defined for any loss
    emp = sg.fisher_rao_norm(model, _concave, data, fisher="empirical")
    assert emp.squared > 0 and emp.value == pytest.approx(emp.squared**0.5)


def test_fisher_rao_norm_is_exact_and_signed_value_kept_for_a_convex_loss():
    model, data = _mlp(), _batches(bad=False)
    x = torch.cat([b[0] for b in data])
    theta = dict(model.named_parameters())

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    _, jt = torch.func.jvp(f, ({n: p.detach() for n, p in theta.items()},),
                           ({n: p.detach() for n, p in theta.items()},))  # fmt: skip
    want = float(2 * (jt**2).sum() / jt.numel())  # MSE: H_l = 2/(n k) I
    res = sg.fisher_rao_norm(model, mse, data)
    assert res.squared == pytest.approx(want, rel=1e-10)
    assert res.value == pytest.approx(want**0.5, rel=1e-10)
