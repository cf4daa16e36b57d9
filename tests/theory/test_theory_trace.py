"""interpolation_trace against dense float64 Gauss-Newton and Hessian traces."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, hessian, jacrev, vmap

from sharpgen.data import xor_cube
from sharpgen.models import deep_relu, two_layer_relu
from sharpgen.theory import (
    interpolation_trace,
    squared_gradient_norms,
    two_layer_interpolation_trace,
)

F64 = torch.float64


def _flat(model):
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    shapes = [dict(model.named_parameters())[k].shape for k in names]
    flat = torch.cat([dict(model.named_parameters())[k].detach().reshape(-1) for k in names])
    buffers = dict(model.named_buffers())
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}

    def unflatten(v):
        params, i = dict(frozen), 0
        for k, s in zip(names, shapes, strict=True):
            params[k] = v[i : i + math.prod(s)].reshape(s)
            i += math.prod(s)
        return (params, buffers)

    return flat, unflatten


def dense_gauss_newton_trace(model, X):
    """(2/n) ||J||_F^2 with J the full-batch Jacobian of the outputs (torch.func.jacrev)."""
    flat, unflatten = _flat(model)
    J = jacrev(lambda v: functional_call(model, unflatten(v), (X,)))(flat)
    return float(2 * J.square().sum() / X.shape[0])


def dense_loss_hessian_trace(model, X, y):
    flat, unflatten = _flat(model)

    def loss(v):
        return (functional_call(model, unflatten(v), (X,)) - y).square().mean()

    return float(torch.diagonal(hessian(loss)(flat)).sum())


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


NETS = {
    "no_bias": lambda X: two_layer_relu(5, 7, bias=False, generator=_gen(1), dtype=F64),
    "bias": lambda X: two_layer_relu(5, 7, generator=_gen(2), dtype=F64),
    "softplus": lambda X: two_layer_relu(5, 7, activation="softplus", generator=_gen(3), dtype=F64),
    "simplified_ln": lambda X: two_layer_relu(
        5, 7, norm="simplified_ln", generator=_gen(4), dtype=F64
    ),
    "simplified_bn": lambda X: two_layer_relu(
        5, 7, norm="simplified_bn", reference=X, generator=_gen(5), dtype=F64
    ),
    "deep": lambda X: deep_relu(5, [4, 3], generator=_gen(6), dtype=F64),
}


@pytest.mark.parametrize("kind", list(NETS))
def test_interpolation_trace_equals_dense_gauss_newton_trace(kind):
    X = xor_cube(5, 9, generator=_gen(7), dtype=F64).X
    net = NETS[kind](X)
    got = float(interpolation_trace(net, X))
    assert got == pytest.approx(dense_gauss_newton_trace(net, X), rel=1e-12)
    norms = squared_gradient_norms(net, X)
    assert list(norms) == [k for k, _ in net.named_parameters()]
    assert all(v.shape == (9,) for v in norms.values())
    # at targets y = f(X) the model interpolates, and the loss Hessian trace is the same
    y = net(X).detach()
    assert dense_loss_hessian_trace(net, X, y) == pytest.approx(got, rel=1e-10)


def test_interpolation_trace_leaves_the_model_untouched_and_skips_frozen_parameters():
    X = xor_cube(4, 6, generator=_gen(8), dtype=F64).X
    net = two_layer_relu(4, 5, norm="simplified_bn", reference=X, generator=_gen(9), dtype=F64)
    net.eval()
    net.gamma.requires_grad_(False)
    net.W2.grad = torch.ones(5, dtype=F64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    norms = squared_gradient_norms(net, X)
    assert "gamma" not in norms
    assert float(interpolation_trace(net, X)) == pytest.approx(
        dense_gauss_newton_trace(net, X), rel=1e-12
    )
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training and not net.gamma.requires_grad and net.W1.requires_grad
    assert torch.equal(net.W2.grad, torch.ones(5, dtype=F64)) and net.W1.grad is None


def test_interpolation_trace_bad_input():
    net = two_layer_relu(4, 5, generator=_gen(), dtype=F64)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        interpolation_trace(lambda x: x, torch.ones(2, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"X must be a tensor of shape \(n, d\)"):
        interpolation_trace(net, torch.ones(4, dtype=F64))
    with pytest.raises(TypeError, match=r"X has dtype torch.float32.*convert with X.to"):
        interpolation_trace(net, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"set_reference\(X_train\)"):
        interpolation_trace(
            two_layer_relu(4, 5, norm="simplified_bn", dtype=F64), torch.ones(2, 4, dtype=F64)
        )
    with torch.no_grad():
        net.W2[0] = math.inf
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        interpolation_trace(net, torch.ones(2, 4, dtype=F64))


@pytest.mark.parametrize("norm", [None, "simplified_bn", "simplified_ln"])
def test_functional_two_layer_trace_matches_module_and_vmaps_over_runs(norm):
    X = xor_cube(4, 7, generator=_gen(12), dtype=F64).X
    ref = X if norm == "simplified_bn" else None
    nets = [
        two_layer_relu(4, 5, norm=norm, reference=ref, generator=_gen(s), dtype=F64)
        for s in range(3)
    ]
    kw = {"arch": nets[0].arch, "eps": nets[0].eps, "reference": ref}
    stacked = {
        k: torch.stack([dict(n.named_parameters())[k].detach() for n in nets])
        for k, _ in nets[0].named_parameters()
    }
    batched = vmap(lambda p: two_layer_interpolation_trace(p, X, **kw))(stacked)
    for i, net in enumerate(nets):
        want = float(interpolation_trace(net, X))
        params = {k: v.detach() for k, v in net.named_parameters()}
        assert float(two_layer_interpolation_trace(params, X, **kw)) == pytest.approx(
            want, rel=1e-13
        )
        assert float(batched[i]) == pytest.approx(want, rel=1e-12)
