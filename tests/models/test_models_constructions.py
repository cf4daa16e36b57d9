"""The flattest constructions: exact interpolation, dense Hessian traces, test errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, hessian

from sharpgen.data import complete_xor, full_cube, xor_cube, xor_labels
from sharpgen.models import flattest_generalizer, flattest_memorizer, xor_realizer_no_bias
from sharpgen.theory import interpolation_trace, memorizer_test_error, zero_one_error

F64 = torch.float64


def dense_loss_hessian_trace(model, X, y):
    """Tr of torch.func.hessian of the MSE loss (no 1/2) over all flattened parameters."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    buffers = dict(model.named_buffers())

    def loss(v):
        params, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            size = math.prod(s)
            params[k] = v[i : i + size].reshape(s)
            i += size
        return (functional_call(model, (params, buffers), (X,)) - y).square().mean()

    return float(torch.diagonal(hessian(loss)(flat)).sum())


def _xor_train(d, n, seed):
    return xor_cube(d, n, generator=torch.Generator().manual_seed(seed), unique=True, dtype=F64)


CASES = [
    # (d, n, width)
    (4, 6, 6),
    (5, 9, 12),
    (6, 11, 11),
]


@pytest.mark.parametrize(("d", "n", "width"), CASES)
@pytest.mark.parametrize("arch", ["bias", "simplified_ln"])
def test_memorizer_interpolates_and_attains_the_closed_form_trace(d, n, width, arch):
    data = _xor_train(d, n, seed=d)
    net = flattest_memorizer(data.X, data.y, arch, width=width)
    assert net.width == width and net.W1.dtype == F64
    torch.testing.assert_close(net(data.X).detach(), data.y, rtol=0, atol=1e-13)
    closed = 4 * math.sqrt(d + 1) if arch == "bias" else 2.0
    dense = dense_loss_hessian_trace(net, data.X, data.y)
    assert dense == pytest.approx(closed, rel=1e-12)
    assert float(interpolation_trace(net, data.X)) == pytest.approx(dense, rel=1e-12)


@pytest.mark.parametrize(("d", "n", "width"), CASES)
@pytest.mark.parametrize("arch", ["bias", "simplified_ln", "no_bias"])
def test_generalizer_interpolates_every_xor_set_with_the_closed_form_trace(d, n, width, arch):
    data = _xor_train(d, n, seed=10 + d)
    net = flattest_generalizer(d, arch, width=width, dtype=F64)
    torch.testing.assert_close(net(data.X).detach(), data.y, rtol=0, atol=1e-13)
    closed = {"bias": 4 * math.sqrt(d + 1), "simplified_ln": 2.0, "no_bias": 4 * math.sqrt(d)}
    dense = dense_loss_hessian_trace(net, data.X, data.y)
    assert dense == pytest.approx(closed[arch], rel=1e-12)
    assert float(interpolation_trace(net, data.X)) == pytest.approx(dense, rel=1e-12)
    cube = full_cube(d, dtype=F64)
    assert zero_one_error(net, cube, xor_labels(cube)) == 0.0
    torch.testing.assert_close(net(cube).detach(), xor_labels(cube), rtol=0, atol=1e-13)


def test_xor_realizer_no_bias_is_the_width_four_formula():
    d = 5
    net = xor_realizer_no_bias(d, dtype=F64)
    X = full_cube(d, dtype=F64)
    x1, x2 = X[:, 0], X[:, 1]
    relu = torch.relu
    raw = relu(x1 + x2) + relu(-x1 - x2) - relu(x1 - x2) - relu(-x1 + x2)
    torch.testing.assert_close(raw, 2 * x1 * x2)
    a = d**0.25 / 2
    torch.testing.assert_close(net(X).detach(), raw * a / (2 * a))
    assert net.arch == "no_bias" and net.W1.shape == (4, d)


