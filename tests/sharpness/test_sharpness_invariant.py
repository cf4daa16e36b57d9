"""Reparametrization-invariant measures: closed forms, dense truth and ReLU rescaling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sharpgen
from sharpgen import (
    ModelObjective,
    average_sharpness,
    empirical_fisher_trace,
    fisher_rao_norm,
    ggn_trace,
    hessian_trace,
    pac_bayes_sigma,
    relative_flatness,
    sam_sharpness,
)

DT = torch.float64
mse = nn.functional.mse_loss


def _g(seed):
    return torch.Generator().manual_seed(seed)


def relu_net(seed=0):
    g = _g(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    model = model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=DT, generator=g) * 0.7)
    return model


def data(n=16, seed=1):
    g = _g(seed)
    return torch.randn(n, 3, dtype=DT, generator=g), torch.randn(n, 2, dtype=DT, generator=g)


def rescaled(model, a):
    """Layer 1 (weight and bias) times a, layer 2's weight divided by a: same function."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[0].weight.mul_(a)
        out[0].bias.mul_(a)
        out[2].weight.div_(a)
    return out


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


@pytest.fixture(scope="module")
def pair():
    m = relu_net()
    return m, rescaled(m, 3.0), data()


def test_rescaling_keeps_function_and_changes_trace(pair):
    m, m3, (x, y) = pair
    assert torch.allclose(m(x), m3(x), atol=1e-12)
    t1, t3 = hessian_trace(m, mse, (x, y)).value, hessian_trace(m3, mse, (x, y)).value
    assert rel(t1, t3) > 0.3  # the trace is NOT invariant


@pytest.mark.parametrize(
    "measure",
    [
        lambda m, d: fisher_rao_norm(m, mse, d).value,
        lambda m, d: fisher_rao_norm(m, mse, d, fisher="empirical").value,
        lambda m, d: relative_flatness(m, mse, d, layer="0").value,
        lambda m, d: relative_flatness(m, mse, d, layer="2.weight").value,
        lambda m, d: (
            average_sharpness(
                m, mse, d, rho=0.05, adaptive=True, num_samples=8, generator=_g(3)
            ).value
        ),  # fmt: skip
        lambda m, d: sam_sharpness(m, mse, d, rho=0.05, adaptive=True, steps=3).value,
        lambda m, d: (
            pac_bayes_sigma(
                m,
                mse,
                d,
                target=0.05,
                magnitude_aware=True,
                eps=0.0,
                num_samples=4,
                max_samples=8,
                generator=_g(4),
            ).sigma
        ),  # fmt: skip
    ],
    ids=[
        "fr-ggn",
        "fr-empirical",
        "relflat-layer0",
        "relflat-layer2",
        "adaptive-average",
        "adaptive-worst",
        "pacbayes-magnitude",
    ],  # fmt: skip
)
def test_invariant_measures_survive_relu_rescaling(pair, measure):
    m, m3, d = pair
    assert rel(measure(m, d), measure(m3, d)) < 1e-7


def test_isotropic_pac_bayes_is_not_invariant(pair):
    m, m3, d = pair
    kw = {"target": 0.05, "num_samples": 4, "max_samples": 8}
    s1 = pac_bayes_sigma(m, mse, d, generator=_g(4), **kw).sigma
    s3 = pac_bayes_sigma(m3, mse, d, generator=_g(4), **kw).sigma
    assert rel(s1, s3) > 0.05


# -- closed forms and dense truth -----------------------------------------------------------
def tanh_net(seed=0):
    g = _g(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=DT, generator=g))
    return model


def jacobians(model, x):
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = sharpgen.flatten_params(params)

    def f(v):
        out = torch.func.functional_call(model, sharpgen.unflatten_params(v, params), (x,))
        return out

    return flat, torch.func.jacrev(f)(flat)  # (n, out, p)


