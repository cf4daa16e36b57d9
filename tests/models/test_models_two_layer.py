from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from sharpgen.data import xor_cube
from sharpgen.models import (
    DeepReLUNet,
    TwoLayerNet,
    deep_forward,
    deep_relu,
    two_layer_forward,
    two_layer_relu,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- builders
@pytest.mark.parametrize(
    ("kwargs", "arch", "names"),
    [
        ({"bias": False}, "no_bias", ["W1", "W2"]),
        ({}, "bias", ["W1", "b1", "W2"]),
        ({"norm": "simplified_bn"}, "simplified_bn", ["W1", "b1", "gamma", "W2"]),
        ({"norm": "simplified_ln"}, "simplified_ln", ["W1", "b1", "W2"]),
    ],
)
def test_builder_architectures_and_parameter_names(kwargs, arch, names):
    net = two_layer_relu(5, 7, generator=_gen(), dtype=F64, **kwargs)
    assert net.arch == arch
    assert [k for k, _ in net.named_parameters()] == names
    assert net.W1.shape == (7, 5) and net.W2.shape == (7,)
    assert all(p.dtype == F64 for p in net.parameters())
    if arch == "simplified_bn":
        assert torch.equal(net.gamma, torch.ones(7, dtype=F64))
        net.set_reference(torch.ones(3, 5, dtype=F64))
    assert net(torch.ones(4, 5, dtype=F64)).shape == (4,)
    assert net(torch.ones(5, dtype=F64)).shape == ()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("bias", [True, False])
def test_init_equals_pytorch_default_linear_bitwise(dtype, bias):
    net = two_layer_relu(6, 9, bias=bias, generator=_gen(3), dtype=dtype)
    torch.manual_seed(3)
    l1 = nn.Linear(6, 9, bias=bias, dtype=dtype)
    l2 = nn.Linear(9, 1, bias=False, dtype=dtype)
    assert torch.equal(net.W1, l1.weight)
    if bias:
        assert torch.equal(net.b1, l1.bias)
    assert torch.equal(net.W2, l2.weight[0])


def test_init_scales_and_generator_isolation():
    state = torch.get_rng_state()
    base = two_layer_relu(4, 6, generator=_gen(1), dtype=F64)
    scaled = two_layer_relu(
        4, 6, generator=_gen(1), dtype=F64, init_scale=2.0, first_layer_init_scale=0.01
    )
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    torch.testing.assert_close(scaled.W1, base.W1 * 0.02, rtol=0, atol=0)
    torch.testing.assert_close(scaled.b1, base.b1 * 0.02, rtol=0, atol=0)
    torch.testing.assert_close(scaled.W2, base.W2 * 2.0, rtol=0, atol=0)
    again = two_layer_relu(4, 6, generator=_gen(1), dtype=F64)
    assert all(
        torch.equal(a, b) for a, b in zip(base.parameters(), again.parameters(), strict=True)
    )
    bound = 1 / math.sqrt(4)
    assert float(base.W1.detach().abs().max()) <= bound
    assert float(base.b1.detach().abs().max()) <= bound


def test_module_forward_matches_hand_computation_for_each_arch():
    g = _gen(2)
    X = torch.randn(8, 3, generator=g, dtype=F64)
    W1 = torch.randn(5, 3, generator=g, dtype=F64)
    b1 = torch.randn(5, generator=g, dtype=F64).abs() + 0.5  # every neuron alive on R
    W2 = torch.randn(5, generator=g, dtype=F64)
    gamma = torch.randn(5, generator=g, dtype=F64)
    R = torch.randn(11, 3, generator=g, dtype=F64)
    h = torch.relu(X @ W1.T + b1)
    expected = {
        "no_bias": torch.relu(X @ W1.T) @ W2,
        "bias": h @ W2,
        "simplified_ln": (h / h.norm(dim=1, keepdim=True).clamp(min=0.3)) @ W2,
        "simplified_bn": (h * gamma / torch.relu(R @ W1.T + b1).square().mean(0).sqrt()) @ W2,
    }
    for arch, want in expected.items():
        net = TwoLayerNet(
            arch,
            W1,
            W2,
            b1=None if arch == "no_bias" else b1,
            gamma=gamma if arch == "simplified_bn" else None,
            eps=0.3,
            reference=R if arch == "simplified_bn" else None,
        )
        torch.testing.assert_close(net(X), want, rtol=1e-12, atol=1e-12)


def test_softplus_activation():
    net = two_layer_relu(3, 4, activation="softplus", generator=_gen(), dtype=F64)
    X = torch.randn(5, 3, generator=_gen(1), dtype=F64)
    want = nn.functional.softplus(X @ net.W1.T + net.b1) @ net.W2
    torch.testing.assert_close(net(X), want.detach(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- Sim-BN
def test_simplified_bn_single_example_equals_batch_forward_with_reference():
    data = xor_cube(5, 12, generator=_gen(4), dtype=F64, test_size=6)
    net = two_layer_relu(5, 8, norm="simplified_bn", reference=data.X, generator=_gen(5), dtype=F64)
    batch = net(data.X)
    singles = torch.stack([net(x) for x in data.X])
    torch.testing.assert_close(singles, batch, rtol=1e-13, atol=1e-13)
    # unseen points are normalized with the reference statistics, not their own
    torch.testing.assert_close(
        net(data.X_test), torch.stack([net(x) for x in data.X_test]), rtol=1e-13, atol=1e-13
    )
    # the statistics follow the current weights (gradients flow through them)
    loss = net(data.X[:1]).sum()
    loss.backward()
    W1 = net.W1.detach().clone().requires_grad_(True)
    params = {**{k: v.detach() for k, v in net.named_parameters()}, "W1": W1}
    out = functional_call(net, params, (data.X[:1],)).sum()
    (gW1,) = torch.autograd.grad(out, W1)
    torch.testing.assert_close(net.W1.grad, gW1)
    # and differ from a forward that froze the statistics
    with torch.no_grad():
        stat = torch.relu(data.X @ net.W1.T + net.b1).square().mean(0).sqrt()
    frozen = W1.detach().clone().requires_grad_(True)
    out_frozen = ((torch.relu(data.X[:1] @ frozen.T + net.b1) * net.gamma / stat) @ net.W2).sum()
    (g_frozen,) = torch.autograd.grad(out_frozen, frozen)
    assert not torch.allclose(g_frozen, gW1)


def test_simplified_bn_without_reference_raises_and_dead_neuron_has_no_nan():
    net = two_layer_relu(4, 5, norm="simplified_bn", generator=_gen(), dtype=F64)
    X = torch.ones(3, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"set_reference\(X_train\)"):
        net(X)
    net.set_reference(X)
    with torch.no_grad():
        net.W1[0] = 0.0
        net.b1[0] = -1.0  # neuron 0 is zero on the whole reference set
    out = net(torch.cat([X, -X])).sum()
    out.backward()
    assert torch.isfinite(out)
    for p in net.parameters():
        assert torch.isfinite(p.grad).all()
    assert float(net.W2.grad[0]) == 0.0 and float(net.gamma.grad[0]) == 0.0


def test_set_reference_validates_and_clears():
    net = two_layer_relu(4, 5, norm="simplified_bn", generator=_gen(), dtype=F64)
    with pytest.raises(ValueError, match=r"shape \(N, d\) = \(N, 4\)"):
        net.set_reference(torch.ones(3, 5, dtype=F64))
    net.set_reference(torch.ones(3, 4, dtype=torch.float32))
    assert net.reference.dtype == F64
    assert "reference" in net.state_dict()
    net.set_reference(None)
    assert net.reference is None
    plain = two_layer_relu(4, 5, generator=_gen())
    with pytest.raises(ValueError, match="only arch='simplified_bn' uses a reference set"):
        plain.set_reference(torch.ones(3, 4))


# --------------------------------------------------------------------------- Sim-LN
def test_simplified_ln_scale_invariance_per_active_neuron():
    g = _gen(6)
    net = two_layer_relu(5, 6, norm="simplified_ln", generator=g, dtype=F64, eps=1e-3)
    X = xor_cube(5, 10, generator=g, dtype=F64).X
    base = net(X).detach()
    assert bool((torch.relu(X @ net.W1.T + net.b1).norm(dim=1) > 1e-3).all())
    for j in range(6):
        for c in (0.5, 3.0):
            scaled = {k: v.detach().clone() for k, v in net.named_parameters()}
            scaled["W1"][j] *= c
            scaled["b1"][j] *= c
            # the output changes: only a joint rescaling of all neurons is invariant
            changed = net.functional_forward(scaled, X)
            all_scaled = {k: v.detach().clone() for k, v in net.named_parameters()}
            all_scaled["W1"] *= c
            all_scaled["b1"] *= c
            torch.testing.assert_close(net.functional_forward(all_scaled, X), base)
            if j == 0 and c == 3.0:
                assert not torch.allclose(changed, base)


def test_simplified_ln_single_active_neuron_is_scale_free():
    # one active neuron per point (the construction regime): rescaling it changes nothing
    W1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    net = TwoLayerNet("simplified_ln", W1, torch.tensor([2.0, -3.0], dtype=F64), b1=torch.zeros(2))
    X = torch.tensor([[2.0, -1.0], [-1.0, 0.5]], dtype=F64)
    base = net(X).detach()
    for c in (0.7, 5.0):
        p = {k: v.detach().clone() for k, v in net.named_parameters()}
        p["W1"][0] *= c
        p["W1"][1] *= 1 / c
        torch.testing.assert_close(net.functional_forward(p, X), base)
    torch.testing.assert_close(base, torch.tensor([2.0, -3.0], dtype=F64))


def test_simplified_ln_zero_hidden_vector_gives_no_nan():
    net = two_layer_relu(3, 4, norm="simplified_ln", generator=_gen(), dtype=F64)
    with torch.no_grad():
        net.b1.fill_(-10.0)
    out = net(torch.zeros(2, 3, dtype=F64)).sum()
    out.backward()
    assert float(out.detach()) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# --------------------------------------------------------------------------- functional
@pytest.mark.parametrize("norm", [None, "simplified_bn", "simplified_ln"])
def test_functional_form_agrees_with_module_and_vmaps_over_runs(norm):
    X = xor_cube(4, 6, generator=_gen(7), dtype=F64).X
    nets = [
        two_layer_relu(
            4,
            5,
            norm=norm,
            reference=X if norm == "simplified_bn" else None,
            generator=_gen(s),
            dtype=F64,
        )
        for s in range(3)
    ]
    net = nets[0]
    params = {k: v.detach() for k, v in net.named_parameters()}
    kw = {"arch": net.arch, "eps": net.eps, "reference": X if norm == "simplified_bn" else None}
    assert torch.equal(two_layer_forward(params, X, **kw), net(X).detach())
    stacked = {
        k: torch.stack([dict(n.named_parameters())[k].detach() for n in nets]) for k in params
    }
    batched = vmap(lambda p: two_layer_forward(p, X, **kw))(stacked)
    for i, n in enumerate(nets):
        torch.testing.assert_close(batched[i], n(X).detach(), rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- deep nets
def test_deep_relu_forward_names_and_init():
    net = deep_relu(4, [5, 3], generator=_gen(8), dtype=F64)
    assert [k for k, _ in net.named_parameters()] == ["W1", "b1", "W2", "W3"]
    torch.manual_seed(8)
    l1 = nn.Linear(4, 5, dtype=F64)
    l2 = nn.Linear(5, 3, bias=False, dtype=F64)
    l3 = nn.Linear(3, 1, bias=False, dtype=F64)
    assert torch.equal(net.W1, l1.weight) and torch.equal(net.b1, l1.bias)
    assert torch.equal(net.W2, l2.weight) and torch.equal(net.W3, l3.weight[0])
    X = torch.randn(6, 4, generator=_gen(9), dtype=F64)
    want = l3(torch.relu(l2(torch.relu(l1(X)))))[:, 0]
    torch.testing.assert_close(net(X), want, rtol=1e-12, atol=1e-12)
    params = {k: v.detach() for k, v in net.named_parameters()}
    assert torch.equal(deep_forward(params, X), net(X).detach())


def test_deep_relu_bad_input():
    with pytest.raises(ValueError, match="widths must be a non-empty list"):
        deep_relu(3, [])
    with pytest.raises(ValueError, match=r"widths\[1\] must be an int >= 1"):
        deep_relu(3, [2, 0])
    with pytest.raises(ValueError, match="W2 has shape"):
        DeepReLUNet([torch.ones(3, 2), torch.ones(4, 4), torch.ones(4)], torch.zeros(3))
    with pytest.raises(ValueError, match=r"x must have shape \(n, 3\)"):
        deep_relu(3, [2])(torch.ones(2, 4))


# --------------------------------------------------------------------------- bad input
def test_bad_input_messages():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'; valid values"):
        two_layer_relu(3, 4, norm="batchnorm")
    with pytest.raises(ValueError, match="use bias=True"):
        two_layer_relu(3, 4, bias=False, norm="simplified_ln")
    with pytest.raises(ValueError, match="unknown activation 'tanh'; valid activations are relu"):
        two_layer_relu(3, 4, activation="tanh")
    with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
        two_layer_relu(3, 0)
    with pytest.raises(TypeError, match="d must be an int"):
        two_layer_relu(3.0, 4)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        two_layer_relu(3, 4, norm="simplified_ln", eps=0.0)
    with pytest.raises(ValueError, match="first_layer_init_scale must be a finite number > 0"):
        two_layer_relu(3, 4, first_layer_init_scale=-1.0)
    with pytest.raises(
        ValueError,
        match="unknown arch 'layernorm'; valid architectures are no_bias, bias, simplified_bn, "
        "simplified_ln",
    ):
        TwoLayerNet("layernorm", torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="pass b1=None"):
        TwoLayerNet("no_bias", torch.ones(2, 3), torch.ones(2), b1=torch.ones(2))
    with pytest.raises(ValueError, match="needs a first-layer bias b1"):
        TwoLayerNet("bias", torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match=r"W2 must have shape \(m,\) = \(2,\)"):
        TwoLayerNet("no_bias", torch.ones(2, 3), torch.ones(3))
    net = two_layer_relu(3, 4, generator=_gen())
    with pytest.raises(ValueError, match=r"x must have shape \(n, 3\).*got shape \(2, 5\)"):
        net(torch.ones(2, 5))
    with pytest.raises(TypeError, match=r"convert the inputs with x.to\(torch.float32\)"):
        net(torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="x has 5 features in its last dimension"):
        two_layer_forward(dict(net.named_parameters()), torch.ones(2, 5), arch="bias")
