"""Lower bounds are bounds (random and trained nets never beat them), and their closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, hessian

from sharpgen.data import complete_xor, full_cube, xor_cube, xor_labels
from sharpgen.models import (
    TwoLayerNet,
    deep_relu,
    flattest_generalizer,
    two_layer_relu,
    xor_realizer_no_bias,
)
from sharpgen.theory import (
    interpolation_trace,
    memorizer_test_error,
    no_bias_norm,
    path_norm,
    simplified_bn_norm_bound,
    squared_gradient_norms,
    trace_lower_bound,
    zero_one_error,
)

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _gd(net, X, y, *, lr, steps):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (net(X) - y).square().mean()
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("d", [4, 7, 30])
def test_closed_forms_on_xor_data(d):
    data = xor_cube(d, 40, generator=_gen(d), dtype=F64)
    X, y = data.train
    assert trace_lower_bound(X, y, "bias") == pytest.approx(4 * math.sqrt(d + 1), rel=1e-14)
    assert trace_lower_bound(X, y, "no_bias") == pytest.approx(4 * math.sqrt(d), rel=1e-14)
    assert trace_lower_bound(X, y, "simplified_ln") == pytest.approx(2.0, rel=1e-14)
    assert trace_lower_bound(X, y, "simplified_bn") == pytest.approx(4.0, rel=1e-14)
    # Sim-LN: the bound stays 2 up to eps = 2 sqrt(d + 1) and decreases beyond
    edge = 2 * math.sqrt(d + 1)
    assert trace_lower_bound(X, y, "simplified_ln", eps=edge) == pytest.approx(2.0)
    assert trace_lower_bound(X, y, "simplified_ln", eps=2 * edge) == pytest.approx(1.0)
    if d == 30:
        assert round(trace_lower_bound(X, y, "bias"), 2) == 22.27


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("bias", {}),
        ("no_bias", {"bias": False}),
        ("simplified_ln", {"norm": "simplified_ln", "eps": 1e-3}),
        ("simplified_ln", {"norm": "simplified_ln", "eps": 3.0, "init_scale": 0.3}),
    ],
)
def test_bound_holds_for_random_nets_with_their_own_outputs_as_labels(arch, kwargs):
    # the derivation holds for every parameter value once y_i := f(x_i): the net interpolates
    # its own outputs, so its trace can never be below the bound evaluated at those outputs
    X = torch.randn(12, 5, generator=_gen(11), dtype=F64)
    eps = kwargs.get("eps")
    for seed in range(20):
        net = two_layer_relu(5, 6, generator=_gen(seed), dtype=F64, **kwargs)
        out = net(X).detach()
        bound = trace_lower_bound(X, out, arch, **({"eps": eps} if eps else {}))
        assert float(interpolation_trace(net, X)) >= bound * (1 - 1e-12)
        # per example as well
        per = sum(squared_gradient_norms(net, X).values())
        for i in range(12):
            b_i = trace_lower_bound(
                X[i : i + 1], out[i : i + 1], arch, **({"eps": eps} if eps else {})
            )
            assert float(per[i]) >= b_i / 2 * (1 - 1e-12)


@pytest.mark.parametrize("depth", [3, 4])
def test_deep_bias_bound_holds_for_random_and_trained_deep_nets(depth):
    X = torch.randn(10, 4, generator=_gen(21), dtype=F64)
    for seed in range(10):
        net = deep_relu(4, [5] * (depth - 1), generator=_gen(seed), dtype=F64)
        bound = trace_lower_bound(X, net(X).detach(), "bias", depth=depth)
        assert float(interpolation_trace(net, X)) >= bound * (1 - 1e-12)
    data = xor_cube(4, 6, generator=_gen(30 + depth), unique=True, dtype=F64)
    net = deep_relu(4, [16] * (depth - 1), generator=_gen(0), dtype=F64)
    loss = _gd(net, data.X, data.y, lr=0.05, steps=800)
    assert loss < 1e-4
    bound = trace_lower_bound(data.X, net(data.X).detach(), "bias", depth=depth)
    assert float(interpolation_trace(net, data.X)) >= bound * (1 - 1e-12)
    with pytest.raises(ValueError, match="depth=3 is only available for arch='bias'"):
        trace_lower_bound(X, X[:, 0], "no_bias", depth=3)


def test_small_eps_regime_of_the_simplified_ln_bound_is_exercised():
    # with eps large, ||h|| < eps and the second branch min(., 2 r|y|/eps) < 1 is active
    X = torch.randn(12, 5, generator=_gen(11), dtype=F64)
    net = two_layer_relu(5, 6, norm="simplified_ln", eps=3.0, init_scale=0.3, generator=_gen(1))
    net = net.double()
    h = torch.relu(X @ net.W1.T + net.b1)
    assert bool((h.norm(dim=1) < 3.0).all())
    assert trace_lower_bound(X, net(X).detach(), "simplified_ln", eps=3.0) < 2.0


def test_constrained_search_never_beats_the_bias_bound():
    """GD to interpolation from random inits, then function-preserving neuron rescalings."""
    d, n = 4, 6
    best = math.inf
    for seed in range(3):
        g = _gen(100 + seed)
        data = xor_cube(d, n, generator=g, unique=True, dtype=F64)
        net = two_layer_relu(d, 12, generator=g, dtype=F64)
        loss = _gd(net, data.X, data.y, lr=0.05, steps=600)
        assert loss < 1e-6
        out = net(data.X).detach()
        bound = trace_lower_bound(data.X, out, "bias")
        assert bound == pytest.approx(4 * math.sqrt(d + 1), rel=1e-3)
        base = {k: v.detach() for k, v in net.named_parameters()}
        for _ in range(60):
            alpha = torch.exp(torch.empty(12, dtype=F64).uniform_(-1.5, 1.5, generator=g))
            scaled = TwoLayerNet(
                "bias", base["W1"] * alpha[:, None], base["W2"] / alpha, b1=base["b1"] * alpha
            )
            torch.testing.assert_close(scaled(data.X).detach(), out, rtol=1e-12, atol=1e-12)
            trace = float(interpolation_trace(scaled, data.X))
            assert trace >= bound * (1 - 1e-12)
            best = min(best, trace)
    # the search gets within a factor of the bound, never below it
    assert 4 * math.sqrt(d + 1) <= best * (1 + 1e-6)


def test_simplified_bn_constant_c_equals_two():
    """(2/n) sum_i ||grad_{W2, gamma} f(x_i)||^2 == 2(||W2||^2 + ||gamma||^2) over live neurons."""
    data = complete_xor(4, dtype=F64)
    for seed in range(5):
        net = two_layer_relu(
            4, 7, norm="simplified_bn", reference=data.X, generator=_gen(seed), dtype=F64
        )
        with torch.no_grad():
            net.gamma.copy_(torch.randn(7, generator=_gen(50 + seed), dtype=F64))
            net.W1[0] = 0.0
            net.b1[0] = -1.0  # a dead neuron: excluded from the bound, zero gradient
        norms = squared_gradient_norms(net, data.X)
        part = 2 * (norms["W2"] + norms["gamma"]).mean()
        bound = simplified_bn_norm_bound(net)
        torch.testing.assert_close(part, bound, rtol=1e-12, atol=0)
        live_gamma, live_w2 = net.gamma[1:].detach(), net.W2[1:].detach()
        assert float(bound) == pytest.approx(
            2 * float(live_gamma.square().sum() + live_w2.square().sum()), rel=1e-12
        )
        trace = float(interpolation_trace(net, data.X))
        l1 = float((live_gamma * live_w2).abs().sum())
        out = net(data.X).detach()
        assert trace >= float(bound) >= 4 * l1 * (1 - 1e-12)
        assert 4 * l1 >= trace_lower_bound(data.X, out, "simplified_bn") * (1 - 1e-12)


def _dense_loss_hessian_trace(model, X, y):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    buffers = dict(model.named_buffers())

    def loss(v):
        params, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            params[k] = v[i : i + math.prod(s)].reshape(s)
            i += math.prod(s)
        return (functional_call(model, (params, buffers), (X,)) - y).square().mean()

    return float(torch.diagonal(hessian(loss)(flat)).sum())


def test_simplified_bn_bound_at_trained_near_interpolating_nets():
    """GD-trained Sim-BN nets: exact loss-Hessian trace >= 2(||W2||^2 + ||gamma||^2) >= 4."""
    data = complete_xor(4, dtype=F64)
    for seed in range(2):
        net = two_layer_relu(
            4, 8, norm="simplified_bn", reference=data.X, generator=_gen(seed), dtype=F64
        )
        loss = _gd(net, data.X, data.y, lr=0.02, steps=1500)
        assert loss < 1e-5
        dense = _dense_loss_hessian_trace(net, data.X, data.y)
        # near interpolation the residual term is O(sqrt(loss)) times the output curvature
        assert dense == pytest.approx(float(interpolation_trace(net, data.X)), rel=1e-2)
        bound = float(simplified_bn_norm_bound(net))
        assert dense >= bound >= trace_lower_bound(data.X, data.y, "simplified_bn") - 1e-2


def test_norms_closed_forms_and_stacking():
    d = 9
    net = xor_realizer_no_bias(d, width=6, dtype=F64)
    assert float(no_bias_norm(net)) == pytest.approx(6 * math.sqrt(d))
    a = d**0.25 / 2
    assert float(path_norm(net)) == pytest.approx(4 * math.sqrt(2) * a / (2 * a))
    nets = [two_layer_relu(d, 5, generator=_gen(s), dtype=F64) for s in range(3)]
    stacked = {
        k: torch.stack([dict(n.named_parameters())[k].detach() for n in nets]) for k in ("W1", "W2")
    }
    torch.testing.assert_close(no_bias_norm(stacked), torch.stack([no_bias_norm(n) for n in nets]))
    torch.testing.assert_close(path_norm(stacked), torch.stack([path_norm(n) for n in nets]))
    for n in nets:  # AM-GM: 2 sqrt(d) * path norm <= ||W1||_F^2 + d ||W2||^2
        assert 2 * math.sqrt(d) * float(path_norm(n)) <= float(no_bias_norm(n))
    with pytest.raises(ValueError, match="'W1' \\(m, d\\) and 'W2' \\(m,\\)"):
        no_bias_norm({"W": torch.ones(2)})


def test_zero_one_error_and_memorizer_error():
    X = full_cube(3, dtype=F64)
    y = xor_labels(X)
    net = flattest_generalizer(3, dtype=F64)
    assert zero_one_error(net, X, y) == 0.0
    assert zero_one_error(net, X, -y) == 1.0
    zero = TwoLayerNet(
        "bias",
        torch.zeros(2, 3, dtype=F64),
        torch.zeros(2, dtype=F64),
        b1=torch.zeros(2, dtype=F64),
    )
    assert zero_one_error(zero, X, y) == 1.0  # an output of 0 counts as wrong
    with pytest.raises(ValueError, match="only the labels -1 and \\+1"):
        zero_one_error(net, X, (y + 1) / 2)
    assert memorizer_test_error(X[:3], X[:6]) == pytest.approx(0.5)
    assert memorizer_test_error(torch.cat([X[:3], X[:1]])) == pytest.approx(1 - 3 / 8)
    with pytest.raises(ValueError, match="X_test must hold points of the hypercube"):
        memorizer_test_error(X, 0.5 * X)


def test_trace_lower_bound_bad_input():
    X = full_cube(3, dtype=F64)
    y = xor_labels(X)
    with pytest.raises(ValueError, match="unknown arch 'bn'; valid architectures are no_bias"):
        trace_lower_bound(X, y, "bn")
    with pytest.raises(ValueError, match="eps is only used by arch='simplified_ln'"):
        trace_lower_bound(X, y, "bias", eps=0.1)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        trace_lower_bound(X, y, "simplified_ln", eps=0.0)
    with pytest.raises(ValueError, match=r"y must have shape \(n,\) = \(8,\)"):
        trace_lower_bound(X, y[:3], "bias")
    with pytest.raises(ValueError, match="needs a TwoLayerNet with arch='simplified_bn'"):
        simplified_bn_norm_bound(flattest_generalizer(3))
    with pytest.raises(ValueError, match=r"set_reference\(X_train\)"):
        simplified_bn_norm_bound(two_layer_relu(3, 4, norm="simplified_bn"))
