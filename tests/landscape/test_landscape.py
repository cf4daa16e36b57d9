"""Loss landscapes: values against a point-by-point loop, directions, BatchNorm, contracts."""

from __future__ import annotations

import copy

import matplotlib
import pytest
import torch
from torch import nn
from torch.func import functional_call

from sharpgen import ModelObjective
from sharpgen.landscape import (
    Landscape1D,
    Landscape2D,
    hessian_directions,
    linear_interpolation,
    loss_landscape_1d,
    loss_landscape_2d,
    normalize_direction,
    random_direction,
)

matplotlib.use("Agg")
DT = torch.float64
mse = nn.functional.mse_loss


def _g(seed):
    return torch.Generator().manual_seed(seed)


def cnn(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 3, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 2)]
    return nn.Sequential(*layers).to(DT).eval()


def images(n=10, seed=1):
    g = _g(seed)
    return torch.randn(n, 2, 5, 5, dtype=DT, generator=g), torch.randint(0, 2, (n,), generator=g)


def ce(out, y):
    return nn.functional.cross_entropy(out, y)


def accuracy(out, y):
    return (out.argmax(1) == y).to(out.dtype).mean()


def loop_loss(model, loss_fn, x, y, point):
    """The obvious slow reference: one functional call per point."""
    return float(loss_fn(functional_call(model, point, (x,)), y))


def test_filter_normalization_matches_li_et_al():
    model = cnn()
    d = random_direction(model, "filter", generator=_g(0))
    for name, p in model.named_parameters():
        if p.ndim < 2:
            assert torch.count_nonzero(d[name]) == 0
        else:
            got = d[name].reshape(p.shape[0], -1).norm(dim=1)
            assert torch.allclose(got, p.detach().reshape(p.shape[0], -1).norm(dim=1))
    layer = random_direction(model, "layer", one_dim="normalize", generator=_g(0))
    for name, p in model.named_parameters():
        assert torch.allclose(layer[name].norm(), p.detach().norm())
    raw = random_direction(model, "none", one_dim="keep", generator=_g(0))
    again = random_direction(model, "none", one_dim="keep", generator=_g(0))
    assert all(torch.equal(raw[n], again[n]) for n in raw)


def test_filter_normalized_direction_follows_relu_rescaling():
    model = cnn()
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(5.0)
    d1 = random_direction(model, generator=_g(3))
    d5 = random_direction(scaled, generator=_g(3))
    assert torch.allclose(d5["0.weight"], 5.0 * d1["0.weight"])


def test_2d_grid_equals_point_by_point_loop_and_metric(state_check):
    model, (x, y) = cnn(), images()
    check = state_check(model)
    state = torch.random.get_rng_state()
    res = loss_landscape_2d(model, ce, (x, y), num_points=(4, 3), span=((-1, 1), (-0.5, 0.5)),
                            metric=accuracy, generator=_g(0), chunk_size=5)  # fmt: skip
    assert torch.equal(state, torch.random.get_rng_state())
    check()
    g = _g(0)  # the same stream: two directions drawn one after the other
    d1, d2 = random_direction(model, generator=g), random_direction(model, generator=g)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    for i, a in enumerate(res.x.tolist()):
        for j, b in enumerate(res.y.tolist()):
            point = {n: theta[n] + a * d1[n] + b * d2[n] for n in theta}
            assert float(res.loss[i, j]) == pytest.approx(
                loop_loss(model, ce, x, y, point), rel=1e-12
            )
            out = functional_call(model, point, (x,))
            assert float(res.metric[i, j]) == pytest.approx(float(accuracy(out, y)), abs=1e-12)
    assert res.loss.shape == (4, 3) and res.direction == "random" and res.normalization == "filter"
    with torch.no_grad():
        assert res.center_loss == pytest.approx(float(ce(model(x), y)), rel=1e-12)


def test_batches_and_chunk_sizes_give_the_same_values():
    model, (x, y) = cnn(), images(11)
    one = loss_landscape_1d(model, ce, (x, y), num_points=7, generator=_g(2), chunk_size=7)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    for chunk in (None, 1, 3):
        two = loss_landscape_1d(model, ce, batches, num_points=7, generator=_g(2), chunk_size=chunk)
        assert torch.allclose(one.loss, two.loss, rtol=1e-12, atol=0)


def test_quadratic_closed_forms_along_given_and_hessian_directions(h):
    model, loss, data, A = h.quadratic_problem([4.0, 1.0, 0.25])
    dirs, eigs = hessian_directions(model, loss, data, k=2, tol=1e-10, generator=_g(0))
    assert torch.allclose(eigs, torch.tensor([4.0, 1.0], dtype=DT), rtol=1e-8)
    res = loss_landscape_2d(model, loss, data, directions="hessian", num_points=5,
                            generator=_g(0))  # fmt: skip
    X, Y = torch.meshgrid(res.x, res.y, indexing="ij")
    assert torch.allclose(res.loss, 0.5 * (4.0 * X**2 + 1.0 * Y**2), rtol=1e-8, atol=1e-12)
    assert res.eigenvalues is not None and res.argmin == (0.0, 0.0)
    line = loss_landscape_1d(model, loss, data, direction=dirs[1], span=(-2, 2), num_points=5)
    assert torch.allclose(line.loss, 0.5 * line.coords**2, rtol=1e-8)
    assert line.direction == "given" and line.normalization == "none"


