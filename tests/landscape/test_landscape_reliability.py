"""Reliability of the landscapes: fast paths only where they are exact, arguments checked first."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sharpgen.landscape import _grid, loss_landscape_1d
from sharpgen.landscape._fastseq import is_plain_sequential

DT = torch.float64


def ce(out, y):
    return nn.functional.cross_entropy(out, y)


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 4, dtype=DT, generator=g), torch.randint(0, 3, (8,), generator=g)


class Doubled(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


def _mlp():
    return [nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)]


def _subclass():
    return Doubled(*_mlp())


def _model_hook():
    m = nn.Sequential(*_mlp())
    m.register_forward_hook(lambda _m, _i, out: 3 * out)
    return m


def _model_pre_hook():
    m = nn.Sequential(*_mlp())
    m.register_forward_pre_hook(lambda _m, args: (args[0] * 0.5,))
    return m


def _child_hook():
    m = nn.Sequential(*_mlp())
    m[1].register_forward_hook(lambda _m, _i, out: out + 1)
    return m


def _first_hook():
    m = nn.Sequential(*_mlp())
    m[0].register_forward_pre_hook(lambda _m, args: (args[0] * 2,))
    return m


def _instance_forward():
    m = nn.Sequential(*_mlp())
    tanh = m[1]
    tanh.forward = lambda x: torch.sin(x)  # type: ignore[method-assign]
    return m


def _used_twice():
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3))


def _tied():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b, nn.Linear(4, 3))


REFUSED = [_subclass, _model_hook, _model_pre_hook, _child_hook, _first_hook,
           _instance_forward, _used_twice, _tied]  # fmt: skip


@pytest.fixture
def split_taken(monkeypatch):
    seen = []
    original = _grid._affine_split

    def split(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(_grid, "_affine_split", split)
    return seen


def _check_against_general_path(model, x, y):
    g = torch.Generator().manual_seed(1)
    res = loss_landscape_1d(model, ce, (x, y), num_points=5, generator=g)
    assert res.coords[2] == 0
    assert res.loss[2].item() == pytest.approx(res.center_loss, rel=1e-12, abs=0)
    # the general path: the model itself at each point (functional_call ties shared weights)
    g = torch.Generator().manual_seed(1)
    from sharpgen.landscape import random_direction

    d = random_direction(model, generator=g)
    theta = dict(model.named_parameters())
    for t, got in zip(res.coords.tolist(), res.loss.tolist(), strict=True):
        point = {n: p.detach() + t * d[n] for n, p in theta.items()}
        with torch.no_grad():
            want = ce(functional_call(model, point, (x,)), y).item()
        assert got == pytest.approx(want, rel=1e-12, abs=0)


@pytest.mark.parametrize("build", REFUSED, ids=lambda f: f.__name__.strip("_"))
def test_fast_path_refused_where_it_is_not_model_x(build, split_taken):
    torch.manual_seed(0)
    model = build().to(DT)
    x, y = _data()
    assert not is_plain_sequential(model)
    _check_against_general_path(model, x, y)
    assert split_taken and not any(split_taken)


def test_global_module_hook_refuses_the_fast_path(split_taken):
    torch.manual_seed(0)
    model = nn.Sequential(*_mlp()).to(DT)
    x, y = _data()
    calls = []

    def hook(m, _i, out):
        calls.append(type(m).__name__)
        return 1.5 * out if isinstance(m, nn.Tanh) else out

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        assert not is_plain_sequential(model)
        _check_against_general_path(model, x, y)
    finally:
        handle.remove()
    assert split_taken and not any(split_taken)
    assert is_plain_sequential(model)


def test_plain_sequential_keeps_the_fast_path(split_taken):
    torch.manual_seed(0)
    model = nn.Sequential(*_mlp()).to(DT)
    assert is_plain_sequential(model)
    _check_against_general_path(model, *_data())
    assert split_taken == [True]
