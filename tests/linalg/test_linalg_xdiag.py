"""XDiag against the exact diagonal in float64: unbiased, improving with budget, stderr."""

from __future__ import annotations

import pytest
import torch

from sharpgen import (
    ModelObjective,
    diagpp_diagonal,
    hessian_diagonal,
    hutchinson_diagonal,
    xdiag_diagonal,
)

DT = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def low_rank_plus_noise(n=40, top=(100.0, 50.0, 20.0, 10.0, 5.0), noise=0.3, seed=0):
    g = _g(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    tail = noise * torch.rand(n - len(top), dtype=DT, generator=g)
    lam = torch.cat([torch.tensor(top, dtype=DT), tail])
    return U @ torch.diag(lam) @ U.T


def rel_err(est, truth):
    return float((est.values - truth).norm() / truth.norm())


def test_unbiased_on_low_rank_plus_noise():
    A = low_rank_plus_noise()
    truth = A.diagonal()
    runs = torch.stack([xdiag_diagonal(A, num_matvecs=12, generator=_g(s)).values
                        for s in range(400)])  # fmt: skip
    z = (runs.mean(0) - truth) / (runs.std(0) / 20)  # error of the mean in its own units
    assert float(z.abs().max()) < 4.5  # 40 entries: no bias beyond sampling noise
    assert float(z.pow(2).mean()) < 2.0


def test_error_decreases_with_budget_and_beats_hutchinson_and_diagpp():
    A = low_rank_plus_noise()
    truth = A.diagonal()

    def mean_err(fn, m):
        return sum(rel_err(fn(A, num_matvecs=m, generator=_g(s)), truth) for s in range(30)) / 30

    x = {m: mean_err(xdiag_diagonal, m) for m in (8, 16, 32)}
    assert x[32] < 0.5 * x[16] and x[16] < 0.5 * x[8]
    assert x[16] < 0.1 * mean_err(hutchinson_diagonal, 16)
    assert x[16] < 0.8 * mean_err(diagpp_diagonal, 16)  # a rank-8 sketch, not rank-5


def test_stderr_is_roughly_calibrated():
    A = low_rank_plus_noise(noise=1.0)
    truth = A.diagonal()
    z = torch.stack([(e.values - truth) / e.stderr
                     for e in (xdiag_diagonal(A, num_matvecs=30, generator=_g(s))
                               for s in range(200))])  # fmt: skip
    rms = float(z.pow(2).mean().sqrt())
    assert 0.7 < rms < 2.0  # measured 1.5: the leave-one-out estimates are not independent
    assert float((z.abs() < 3).double().mean()) > 0.85


def test_exact_for_rank_below_half_the_budget_and_argument_errors():
    A = low_rank_plus_noise(top=(3.0, 2.0, 1.0), noise=0.0)
    est = xdiag_diagonal(A, num_matvecs=10, generator=_g(0))
    assert torch.allclose(est.values, A.diagonal(), atol=1e-12)
    assert torch.count_nonzero(est.stderr) == 0 and est.method == "xdiag"
    full = xdiag_diagonal(torch.eye(3, dtype=DT), num_matvecs=9, generator=_g(0))
    assert torch.allclose(full.values, torch.ones(3, dtype=DT)) and full.num_matvecs == 6
    with pytest.raises(ValueError, match="num_matvecs"):
        xdiag_diagonal(A, num_matvecs=3)
    state = torch.random.get_rng_state()
    xdiag_diagonal(A, num_matvecs=8, generator=_g(1))
    assert torch.equal(state, torch.random.get_rng_state())


def test_hessian_diagonal_xdiag_equals_the_dense_estimate(h, state_check):
    model = h.make_mlp(0, d=3, h=5, out=2)
    x, y = h.regression_data(12, 3, 2)
    H = h.dense_hessian(model, h.mse, x, y)
    check = state_check(model)
    est = hessian_diagonal(model, h.mse, (x, y), method="xdiag", num_matvecs=20,
                           generator=_g(4))  # fmt: skip
    check()
    want = xdiag_diagonal(H, num_matvecs=20, generator=_g(4))
    flat = torch.cat([est.values[n].reshape(-1) for n in est.values])
    se = torch.cat([est.stderr[n].reshape(-1) for n in est.stderr])
    assert torch.allclose(flat, want.values, rtol=1e-8, atol=1e-10)
    assert torch.allclose(se, want.stderr, rtol=1e-6, atol=1e-10)
    assert est.method == "xdiag" and est.num_matvecs == 20
    obj = ModelObjective(model, h.mse, (x, y))
    again = hessian_diagonal(obj, method="xdiag", num_matvecs=20, generator=_g(4))
    assert all(torch.equal(again.values[n], est.values[n]) for n in est.values)
