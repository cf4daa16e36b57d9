"""The Sequential fast path of landscape grids: exact against a point-by-point loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sharpgen import ModelObjective
from sharpgen.landscape import _grid, loss_landscape_1d, loss_landscape_2d, random_direction
from sharpgen.landscape._fastseq import compile_rest

DT = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def ce(out, y):
    return nn.functional.cross_entropy(out, y)


def accuracy(out, y):
    return (out.argmax(1) == y).to(out.dtype).mean()


def pool_cnn(seed=0, extra=()):
    """Conv, ReLU, 2x2 max-pool (odd 7x7 map: the last row/column dropped), conv, Flatten."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), *extra,
              nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
              nn.Linear(4 * 3 * 3, 3)]  # fmt: skip
    return nn.Sequential(*layers).to(DT).eval()


def data(n=9, seed=1):
    g = _g(seed)
    return torch.randn(n, 2, 7, 7, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)


def loop_2d(model, x, y, res, seed):
    g = _g(seed)
    d1, d2 = random_direction(model, generator=g), random_direction(model, generator=g)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    want = torch.empty(len(res.x), len(res.y), dtype=DT)
    for i, a in enumerate(res.x.tolist()):
        for j, b in enumerate(res.y.tolist()):
            point = {n: theta[n] + a * d1[n] + b * d2[n] for n in theta}
            want[i, j] = ce(functional_call(model, point, (x,)), y)
    return want


@pytest.fixture
def fast_taken(monkeypatch):
    """Records whether each batch's evaluator took the fast path."""
    seen = []
    original = _grid._Evaluator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.fast is not None)

    monkeypatch.setattr(_grid._Evaluator, "__init__", init)
    return seen


def test_fast_path_equals_point_by_point_loop(state_check, fast_taken):
    model, (x, y) = pool_cnn(), data()
    check = state_check(model)
    res = loss_landscape_2d(model, ce, (x, y), num_points=(4, 5), metric=accuracy,
                            generator=_g(0))  # fmt: skip
    check()
    assert fast_taken == [True]
    assert torch.allclose(res.loss, loop_2d(model, x, y, res, 0), rtol=1e-12, atol=0)
    assert res.metric is not None and ((res.metric * 9).round() == res.metric * 9).all()


def test_fast_path_over_batches_and_given_chunks(fast_taken):
    model, (x, y) = pool_cnn(), data(11)
    one = loss_landscape_1d(model, ce, (x, y), num_points=6, generator=_g(2))
    for chunk in (None, 1, 4):
        two = loss_landscape_1d(model, ce, [(x[:5], y[:5]), (x[5:], y[5:])], num_points=6,
                                generator=_g(2), chunk_size=chunk)  # fmt: skip
        assert torch.allclose(one.loss, two.loss, rtol=1e-12, atol=0)
    assert all(fast_taken)


def test_unsupported_layer_falls_back_to_vmap_with_the_same_values(fast_taken):
    model, (x, y) = pool_cnn(extra=(nn.BatchNorm2d(3),)), data()
    with torch.no_grad():
        model[3].running_mean.fill_(0.2)
    res = loss_landscape_2d(model, ce, (x, y), num_points=3, generator=_g(0))
    assert fast_taken == [False]
    assert torch.allclose(res.loss, loop_2d(model, x, y, res, 0), rtol=1e-12, atol=0)


def test_only_selected_parameters_move_on_the_fast_path(fast_taken):
    model, (x, y) = pool_cnn(), data()
    obj = ModelObjective(model, ce, (x, y), params=["3.weight", "6.bias"])
    res = loss_landscape_1d(obj, num_points=3, generator=_g(1), normalization="layer",
                            one_dim="normalize")  # fmt: skip
    assert fast_taken == [True]
    sub = {n: p.detach() for n, p in model.named_parameters() if n in ("3.weight", "6.bias")}
    d = random_direction(sub, "layer", one_dim="normalize", generator=_g(1))
    theta = {n: p.detach() for n, p in model.named_parameters()}
    point = {**theta, **{n: theta[n] + d[n] for n in d}}
    want = float(ce(functional_call(model, point, (x,)), y))
    assert float(res.loss[2]) == pytest.approx(want, rel=1e-12)


def test_compile_refuses_hooked_or_custom_layers():
    model = pool_cnn()
    head = torch.zeros(1, 3, 7, 7, dtype=DT)
    values = {n: p.detach() for n, p in model.named_parameters()}
    assert compile_rest(model[1:], "", head, values) is not None
    handle = model[4].register_forward_hook(lambda *a: None)
    assert compile_rest(model[1:], "", head, values) is None
    handle.remove()

    class Custom(nn.Module):
        def forward(self, h):
            return h.view(h.shape[0], -1)  # would fail on a channels-last map

    custom = nn.Sequential(nn.Conv2d(2, 3, 1), Custom(), nn.Linear(3 * 49, 2)).to(DT)
    x, y = data(4)
    assert compile_rest(custom[1:], "", head, values) is None
    res = loss_landscape_1d(custom, ce, (x, y % 2), num_points=3, generator=_g(0))
    assert torch.isfinite(res.loss).all()
