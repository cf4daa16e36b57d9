"""sam_sharpness: the SAM step exactly, ascent, constraints, closed forms, m-sharpness."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharpgen.curvature import ModelObjective, flatten_params
from sharpgen.sharpness import sam_perturbation, sam_sharpness

FAST = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _constraint(eps: dict, params: dict, norm: str, adaptive: bool, eta: float) -> float:
    """||T^{-1} eps||_p (coordinates with t = 0 must have eps = 0)."""
    e = flatten_params(eps)
    w = flatten_params(params).detach()
    t = (w.abs() + eta) if adaptive else torch.ones_like(w)
    assert torch.all(e[t == 0] == 0)
    u = e[t > 0] / t[t > 0]
    return float(u.abs().max()) if norm == "linf" else float(torch.linalg.vector_norm(u))


def test_one_step_is_exactly_the_sam_loss_increase(h):
    model = h.make_mlp(1)
    data = h.regression_data(10)
    for norm, adaptive in [("l2", False), ("linf", False), ("l2", True)]:
        res = sam_sharpness(model, h.mse, data, 0.05, norm=norm, adaptive=adaptive, eta=0.01)
        obj = ModelObjective(model, h.mse, data)
        loss0, grad = obj.loss_and_gradient()
        eps = sam_perturbation(grad, obj.params, 0.05, norm=norm, adaptive=adaptive, eta=0.01)
        loss1 = obj.loss({n: t + eps[n] for n, t in obj.params.items()})
        assert res.value == float(loss1 - loss0)
        assert res.loss == float(loss0) and res.perturbed_loss == float(loss1)
        for name in eps:
            assert torch.equal(res.perturbation[name], eps[name])
        assert res.num_gradient_evals == 1 and res.num_loss_evals == 1
        assert res.chunk_values.shape == (1,) and res.m is None
        assert float(res) == res.value and f"norm={norm!r}" in repr(res)


@FAST
@given(
    rho=st.floats(1e-3, 2.0),
    norm=st.sampled_from(["l2", "linf"]),
    adaptive=st.booleans(),
    eta=st.sampled_from([0.0, 0.05]),
    seed=st.integers(0, 5),
)
def test_multi_step_never_below_one_step_and_feasible(h, rho, norm, adaptive, eta, seed):
    model = h.make_mlp(seed)
    with torch.no_grad():  # a zero weight exercises the degenerate adaptive coordinates
        model[0].weight[0, 0] = 0.0
    data = h.regression_data(8, seed=seed + 10)
    kw = {"norm": norm, "adaptive": adaptive, "eta": eta}
    one = sam_sharpness(model, h.mse, data, rho, **kw)
    many = sam_sharpness(model, h.mse, data, rho, steps=4, restarts=1, generator=h.g(seed), **kw)
    assert many.value >= one.value
    assert many.num_gradient_evals == 4 + 4 and many.num_loss_evals == 2
    params = dict(model.named_parameters())
    for res in (one, many):
        assert _constraint(res.perturbation, params, norm, adaptive, eta) <= rho * (1 + 1e-12)
        assert res.perturbed_loss - res.loss == pytest.approx(res.value, abs=1e-12)


def test_quadratic_minimum_l2_equals_rho2_lambda_max_over_2(h):
    eigs = [5.0, 3.0, 1.0, 0.5, 0.0]
    model, loss_fn, data, A = h.quadratic_problem(eigs)
    for rho in (0.3, 1e-2):
        # zero gradient: the SAM step is zero, the restart finds the top eigenvector
        plain = sam_sharpness(model, loss_fn, data, rho)
        assert plain.value == 0.0
        res = sam_sharpness(model, loss_fn, data, rho, steps=80, restarts=1, generator=h.g(0))
        assert res.value == pytest.approx(rho**2 * max(eigs) / 2, rel=1e-8)


def test_quadratic_minimum_linf_diagonal_closed_form(h):
    # max over the box of 1/2 e^T A e, A diagonal PSD: every corner, rho^2 tr(A) / 2
    eigs = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=h.DT)
    model = h.Quadratic(torch.diag(eigs), torch.zeros(4, dtype=h.DT))
    data = (torch.zeros(3, 1, dtype=h.DT), torch.zeros(3, dtype=h.DT))
    rho = 0.1
    res = sam_sharpness(model, h.mean_loss, data, rho, norm="linf", steps=12, restarts=1,
                        generator=h.g(1))  # fmt: skip
    assert res.value == pytest.approx(rho**2 * float(eigs.sum()) / 2, rel=1e-12)


def test_quadratic_minimum_linf_never_beats_the_best_vertex(h):
    model, loss_fn, data, A = h.quadratic_problem([3.0, 2.0, 1.0, 0.1], seed=3)
    rho = 0.2
    best = (
        max(
            float(torch.tensor(s, dtype=h.DT) @ A @ torch.tensor(s, dtype=h.DT))
            for s in itertools.product([-1.0, 1.0], repeat=4)
        )
        * rho**2
        / 2
    )
    res = sam_sharpness(model, loss_fn, data, rho, norm="linf", steps=10, restarts=3,
                        generator=h.g(0))  # fmt: skip
    assert res.value <= best * (1 + 1e-12)
    assert res.value >= rho**2 * 3.0 / 2 * (1 - 1e-9)  # >= the inscribed ball's maximum


def test_small_rho_limit_at_a_non_quadratic_minimum(h):
    # L = 1/2 t^T A t + c ||t||^4: worst case = rho^2 lambda_max / 2 + c rho^4 (top eigvec)
    eigs = [2.0, 1.0, 0.25]
    model, loss_fn, data, _ = h.quadratic_problem(eigs, quartic=0.7)
    for rho in (0.1, 0.01):
        res = sam_sharpness(model, loss_fn, data, rho, steps=60, restarts=1, generator=h.g(2))
        leading = rho**2 * 2.0 / 2
        assert res.value == pytest.approx(leading + 0.7 * rho**4, rel=1e-8)
        assert abs(res.value / leading - 1) <= 0.7 * rho**2 / 1.0 + 1e-8


def test_m_sharpness_averages_the_chunk_attacks(h):
    model = h.make_mlp(2)
    x, y = h.regression_data(6, seed=4)
    kw = {"steps": 2, "norm": "l2"}
    res = sam_sharpness(model, h.mse, (x, y), 0.1, m=2, **kw)
    chunks = [
        sam_sharpness(model, h.mse, (x[i : i + 2], y[i : i + 2]), 0.1, **kw) for i in (0, 2, 4)
    ]
    torch.testing.assert_close(
        res.chunk_values,
        torch.tensor([c.value for c in chunks], dtype=torch.float64),
        rtol=0,
        atol=0,
    )
    assert res.value == pytest.approx(sum(c.value for c in chunks) / 3, rel=1e-14)
    assert res.loss == pytest.approx(float(h.mse(model(x).detach(), y)), rel=1e-12)
    assert isinstance(res.perturbation, list) and len(res.perturbation) == 3
    for eps, c in zip(res.perturbation, chunks, strict=True):
        for name in eps:
            assert torch.equal(eps[name], c.perturbation[name])
    assert res.num_gradient_evals == 3 * 2 and res.num_loss_evals == 3
    # m = n is plain sharpness; uneven batches are concatenated before chunking
    full = sam_sharpness(model, h.mse, (x, y), 0.1, m=6, **kw)
    assert full.value == sam_sharpness(model, h.mse, (x, y), 0.1, **kw).value
    batched = sam_sharpness(model, h.mse, [(x[:5], y[:5]), (x[5:], y[5:])], 0.1, m=2, **kw)
    torch.testing.assert_close(batched.chunk_values, res.chunk_values, rtol=0, atol=0)
    light = sam_sharpness(model, h.mse, (x, y), 0.1, m=2, return_perturbation=False, **kw)
    assert light.perturbation is None and light.value == res.value


def test_m_sharpness_one_per_example_matches_the_closed_form_on_a_linear_model(h):
    # per-example l2 SAM on a linear model with squared error: the loss increase is
    # (|r_i| + rho ||x_i||)^2 - r_i^2 for residual r_i and input x_i (exact, no bias)
    g = h.g(7)
    x = torch.randn(4, 3, dtype=h.DT, generator=g)
    y = torch.randn(4, 1, dtype=h.DT, generator=g)
    model = torch.nn.Linear(3, 1, bias=False).to(h.DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 3, dtype=h.DT, generator=g))
    rho = 0.3
    res = sam_sharpness(model, h.mse, (x, y), rho, m=1)
    r = (model(x) - y).detach().squeeze(1)
    truth = (r.abs() + rho * torch.linalg.vector_norm(x, dim=1)) ** 2 - r**2
    torch.testing.assert_close(res.chunk_values, truth, rtol=1e-12, atol=1e-14)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rho": -0.1}, ValueError, r"rho must be a finite number >= 0.*got -0.1"),
        ({"rho": -1.0}, ValueError, r"rho must be a finite number >= 0"),
        ({"rho": float("nan")}, ValueError, r"rho must be a finite number >= 0"),
        ({"norm": "l1"}, ValueError, r"unknown norm 'l1'; valid choices are 'l2', 'linf'"),
        ({"steps": 0}, ValueError, r"steps must be an int >= 1, got 0"),
        ({"steps": 1.5}, TypeError, r"steps must be an int"),
        ({"restarts": -1}, ValueError, r"restarts must be an int >= 0"),
        ({"step_size": 0.0}, ValueError, r"step_size must be a finite number > 0"),
        ({"eta": -0.1}, ValueError, r"eta must be a finite number >= 0"),
        ({"m": 4}, ValueError, r"m=4 does not divide the number of samples n=6; .* \[1, 2, 3, 6\]"),
        ({"m": 7}, ValueError, r"m=7 exceeds the number of samples n=6"),
        ({"m": 0}, ValueError, r"m must be an int >= 1"),
        ({"adaptive": 1}, TypeError, r"adaptive must be a bool"),
        ({"generator": 0}, TypeError, r"generator must be a torch.Generator"),
    ],
)
def test_bad_input(h, kwargs, exc, match):
    model = h.make_mlp(0)
    data = h.regression_data(6)
    args = {"rho": 0.1, **kwargs}
    rho = args.pop("rho")
    with pytest.raises(exc, match=match):
        sam_sharpness(model, h.mse, data, rho, **args)


def test_bad_data_kind(h):
    with pytest.raises(TypeError, match="data must be one"):
        sam_sharpness(h.make_mlp(0), h.mse, 3.0, 0.1)


def test_nan_loss_raises_floating_point_error(h, state_check):
    model = h.make_mlp(0)
    x, y = h.regression_data(6)
    check = state_check(model)
    with pytest.raises(FloatingPointError):
        sam_sharpness(model, h.mse, (x, y * math.nan), 0.1)
    check()