def test_objective_input_and_parameter_selection():
    model, (x, y) = cnn(), images()
    obj = ModelObjective(model, ce, (x, y), params=["3.weight"])
    res = loss_landscape_1d(obj, num_points=3, generator=_g(1), normalization="layer")
    d = random_direction({"3.weight": model[3].weight.detach()}, "layer", generator=_g(1))
    theta = {n: p.detach() for n, p in model.named_parameters()}
    point = {**theta, "3.weight": theta["3.weight"] + d["3.weight"]}
    assert float(res.loss[2]) == pytest.approx(loop_loss(model, ce, x, y, point), rel=1e-12)


def test_interpolation_endpoints_and_buffers(state_check):
    a, b = cnn(0, bn=True), cnn(1, bn=True)
    x, y = images()
    with torch.no_grad():  # give the endpoints different running statistics
        a[1].running_mean.fill_(0.3)
        b[1].running_var.fill_(2.0)
    checks = [state_check(a), state_check(b)]
    with pytest.raises(ValueError, match="bn_stats='interpolate'"):
        linear_interpolation(a, b, ce, (x, y))
    path = linear_interpolation(a, b, ce, (x, y), num_points=5, bn_stats="interpolate",
                                metric=accuracy)  # fmt: skip
    for c in checks:
        c()
    assert float(path.loss[0]) == pytest.approx(float(ce(a(x), y)), rel=1e-12)
    assert float(path.loss[-1]) == pytest.approx(float(ce(b(x), y)), rel=1e-12)
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for t, u in zip(mid.state_dict().values(), b.state_dict().values(), strict=True):
            if t.is_floating_point():
                t.copy_(0.5 * t + 0.5 * u)
    assert float(path.loss[2]) == pytest.approx(float(ce(mid(x), y)), rel=1e-12)
    assert path.bn_stats == "interpolate" and path.direction == "interpolation"


def test_interpolation_recompute_and_batch_statistics(state_check):
    a, b = cnn(0, bn=True), cnn(1, bn=True)
    x, y = images(12)
    check = state_check(a)
    rec = linear_interpolation(a, b, ce, [(x[:6], y[:6]), (x[6:], y[6:])], num_points=3,
                               bn_stats="recompute")  # fmt: skip
    check()
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for p, q in zip(mid.parameters(), b.parameters(), strict=True):
            p.copy_(0.5 * p + 0.5 * q)
    mid[1].reset_running_stats()
    mid[1].momentum = None
    mid.train()
    with torch.no_grad():
        mid(x[:6])
        mid(x[6:])
    mid.eval()
    assert float(rec.loss[1]) == pytest.approx(float(ce(mid(x), y)), rel=1e-10)
    bat = linear_interpolation(a, b, ce, (x, y), num_points=3, bn_stats="batch")
    mid.train()
    assert float(bat.loss[1]) == pytest.approx(float(ce(mid(x), y)), rel=1e-10)


def test_plots_mark_the_minimum(h):
    model, loss, data, _ = h.quadratic_problem([2.0, 1.0])
    e = [
        {"theta": torch.tensor([1.0, 0.0], dtype=DT)},
        {"theta": torch.tensor([0.0, 1.0], dtype=DT)},
    ]
    res = loss_landscape_2d(model, loss, data, directions=e, num_points=5)
    assert isinstance(res, Landscape2D)
    fig = res.plot("contour")
    assert any(line.get_marker() == "*" for line in fig.axes[0].lines)
    fig3 = res.plot("surface", log=True)
    assert fig3.axes[0].name == "3d"
    line = loss_landscape_1d(model, loss, data, direction=e[0], num_points=5)
    assert isinstance(line, Landscape1D) and line.argmin == 0.0
    assert line.plot(label="w").axes[0].get_legend() is not None
    with pytest.raises(ValueError, match="no metric"):
        line.plot(metric=True)
    with pytest.raises(ValueError, match="kind"):
        res.plot("bars")


def test_errors_name_the_argument():
    model, (x, y) = cnn(), images()
    with pytest.raises(ValueError, match="span"):
        loss_landscape_1d(model, ce, (x, y), span=(1, -1))
    with pytest.raises(ValueError, match="num_points"):
        loss_landscape_1d(model, ce, (x, y), num_points=1)
    with pytest.raises(ValueError, match="direction"):
        loss_landscape_1d(model, ce, (x, y), direction="sideways")
    with pytest.raises(ValueError, match="normalization"):
        loss_landscape_2d(model, ce, (x, y), normalization="model")
    with pytest.raises(TypeError, match="pair of dicts"):
        loss_landscape_2d(model, ce, (x, y), directions={"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="same parameters"):
        linear_interpolation(model, nn.Linear(2, 2).to(DT), ce, (x, y))
    with pytest.raises(ValueError, match="direction\\['0.weight'\\] has shape"):
        theta = {n: p.detach() for n, p in model.named_parameters()}
        normalize_direction({n: torch.zeros(1, dtype=DT) for n in theta}, theta)


def test_unknown_or_bad_options_are_refused_before_any_work():
    model, (x, y) = cnn(), images()
    with pytest.raises(TypeError, match=r"\['chunksize'\]"):
        loss_landscape_1d(model, ce, (x, y), chunksize=4)
    with pytest.raises(TypeError, match="got one dict"):
        loss_landscape_2d(model, ce, (x, y), directions=random_direction(model, generator=_g(0)))
    with pytest.raises(ValueError, match="memory"):
        loss_landscape_2d(model, ce, (x, y), memory=0)
    with pytest.raises(ValueError, match="chunk_size"):
        loss_landscape_1d(model, ce, (x, y), chunk_size=0)