@pytest.mark.parametrize("arch", ["bias", "simplified_ln"])
def test_memorizer_test_error_is_the_unseen_fraction(arch):
    d = 5
    g = torch.Generator().manual_seed(3)
    data = xor_cube(d, 12, generator=g, unique=True, test_size=400, dtype=F64)
    net = flattest_memorizer(data.X, data.y, arch)
    seen = (data.X_test.unsqueeze(1) == data.X.unsqueeze(0)).all(-1).any(1)
    expected = 1.0 - float(seen.double().mean())
    assert 0 < expected < 1  # some test points were seen in training, most were not
    assert zero_one_error(net, data.X_test, data.y_test) == pytest.approx(expected, abs=1e-15)
    assert memorizer_test_error(data.X, data.X_test) == pytest.approx(expected, abs=1e-15)
    # on the whole cube: exactly the training points are right, the output elsewhere is 0
    cube = full_cube(d, dtype=F64)
    out = net(cube).detach()
    in_train = (cube.unsqueeze(1) == data.X.unsqueeze(0)).all(-1).any(1)
    assert bool((out[~in_train] == 0).all())
    assert zero_one_error(net, cube, xor_labels(cube)) == pytest.approx(1 - 12 / 2**d)
    assert memorizer_test_error(data.X) == pytest.approx(1 - 12 / 2**d)


def test_bias_memorizer_with_real_labels_and_non_cube_points_on_a_sphere():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(7, 3, generator=g, dtype=F64)
    X = 2.0 * X / X.norm(dim=1, keepdim=True)
    y = torch.randn(7, generator=g, dtype=F64)
    net = flattest_memorizer(X, y, "bias")
    torch.testing.assert_close(net(X).detach(), y, rtol=0, atol=1e-12)
    bound = 4 * (math.sqrt(4 + 1) * y.abs()).mean()
    assert dense_loss_hessian_trace(net, X, y) == pytest.approx(float(bound), rel=1e-10)


def test_simplified_bn_generalizer_trace_closed_form_and_limit():
    d = 5
    data = complete_xor(d, dtype=F64)
    X = data.X
    spread = sum(0.25 * (X[k::4] - X[k::4].mean(0)).square().sum(1).mean() for k in range(4))
    previous = math.inf
    for rho in (1.0, 4.0, 30.0):
        net = flattest_generalizer(d, "simplified_bn", rho=rho, reference=X, dtype=F64)
        torch.testing.assert_close(net(X).detach(), data.y, rtol=0, atol=1e-13)
        cube = full_cube(d, dtype=F64)
        assert zero_one_error(net, cube, xor_labels(cube)) == 0.0
        dense = dense_loss_hessian_trace(net, X, data.y)
        assert dense == pytest.approx(8 + 2 / rho**2 * float(spread), rel=1e-12)
        assert dense < previous
        previous = dense