def test_ggn_trace_and_fr_norm_match_dense_jacobians():
    model, (x, y) = tanh_net(), data(8)
    flat, J = jacobians(model, x)
    n, c = y.shape
    G = 2.0 / (n * c) * torch.einsum("nop,noq->pq", J, J)  # MSE mean over n*c entries
    assert ggn_trace(model, mse, (x, y)).value == pytest.approx(float(G.trace()), rel=1e-10)
    fr = fisher_rao_norm(model, mse, (x, y))
    assert fr.squared == pytest.approx(float(flat @ G @ flat), rel=1e-10)
    # two batches give the same dataset quantity
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    assert ggn_trace(model, mse, batches).value == pytest.approx(float(G.trace()), rel=1e-10)


def test_empirical_fisher_matches_per_sample_gradients():
    model, (x, y) = tanh_net(1), data(6)
    params = dict(model.named_parameters())
    grads = []
    for i in range(6):
        g = torch.autograd.grad(mse(model(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    Gs = torch.stack(grads)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    want_trace = float((Gs**2).sum(1).mean())
    got = empirical_fisher_trace(model, mse, [(x[:4], y[:4]), (x[4:], y[4:])], chunk_size=3)
    assert got.value == pytest.approx(want_trace, rel=1e-12)
    assert empirical_fisher_trace(model, mse, (x, y), reduction="sum").value == pytest.approx(
        6 * want_trace, rel=1e-12
    )
    fr = fisher_rao_norm(model, mse, (x, y), fisher="empirical")
    assert fr.squared == pytest.approx(float(((Gs @ flat) ** 2).mean()), rel=1e-12)


def test_homogeneous_net_fr_norm_is_euler_formula():
    """Two-layer bias-free ReLU net is 2-homogeneous: <theta, grad f> = 2 f."""
    g = _g(5)
    model = nn.Sequential(nn.Linear(3, 7, bias=False), nn.ReLU(), nn.Linear(7, 1, bias=False))
    model = model.to(DT)
    x = torch.randn(10, 3, dtype=DT, generator=g)
    y = torch.randn(10, 1, dtype=DT, generator=g)
    f = model(x).detach()
    got = fisher_rao_norm(model, mse, (x, y)).squared
    assert got == pytest.approx(float((8 * f**2).mean()), rel=1e-10)
    emp = fisher_rao_norm(model, mse, (x, y), fisher="empirical").squared
    assert emp == pytest.approx(float(((2 * (f - y) * 2 * f) ** 2).mean()), rel=1e-10)


def test_relative_flatness_matches_dense_layer_hessian():
    model, (x, y) = tanh_net(2), data(9)
    W = model[0].weight.detach()

    def f(w):
        return mse(torch.func.functional_call(model, {"0.weight": w}, (x,)), y)

    H = torch.func.hessian(f)(W).detach()  # (4, 3, 4, 3)
    # kappa = sum_{s,s'} <w_s, w_s'> sum_k H[s,k,s',k]
    tr_blocks = torch.einsum("skzk->sz", H)
    want = float(((W @ W.T) * tr_blocks).sum())
    got = relative_flatness(model, mse, (x, y), layer="0")
    assert got.method == "exact" and got.value == pytest.approx(want, rel=1e-10)
    obj = ModelObjective(model, mse, (x, y))
    assert relative_flatness(obj, layer="0.weight").value == pytest.approx(want, rel=1e-10)
    est = relative_flatness(model, mse, (x, y), layer="0", method="hutchinson",
                            num_matvecs=400, generator=_g(0))  # fmt: skip
    assert abs(est.value - want) < 4 * est.stderr


def test_pac_bayes_sigma_on_quadratic_matches_analytic(h):
    eigs = [5.0, 3.0, 2.0, 1.0, 0.5, 0.1]
    model, loss, d, A = h.quadratic_problem(eigs)
    n = 256
    res = pac_bayes_sigma(model, loss, d, target=0.1, num_samples=n, max_samples=n,
                          rtol=1e-3, generator=_g(1))  # fmt: skip
    truth = math.sqrt(2 * 0.1 / sum(eigs))
    # sigma = sqrt(target / S_n), S_n the mean of z^T A z / 2 over n draws:
    # relative sd of S_n is sqrt(2 tr A^2) / tr A / sqrt(n); sigma's is half of it
    rel_sd = 0.5 * math.sqrt(2 * sum(e**2 for e in eigs)) / sum(eigs) / math.sqrt(n)
    assert abs(res.sigma / truth - 1) < 4 * rel_sd + 2e-3
    assert res.lower <= res.sigma <= res.upper and res.upper / res.lower - 1 <= 1e-3
    assert res.num_loss_evals == 1 + 2 * sum(e[3] for e in res.evaluations)


def test_pac_bayes_magnitude_aware_on_quadratic(h):
    eigs = [4.0, 2.0, 1.0, 0.5]
    theta0 = torch.tensor([0.5, -1.0, 1.5, 2.0], dtype=DT)
    model, loss, d, A = h.quadratic_problem(eigs, theta0=theta0)
    n, eps, target = 256, 0.01, 0.05
    res = pac_bayes_sigma(model, loss, d, target=target, magnitude_aware=True, eps=eps,
                          num_samples=n, max_samples=n, rtol=1e-3, generator=_g(2))  # fmt: skip
    diag = A.diagonal()
    truth = math.sqrt((2 * target - eps**2 * float(diag.sum())) / float((diag * theta0**2).sum()))
    assert abs(res.sigma / truth - 1) < 0.08  # 4 sd of the Monte Carlo mean (sd about 0.02)


def test_pac_bayes_is_reproducible_and_leaves_model(pair, state_check):
    m, _, d = pair
    check = state_check(m)
    state = torch.random.get_rng_state()
    a = pac_bayes_sigma(m, mse, d, target=0.05, num_samples=4, max_samples=8, generator=_g(9))
    b = pac_bayes_sigma(m, mse, d, target=0.05, num_samples=4, max_samples=8, generator=_g(9))
    assert a.sigma == b.sigma and a.evaluations == b.evaluations
    assert torch.equal(state, torch.random.get_rng_state())
    check()


def test_measures_leave_the_model_untouched(pair, state_check):
    m, _, d = pair
    check = state_check(m)
    fisher_rao_norm(m, mse, d, fisher="empirical")
    fisher_rao_norm(m, mse, d)
    relative_flatness(m, mse, d, layer="2")
    empirical_fisher_trace(m, mse, d)
    ggn_trace(m, mse, d, method="hutchinson", num_matvecs=3, generator=_g(0))
    check()


def test_errors_name_the_argument(pair):
    m, _, d = pair
    with pytest.raises(ValueError, match="layer 'nope'"):
        relative_flatness(m, mse, d, layer="nope")
    bias = relative_flatness(m, mse, d, layer="0.bias")  # a vector is one row: |b|^2 tr H_b
    tr_b = hessian_trace(m, mse, d, params=["0.bias"]).value
    assert bias.value == pytest.approx(float(m[0].bias.detach().pow(2).sum()) * tr_b, rel=1e-10)
    with pytest.raises(ValueError, match="fisher"):
        fisher_rao_norm(m, mse, d, fisher="model")
    with pytest.raises(ValueError, match="target"):
        pac_bayes_sigma(m, mse, d, target=0.0)
    with pytest.raises(ValueError, match="max_samples"):
        pac_bayes_sigma(m, mse, d, num_samples=8, max_samples=4)
    with pytest.raises(ValueError, match="bn='batch'"):
        empirical_fisher_trace(m, mse, d, bn="batch")
    obj = ModelObjective(m, mse, d)
    with pytest.raises(ValueError, match="ready ModelObjective and also"):
        ggn_trace(obj, mse)
    with pytest.raises(ValueError, match="ready ModelObjective and also"):
        ggn_trace(obj, bn="batch")
    with pytest.raises(TypeError, match="needs loss_fn and data"):
        ggn_trace(m)
    obj2 = ModelObjective(m, mse, d, params=["4.weight"])
    with pytest.raises(ValueError, match="not in the objective's parameter selection"):
        relative_flatness(obj2, layer="0")


def test_pac_bayes_plot(pair):
    import matplotlib

    matplotlib.use("Agg")
    m, _, d = pair
    res = pac_bayes_sigma(m, mse, d, target=0.05, num_samples=4, max_samples=8, generator=_g(1))
    fig = res.plot()
    assert len(fig.axes[0].lines) >= 2
