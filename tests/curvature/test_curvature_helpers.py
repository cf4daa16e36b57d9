"""select_params, flatten/unflatten, as_batches, preserve_model_state and ModelObjective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from sharpgen.curvature import (
    ModelObjective,
    apply_state_policy,
    as_batches,
    dataset_reduce,
    flatten_params,
    model_state_policy,
    num_samples,
    preserve_model_state,
    select_params,
    unflatten_params,
)

DT = torch.float64


# -- select_params --------------------------------------------------------------------------
def test_select_params_kinds(cv):
    model = cv.FrozenUnused().to(DT)
    assert list(select_params(model)) == ["unused", "lin.weight", "lin.bias"]
    assert list(select_params(model, ("scale", "lin.bias"))) == ["scale", "lin.bias"]
    sel = select_params(model, lambda n, p: p.ndim == 1)
    assert list(sel) == ["scale", "unused", "lin.bias"]
    assert sel["scale"] is model.scale  # the model's own tensors, not copies
    value = torch.zeros(2, dtype=DT)
    assert select_params(model, {"unused": value})["unused"] is value
    with pytest.raises(ValueError, match=r"params\['unused'\] has shape \(3,\)"):
        select_params(model, {"unused": torch.zeros(3, dtype=DT)})
    with pytest.raises(TypeError, match="must hold parameter names"):
        select_params(model, [1])


# -- flatten / unflatten --------------------------------------------------------------------
def test_flatten_roundtrip_vector_and_block():
    like = {"w": torch.empty(2, 3), "b": torch.empty(2)}
    vec = torch.arange(8.0)
    d = unflatten_params(vec, like)
    assert d["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and d["b"].tolist() == [6, 7]
    assert d["w"].data_ptr() == vec.data_ptr()  # views
    assert torch.equal(flatten_params(d), vec)
    block = torch.arange(24.0).reshape(8, 3)  # 3 columns
    db = unflatten_params(block, like)
    assert db["w"].shape == (3, 2, 3) and db["b"].shape == (3, 2)
    for j in range(3):
        col = unflatten_params(block[:, j], like)
        assert torch.equal(db["w"][j], col["w"]) and torch.equal(db["b"][j], col["b"])
    assert torch.equal(flatten_params(db, batched=True), block)
    with pytest.raises(ValueError, match=r"parameters have 8 entries"):
        unflatten_params(torch.zeros(9), like)
    with pytest.raises(ValueError, match="d is empty"):
        flatten_params({})
    with pytest.raises(ValueError, match="same leading size k"):
        flatten_params({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)}, batched=True)


# -- data ------------------------------------------------------------------------------------
def test_as_batches_and_num_samples():
    x, y = torch.zeros(5, 3), torch.zeros(5)
    assert as_batches((x, y)).single and len(list(as_batches([x, y]))) == 1
    assert not as_batches([(x, y)]).single
    two = as_batches([[x, y], [x, y]])  # DataLoader-style list batches
    assert len(list(two)) == 2 and len(list(two)) == 2  # re-iterable
    assert as_batches(((x, x), y)).single  # tuple inputs
    assert as_batches(({"a": x}, None)).single
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    assert [num_samples(i) for i, _ in as_batches(loader)] == [2, 2, 1]
    with pytest.warns(UserWarning, match="one-shot iterator"):
        gen = as_batches(b for b in [(x, y), (x, y)])
    assert len(list(gen)) == 2 and len(list(gen)) == 2
    assert num_samples((x[:4], x)) == 4
    with pytest.raises(ValueError, match="0-dimensional"):
        num_samples(torch.tensor(1.0))


# -- preserve_model_state ------------------------------------------------------------------
def test_preserve_model_state_restores_everything(cv, state_check):
    model = cv.make_convbn()
    model.train()
    model.fc.eval()
    model.conv.weight.grad = torch.full_like(model.conv.weight, 3.0)
    model.fc.bias.requires_grad_(False)
    check = state_check(model)
    with pytest.raises(RuntimeError, match="inside"):
        with preserve_model_state(model):
            model(torch.randn(4, 1, 5, 5, dtype=DT))  # updates running stats
            with torch.no_grad():
                model.conv.weight.add_(1.0)
            model.conv.weight.grad.mul_(0.0)
            model.conv.bias.grad = torch.ones_like(model.conv.bias)
            model.fc.bias.requires_grad_(True)
            model.bn.track_running_stats = False
            model.eval()
            model.bn._buffers["running_mean"] = torch.zeros(2, dtype=DT)
            raise RuntimeError("inside")
    check()


def test_state_policy_flags(cv, state_check):
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.1)
    ).to(DT)
    check = state_check(model)
    with model_state_policy(model, bn="batch", dropout=True):
        assert not model.training and not model[0].training
        assert model[1].training and not model[1].track_running_stats
        assert model[2].training
        model(torch.randn(4, 2, dtype=DT))
    check()
    apply_state_policy(model)  # bare helper: eval everywhere
    assert not any(m.training for m in model.modules())


# -- ModelObjective ------------------------------------------------------------------------
def _truth_loss(model, loss_fn, params, x, y):
    return loss_fn(functional_call(model.eval(), params, (x,)), y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_objective_loss_gradient_at_other_points(cv, state_check, reduction):
    model = cv.make_mlp()
    x, y = cv.regression_data(n=10)

    def loss_fn(o, t):
        return F.mse_loss(o, t, reduction=reduction)

    check = state_check(model)
    obj = ModelObjective(
        model, loss_fn, DataLoader(TensorDataset(x, y), batch_size=4), reduction=reduction
    )
    assert obj.num_samples == 10 and obj.numel == 26
    g = torch.Generator().manual_seed(5)
    other = {
        n: p + 0.1 * torch.randn(p.shape, dtype=DT, generator=g) for n, p in obj.params.items()
    }
    ref = cv.make_mlp()
    for params in (None, other):
        point = obj.params if params is None else params
        loss, grad = obj.loss_and_gradient(params)
        truth = _truth_loss(ref, loss_fn, point, x, y)
        assert torch.allclose(obj.loss(params), truth, rtol=1e-13, atol=0)
        assert torch.allclose(loss, truth, rtol=1e-13, atol=0)
        gtruth = torch.func.grad(lambda p: _truth_loss(ref, loss_fn, p, x, y))(point)
        for n in point:
            assert torch.allclose(grad[n], gtruth[n], rtol=1e-12, atol=1e-15)
    check()
    # obj.params are copies: changing the model does not move the base point
    with torch.no_grad():
        model[0].bias.add_(1.0)
    assert not torch.equal(obj.params["0.bias"], model[0].bias)


def test_objective_unselected_params_follow_the_model(cv):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    obj = ModelObjective(model, F.mse_loss, (x, y), ["2.bias"])
    before = obj.loss()
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    assert not torch.equal(obj.loss(), before)
    assert torch.allclose(obj.loss(), F.mse_loss(model(x), y), rtol=1e-14)


def test_objective_resolve_errors(cv):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    obj = ModelObjective(model, F.mse_loss, (x, y))
    with pytest.raises(ValueError, match=r"missing \['2.bias'\]"):
        obj.loss({n: p for n, p in obj.params.items() if n != "2.bias"})
    bad = dict(obj.params, **{"2.bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="dtype torch.float32"):
        obj.gradient(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        obj.hvp({n: p[None] for n, p in obj.params.items()}, backend="x")


def test_dataset_reduce_weights():
    parts, count = dataset_reduce([torch.tensor(6.0), torch.ones(2) * 3], 3, "mean")
    assert count == 3 and parts[0].item() == 2.0 and parts[1].tolist() == [1.0, 1.0]
    parts, _ = dataset_reduce([torch.tensor(6.0)], 3, "sum")
    assert parts[0].item() == 6.0


def test_process_group_hook_single_process(cv, tmp_path):
    """The all-reduce path with a one-process gloo group equals the local result."""
    import torch.distributed as dist

    model = cv.make_mlp()
    x, y = cv.regression_data(n=10)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    local = ModelObjective(model, F.mse_loss, data)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        group = dist.group.WORLD
        dist_obj = ModelObjective(model, F.mse_loss, data, process_group=group)
        assert dist_obj.num_samples == 10
        assert torch.allclose(dist_obj.loss(), local.loss(), rtol=1e-14)
        g1, g2 = dist_obj.gradient(), local.gradient()
        assert all(torch.allclose(g1[n], g2[n], rtol=1e-13) for n in g1)
        V = {n: torch.ones(2, *p.shape, dtype=DT) for n, p in local.params.items()}
        h1, h2 = dist_obj.hvp(V), local.hvp(V)
        assert all(torch.allclose(h1[n], h2[n], rtol=1e-13) for n in h1)
    finally:
        dist.destroy_process_group()
