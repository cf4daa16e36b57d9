"""Reliability of the landscapes: fast paths only where they are exact, arguments checked first."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sharpgen.landscape import (
    _grid,
    linear_interpolation,
    loss_landscape_1d,
    normalize_direction,
    random_direction,
)
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


# -- arguments: checked first, with a clear error ----------------------------------------------
def _small():
    torch.manual_seed(0)
    return nn.Sequential(*_mlp()).to(DT)


def _zero_dir(model):
    return {n: torch.zeros_like(p) for n, p in model.named_parameters()}


BAD_GRID = [
    ("1d", {"span": (0, float("inf"))}, ValueError, r"span\[1\] must hold finite numbers"),
    ("1d", {"span": (float("nan"), 1)}, ValueError, r"span\[0\] must hold finite numbers"),
    ("1d", {"span": ("a", 1)}, TypeError, r"span\[0\] must hold real numbers, got str"),
    ("1d", {"span": "ab"}, ValueError, r"span must be a pair \(low, high\)"),
    ("1d", {"span": (1, 1)}, ValueError, "low < high"),
    ("1d", {"num_points": 1.5}, TypeError, "num_points must be an int"),
    ("2d", {"num_points": (3,)}, ValueError, "num_points must be an int or 2 ints"),
    ("2d", {"num_points": (3, 4, 5)}, ValueError, "num_points must be an int or 2 ints"),
    ("2d", {"span": ((0, 1), (0, float("inf")))}, ValueError, r"span\[1\]\[1\] must hold finite"),
    ("2d", {"directions": 5}, TypeError, "directions must be 'random', 'hessian' or 2 dict"),
    ("2d", {"directions": "up"}, ValueError, "unknown directions 'up'"),
    ("1d", {"direction": {"0.weight": [1.0]}}, TypeError, r"direction\['0.weight'\] must be"),
    ("1d", {"direction": "dict"}, ValueError, "unknown direction 'dict'"),
    ("1d", {"metric": "accuracy"}, TypeError, "metric must be a callable"),
    ("1d", {"progress": "yes"}, TypeError, "progress must be a bool"),
    ("1d", {"normalization": "filters"}, ValueError, "unknown normalization 'filters'"),
    ("1d", {"one_dim": "drop"}, ValueError, "unknown one_dim 'drop'"),
    ("1d", {"reduction": "avg"}, ValueError, "unknown reduction 'avg'"),
    ("1d", {"memory": "1GB"}, TypeError, "memory must be a real number"),
]


@pytest.mark.parametrize(("dims", "kwargs", "error", "match"), BAD_GRID)
def test_grid_arguments_are_refused_before_any_work(monkeypatch, dims, kwargs, error, match):
    model = _small()
    x, y = _data()

    def never(*_a, **_k):
        raise AssertionError("an objective was built before the arguments were checked")

    from sharpgen.landscape import _surface

    monkeypatch.setattr(_surface, "objective_of", never)
    run = loss_landscape_1d if dims == "1d" else _surface.loss_landscape_2d
    with pytest.raises(error, match=match):
        run(model, ce, (x, y), **kwargs)


def test_given_direction_with_wrong_names_or_shapes():
    model, (x, y) = _small(), _data()
    d = _zero_dir(model)
    with pytest.raises(ValueError, match=r"missing \['0.bias'"):
        loss_landscape_1d(model, ce, (x, y), direction={"0.weight": d["0.weight"]})
    with pytest.raises(ValueError, match=r"direction\['2.bias'\] has shape \(4,\)"):
        loss_landscape_1d(model, ce, (x, y), direction={**d, "2.bias": torch.zeros(4, dtype=DT)})


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((5,), {}, TypeError, "params must be a dict name -> Tensor .* or a module, got int"),
        (({"w": [1.0]},), {}, TypeError, r"params\['w'\] must be a Tensor, got list"),
        (({"w": torch.ones(2, dtype=torch.long)},), {}, TypeError, "floating-point"),
        (({},), {}, ValueError, "params is empty"),
        ((None, "filters"), {}, ValueError, "unknown normalization 'filters'"),
        ((None,), {"one_dim": "drop"}, ValueError, "unknown one_dim 'drop'"),
        ((None,), {"select": lambda n, p: True, "as_dict": True}, TypeError, "select is only"),
    ],
)
def test_random_direction_checks_everything_before_drawing(args, kwargs, error, match):
    model = _small()
    if args[0] is None:
        args = (model,) + args[1:]
    if kwargs.pop("as_dict", False):
        args = (dict(model.named_parameters()),) + args[1:]
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    with pytest.raises(error, match=match):
        random_direction(*args, generator=g, **kwargs)
    assert torch.equal(g.get_state(), state)  # nothing drawn


@pytest.mark.parametrize(
    ("direction", "error", "match"),
    [
        (5, TypeError, "direction must be a dict name -> Tensor"),
        ({"w": 3}, TypeError, r"direction\['w'\] must be a Tensor, got int"),
        ({"v": torch.ones(2, 2)}, ValueError, r"missing \['w'\], unknown \['v'\]"),
        ({"w": torch.ones(3)}, ValueError, r"direction\['w'\] has shape \(3,\)"),
    ],
)
def test_normalize_direction_refuses_bad_directions(direction, error, match):
    with pytest.raises(error, match=match):
        normalize_direction(direction, {"w": torch.ones(2, 2)})
    with pytest.raises(TypeError, match="params must be a dict"):
        normalize_direction({"w": torch.ones(2, 2)}, [("w", torch.ones(2, 2))])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"span": (0, float("nan"))}, ValueError, r"span\[1\] must hold finite numbers"),
        ({"metric": 3}, TypeError, "metric must be a callable"),
        ({"loss_fn": "mse"}, TypeError, "loss_fn must be a callable"),
        ({"progress": 1}, TypeError, "progress must be a bool"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be an int >= 1"),
        ({"reduction": "avg"}, ValueError, "unknown reduction"),
    ],
)
def test_linear_interpolation_arguments(kwargs, error, match):
    a, (x, y) = _small(), _data()
    loss_fn = kwargs.pop("loss_fn", ce)
    with pytest.raises(error, match=match):
        linear_interpolation(a, a, loss_fn, (x, y), **kwargs)


def test_recompute_with_a_one_shot_iterator_equals_a_list():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    b = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = _data()
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    want = linear_interpolation(a, b, ce, batches, bn_stats="recompute", num_points=3)
    with pytest.warns(UserWarning, match="one-shot iterator"):
        got = linear_interpolation(a, b, ce, iter(batches), bn_stats="recompute", num_points=3)
    assert torch.equal(got.loss, want.loss)


class _ClassicSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # no setup_context: torch.func (vmap) cannot trace it
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareNet(nn.Module):
    def __init__(self, classic: bool) -> None:
        super().__init__()
        self.classic = classic
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(_ClassicSquare.apply(h) if self.classic else h * h)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_a_model_vmap_cannot_trace_is_evaluated_point_by_point(chunk_size):
    torch.manual_seed(0)
    classic, plain = _SquareNet(True).to(DT), _SquareNet(False).to(DT)
    plain.load_state_dict(classic.state_dict())
    x, y = _data()
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]

    def run(model):
        g = torch.Generator().manual_seed(1)
        return loss_landscape_1d(model, ce, batches, num_points=41, chunk_size=chunk_size,
                                 generator=g)  # fmt: skip

    want = run(plain)
    with pytest.warns(RuntimeWarning, match="evaluated one at a time"):
        got = run(classic)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-14)
    b = _SquareNet(True).to(DT)
    with pytest.warns(RuntimeWarning, match="evaluated one at a time"):
        path = linear_interpolation(classic, b, ce, batches, num_points=9, chunk_size=4)
    assert path.loss.isfinite().all()


def test_hessian_directions_checks_tol_and_generator_first(monkeypatch):
    from sharpgen.landscape import hessian_directions
    from sharpgen.sharpness import _objective_arg

    def never(*_a, **_k):
        raise AssertionError("an objective was built before the arguments were checked")

    monkeypatch.setattr(_objective_arg, "objective_of", never)
    model, (x, y) = _small(), _data()
    with pytest.raises(TypeError, match="tol must be a real number"):
        hessian_directions(model, ce, (x, y), tol="tight")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        hessian_directions(model, ce, (x, y), generator=0)