def test_constructions_bad_input():
    X = full_cube(4, dtype=F64)[:6]
    y = xor_labels(X)
    with pytest.raises(ValueError, match="1 duplicate training point"):
        flattest_memorizer(torch.cat([X, X[:1]]), torch.cat([y, y[:1]]))
    with pytest.raises(ValueError, match=r"width=5 is smaller than the 6 neurons"):
        flattest_memorizer(X, y, width=5)
    with pytest.raises(ValueError, match=r"eps=1.5 must lie in \(0, 1\)"):
        flattest_memorizer(X, y, "bias", eps=1.5)
    with pytest.raises(ValueError, match=r"delta=2.0 must lie in \(0, 2\)"):
        flattest_memorizer(X, y, "simplified_ln", delta=2.0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        flattest_memorizer(X, y, "simplified_ln", eps=-1.0)
    with pytest.raises(ValueError, match="delta is only used by arch='simplified_ln'"):
        flattest_memorizer(X, y, "bias", delta=1.0)
    with pytest.raises(ValueError, match="must hold points of the hypercube"):
        flattest_memorizer(0.5 * X, y, "simplified_ln")
    with pytest.raises(ValueError, match=r"generalize \(Theorem 3.1\)"):
        flattest_memorizer(X, y, "no_bias")
    with pytest.raises(ValueError, match=r"generalize \(Theorem 3.2\)"):
        flattest_memorizer(X, y, "simplified_bn")
    with pytest.raises(ValueError, match="valid architectures are no_bias, bias"):
        flattest_memorizer(X, y, "batchnorm")
    with pytest.raises(ValueError, match=r"y must have shape \(n,\) = \(6,\)"):
        flattest_memorizer(X, y[:5])
    with pytest.raises(ValueError, match=r"x has 5 features|x must have shape \(n, 4\)"):
        flattest_memorizer(X, y)(torch.ones(2, 5, dtype=F64))
    inner = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.1, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match="not separated from the others"):
        flattest_memorizer(inner, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="zero vector"):
        flattest_memorizer(torch.zeros(1, 2, dtype=F64), torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match=r"width=3 is smaller than the 4 neurons"):
        flattest_generalizer(4, "bias", width=3)
    with pytest.raises(ValueError, match=r"width=2 is smaller than the 4 neurons"):
        xor_realizer_no_bias(4, width=2)
    with pytest.raises(ValueError, match="eps is only used by arch='simplified_ln'"):
        flattest_generalizer(4, "bias", eps=0.1)
    with pytest.raises(ValueError, match="pass reference=X_train"):
        flattest_generalizer(4, "simplified_bn")
    with pytest.raises(ValueError, match="all four sign patterns"):
        flattest_generalizer(4, "simplified_bn", reference=X[X[:, 0] > 0])
    with pytest.raises(ValueError, match="d must be an int >= 2"):
        flattest_generalizer(1, "bias")


@pytest.mark.parametrize("depth", [3, 4])
def test_deep_constructions_attain_the_depth_bound(depth):
    d = 5
    data = _xor_train(d, 8, seed=20 + depth)
    closed = 2 * depth * (d + 1) ** (1 / depth)
    cube = full_cube(d, dtype=F64)
    mem = flattest_memorizer(data.X, data.y, "bias", depth=depth, width=10)
    gen = flattest_generalizer(d, "bias", depth=depth, width=6, dtype=F64)
    assert [k for k, _ in mem.named_parameters()][-1] == f"W{depth}"
    for net in (mem, gen):
        torch.testing.assert_close(net(data.X).detach(), data.y, rtol=0, atol=1e-13)
        dense = dense_loss_hessian_trace(net, data.X, data.y)
        assert dense == pytest.approx(closed, rel=1e-12)
        assert float(interpolation_trace(net, data.X)) == pytest.approx(dense, rel=1e-12)
    assert zero_one_error(gen, cube, xor_labels(cube)) == 0.0
    assert zero_one_error(mem, cube, xor_labels(cube)) == pytest.approx(1 - 8 / 2**d)
    # real-valued labels: the bound (2D/n) sum r^(2/D) |y|^(2 - 2/D) is attained as well
    y = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=F64)
    net = flattest_memorizer(data.X, y, "bias", depth=depth)
    r = math.sqrt(d + 1)
    want = 2 * depth * float((r ** (2 / depth) * y.abs() ** (2 - 2 / depth)).mean())
    assert dense_loss_hessian_trace(net, data.X, y) == pytest.approx(want, rel=1e-10)


def test_depth_only_for_bias_nets():
    X = full_cube(3, dtype=F64)
    with pytest.raises(ValueError, match="depth=3 is only available for arch='bias'"):
        flattest_memorizer(X, xor_labels(X), "simplified_ln", depth=3)
    with pytest.raises(ValueError, match="depth=3 is only available for arch='bias'"):
        flattest_generalizer(3, "simplified_ln", depth=3)
    with pytest.raises(ValueError, match="depth must be an int >= 2, got 1"):
        flattest_generalizer(3, "bias", depth=1)
