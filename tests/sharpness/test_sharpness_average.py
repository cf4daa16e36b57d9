"""average_sharpness: closed forms on quadratics, statistical tests with the reported stderr."""

from __future__ import annotations

import math

import pytest
import torch

from sharpgen.sharpness import average_sharpness


def _quadratic_away_from_the_minimum(h):
    eigs = [4.0, 2.0, 1.0, 0.5, 0.25, 0.0]
    theta0 = torch.linspace(-1.0, 1.5, len(eigs), dtype=h.DT)
    return h.quadratic_problem(eigs, theta0=theta0, seed=5)


@pytest.mark.parametrize(
    ("distribution", "factor"),
    [("gaussian", 0.5), ("uniform", 1.0 / 6.0)],  # Var(N(0, rho^2)) = rho^2, Var(U) = rho^2/3
)
def test_quadratic_expectation_with_the_reported_stderr(h, distribution, factor):
    model, loss_fn, data, A = _quadratic_away_from_the_minimum(h)
    rho, N = 0.2, 400
    res = average_sharpness(model, loss_fn, data, rho, num_samples=N, distribution=distribution,
                            generator=h.g(0))  # fmt: skip
    truth = factor * rho**2 * float(A.trace())
    assert abs(res.value - truth) <= 4 * res.stderr
    # antithetic pairs on a quadratic: each sample is exactly 1/2 e^T A e, whose variance is
    # 2 rho^4 tr(A^2) / 4 (Gaussian); the reported stderr agrees with it
    if distribution == "gaussian":
        sd = math.sqrt(2 * rho**4 * float((A @ A).trace()) / 4 / N)
        assert 0.8 * sd <= res.stderr <= 1.25 * sd
    assert res.num_samples == N and res.num_loss_evals == 1 + 2 * N
    assert res.samples.shape == (N,) and res.samples.dtype == torch.float64
    assert float(res) == res.value and "AverageSharpnessResult(value=" in repr(res)


def test_antithetic_pairs_cancel_the_gradient_term(h):
    # a linear loss c^T theta: every antithetic sample is 0 up to rounding, the plain
    # Monte Carlo samples are c^T eps with variance rho^2 ||c||^2
    loss_fn, data = h.mean_loss, (torch.zeros(3, 1, dtype=h.DT), torch.zeros(3, dtype=h.DT))

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.arange(1.0, 6.0, dtype=h.DT))

        def forward(self, x):
            return (self.theta * torch.arange(1.0, 6.0, dtype=h.DT)).sum().expand(x.shape[0])

    lin = Linear()
    anti = average_sharpness(lin, loss_fn, data, 0.1, num_samples=50, generator=h.g(1))
    plain = average_sharpness(lin, loss_fn, data, 0.1, num_samples=50, antithetic=False,
                              generator=h.g(1))  # fmt: skip
    assert abs(anti.value) < 1e-12 and anti.stderr < 1e-12
    c_norm = math.sqrt(sum(i * i for i in range(1, 6)))
    assert 0.6 * 0.1 * c_norm / math.sqrt(50) <= plain.stderr <= 1.5 * 0.1 * c_norm / math.sqrt(50)
    assert abs(plain.value) <= 4 * plain.stderr
    assert plain.num_loss_evals == 51


def test_adaptive_scaling_on_a_quadratic(h):
    model, loss_fn, data, A = _quadratic_away_from_the_minimum(h)
    eta, rho = 0.1, 0.1
    t = model.theta.detach().abs() + eta
    truth = 0.5 * rho**2 * float((torch.diag(t) @ A @ torch.diag(t)).trace())
    res = average_sharpness(model, loss_fn, data, rho, num_samples=300, adaptive=True, eta=eta,
                            generator=h.g(2))  # fmt: skip
    assert abs(res.value - truth) <= 4 * res.stderr


def test_small_rho_matches_half_rho_squared_trace_on_a_network(h):
    from sharpgen.sharpness import hessian_trace

    model = h.make_mlp(3)
    data = h.regression_data(10)
    rho = 1e-3
    trace = hessian_trace(model, h.mse, data).value
    res = average_sharpness(model, h.mse, data, rho, num_samples=200, generator=h.g(3))
    # the O(rho^4) remainder is negligible at this rho next to the sampling error
    assert abs(res.value - rho**2 / 2 * trace) <= 4 * res.stderr + 1e-9 * rho**2


def test_single_sample_has_infinite_stderr(h):
    model, loss_fn, data, _ = _quadratic_away_from_the_minimum(h)
    res = average_sharpness(model, loss_fn, data, 0.1, num_samples=1, generator=h.g(0))
    assert res.stderr == math.inf and math.isfinite(res.value)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rho": -0.1}, ValueError, r"rho must be a finite number >= 0.*got -0.1"),
        ({"rho": -0.5}, ValueError, r"rho must be a finite number >= 0"),
        ({"distribution": "laplace"}, ValueError,
         r"unknown distribution 'laplace'; valid choices are 'gaussian', 'uniform'"),
        ({"num_samples": 0}, ValueError, r"num_samples must be an int >= 1, got 0"),
        ({"eta": -1.0}, ValueError, r"eta must be a finite number >= 0"),
        ({"antithetic": "yes"}, TypeError, r"antithetic must be a bool"),
    ],
)  # fmt: skip
def test_bad_input(h, kwargs, exc, match):
    model = h.make_mlp(0)
    args = {"rho": 0.1, **kwargs}
    rho = args.pop("rho")
    with pytest.raises(exc, match=match):
        average_sharpness(model, h.mse, h.regression_data(4), rho, **args)
