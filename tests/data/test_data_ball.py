from __future__ import annotations

import pytest
import torch

from sharpgen.data import ball_labels, uniform_ball

F64 = torch.float64


def test_uniform_ball_shapes_labels_radius_and_determinism():
    g = torch.Generator().manual_seed(0)
    data = uniform_ball(10, 100, generator=g, test_size=30, dtype=F64)
    assert data.X.shape == (100, 10) and data.X_test.shape == (30, 10)
    assert data.X.dtype == F64 and data.y.dtype == F64
    assert bool((data.X.norm(dim=1) <= 10**0.5).all())
    torch.testing.assert_close(data.y, data.X[:, 0].abs() - data.X[:, 1].abs())
    torch.testing.assert_close(data.y_test, ball_labels(data.X_test))
    again = uniform_ball(
        10, 100, generator=torch.Generator().manual_seed(0), test_size=30, dtype=F64
    )
    assert torch.equal(again.X, data.X) and torch.equal(again.X_test, data.X_test)


def test_uniform_ball_radial_law():
    # for x uniform in the ball of radius R in d dims, (|x|/R)^d ~ U(0, 1):
    # its mean 1/2 has standard error sqrt(1/12 / n)
    d, n = 5, 20000
    data = uniform_ball(d, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = (data.X.norm(dim=1) / d**0.5) ** d
    assert abs(float(t.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    # directions are isotropic: every coordinate has mean 0 (sd of the mean ~ sqrt(E x_j^2 / n))
    var = d / (d + 2)  # E[x_j^2] = R^2 / (d + 2) with R^2 = d
    assert float(data.X.mean(0).abs().max()) < 5 * (var / n) ** 0.5
    torch.testing.assert_close(
        data.X.square().mean(0), torch.full((d,), var, dtype=F64), rtol=0, atol=0.05
    )


def test_uniform_ball_bad_input():
    with pytest.raises(ValueError, match="d must be an int >= 2, got 1"):
        uniform_ball(1, 5)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        uniform_ball(3, 0)
    with pytest.raises(ValueError, match=r"shape \(n, d\) with d >= 2"):
        ball_labels(torch.ones(3))
