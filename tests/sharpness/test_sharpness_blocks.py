"""Per-layer curvature against dense float64 truth; diagonal estimators on dense matrices."""

from __future__ import annotations

import math

import pytest
import torch

from sharpgen import (
    ModelObjective,
    block_top_eigenvalues,
    block_traces,
    diagpp_diagonal,
    hessian_diagonal,
    hessian_trace,
    hutchinson_diagonal,
)

DT = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def problem(h):
    model = h.make_mlp(0, d=3, h=5, out=2)
    x, y = h.regression_data(12, 3, 2)
    H = h.dense_hessian(model, h.mse, x, y)
    return model, h.mse, (x, y), H


def _slices(model):
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = slice(start, start + p.numel())
        start += p.numel()
    return out


def test_block_traces_exact_match_dense_blocks_and_sum(problem, state_check):
    model, loss, data, H = problem
    check = state_check(model)
    res = block_traces(model, loss, data)
    check()
    sl = _slices(model)
    d = H.diagonal()
    assert set(res.traces) == {"0", "2"}
    for block, names in res.blocks.items():
        want = sum(float(d[sl[n]].sum()) for n in names)
        assert res.traces[block] == pytest.approx(want, rel=1e-10)
    assert res.total == pytest.approx(float(H.trace()), rel=1e-10)
    assert res.method == "exact" and all(v == 0 for v in res.stderr.values())


def test_block_traces_hutchinson_sum_to_total_with_honest_stderr(problem):
    model, loss, data, H = problem
    res = block_traces(model, loss, data, blocks="parameter", method="hutchinson",
                       num_matvecs=400, generator=_g(0))  # fmt: skip
    assert sum(res.traces.values()) == pytest.approx(res.total, rel=1e-12)
    sl = _slices(model)
    d = H.diagonal()
    for n, value in res.traces.items():
        truth = float(d[sl[n]].sum())
        assert abs(value - truth) < 4 * res.stderr[n] + 1e-12, n
    assert abs(res.total - float(H.trace())) < 4 * res.total_stderr
    # the same probes as hessian_trace's Hutchinson would use: total is a Hutchinson estimate
    assert res.total_stderr > 0


def test_block_traces_custom_blocks_and_errors(problem):
    model, loss, data, H = problem
    res = block_traces(model, loss, data, blocks={"weights": ["0.weight", "2.weight"]})
    sl = _slices(model)
    want = float(H.diagonal()[sl["0.weight"]].sum() + H.diagonal()[sl["2.weight"]].sum())
    assert res.traces["weights"] == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="not a selected parameter"):
        block_traces(model, loss, data, blocks={"x": ["nope"]})
    with pytest.raises(ValueError, match="two blocks"):
        block_traces(model, loss, data, blocks={"a": ["0.bias"], "b": ["0.bias"]})
    with pytest.raises(ValueError, match="blocks"):
        block_traces(model, loss, data, blocks="layer")


def test_hessian_diagonal_exact_and_estimated(problem):
    model, loss, data, H = problem
    exact = hessian_diagonal(model, loss, data)
    flat = torch.cat([exact.values[n].reshape(-1) for n in exact.values])
    assert torch.allclose(flat, H.diagonal(), rtol=1e-10, atol=1e-12)
    assert exact.method == "exact"
    obj = ModelObjective(model, loss, data)
    est = hessian_diagonal(obj, method="hutchinson", num_matvecs=300, generator=_g(1))
    flat = torch.cat([est.values[n].reshape(-1) for n in est.values])
    se = torch.cat([est.stderr[n].reshape(-1) for n in est.stderr])
    z = (flat - H.diagonal()).abs() / se
    assert float((z < 3).double().mean()) > 0.9  # calibrated per-entry error bars


def test_diagonal_estimators_on_dense_spectra():
    g = _g(3)
    n = 60
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    eigs = torch.cat(
        [torch.tensor([100.0, 50.0, 20.0], dtype=DT), torch.full((n - 3,), 0.1, dtype=DT)]
    )
    A = Q @ torch.diag(eigs) @ Q.T
    truth = A.diagonal()
    errs = {"hutchinson": [], "diagpp": []}
    for seed in range(5):
        h_est = hutchinson_diagonal(A, num_matvecs=30, generator=_g(seed))
        d_est = diagpp_diagonal(A, num_matvecs=30, generator=_g(seed))
        errs["hutchinson"].append(float((h_est.values - truth).norm() / truth.norm()))
        errs["diagpp"].append(float((d_est.values - truth).norm() / truth.norm()))
        assert d_est.num_matvecs == 30
    assert max(errs["diagpp"]) < 0.1 * min(errs["hutchinson"])  # the sketch captures the top 3
    # Hutchinson's per-entry variance is sum_{k != i} A_ik^2 / m
    var = ((A**2).sum(1) - truth**2) / 30
    ratio = float(h_est.stderr.pow(2).mean() / var.mean())
    assert 0.5 < ratio < 1.5


def test_block_top_eigenvalues_match_dense_blocks(problem):
    model, loss, data, H = problem
    sl = _slices(model)
    res = block_top_eigenvalues(model, loss, data, blocks="parameter", k=2, tol=1e-10,
                                generator=_g(0))  # fmt: skip
    top = float(torch.linalg.eigvalsh(H)[-1])
    for n, r in res.items():
        spectrum = torch.linalg.eigvalsh(H[sl[n], sl[n]])
        assert float(r.eigenvalues[0]) == pytest.approx(float(spectrum[-1]), rel=1e-8), n
        for value in r.eigenvalues:  # every Ritz value is an eigenvalue of the block
            assert float((spectrum - value).abs().min()) < 1e-8 * float(spectrum.abs().max())
        assert float(r.eigenvalues[0]) <= top + 1e-9  # interlacing
    module = block_top_eigenvalues(model, loss, data, tol=1e-10, generator=_g(0))
    idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in ("0.weight", "0.bias")])
    want = float(torch.linalg.eigvalsh(H[idx][:, idx])[-1])
    assert float(module["0"].eigenvalues[0]) == pytest.approx(want, rel=1e-8)


def test_trace_and_blocks_agree_with_hessian_trace(problem):
    model, loss, data, H = problem
    assert block_traces(model, loss, data).total == pytest.approx(
        hessian_trace(model, loss, data).value, rel=1e-10
    )
    assert math.isfinite(block_traces(model, loss, data, method="hutchinson", num_matvecs=4,
                                      generator=_g(0)).total)  # fmt: skip
