"""`preserve_model_state` writes back only what changed, so version counters and caches hold."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sharpgen.curvature._products as products_module
from sharpgen import HessianOperator, preserve_model_state, top_eigenvalues

DT = torch.float64


def _bn_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    model.train()
    model(torch.randn(6, 3, dtype=DT, generator=g))  # move the running statistics
    return model.eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, dtype=DT, generator=g), torch.randn(8, 1, dtype=DT, generator=g)


def _versions(model: nn.Module) -> list[int]:
    return [t._version for t in (*model.parameters(), *model.buffers())]


def test_untouched_tensors_keep_their_version_counters():
    model = _bn_model()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = _versions(model)
    grad_version = model[0].weight.grad._version
    with preserve_model_state(model):
        model.eval()
        model(_data()[0])  # eval mode: nothing is written
    assert _versions(model) == before
    assert model[0].weight.grad._version == grad_version


def test_written_tensors_are_restored_also_through_data():
    model = _bn_model()
    mean = model[1].running_mean.clone()
    weight = model[0].weight.detach().clone()
    grad = torch.full_like(model[0].weight, 2.0)
    model[0].weight.grad = grad
    with preserve_model_state(model):
        model.train()
        model(_data()[0])  # writes the running statistics in place
        model[0].weight.data.mul_(3.0)  # a write the version counter does not see
        model[0].weight.grad.data.zero_()
    assert torch.equal(model[1].running_mean, mean)
    assert torch.equal(model[0].weight, weight)
    assert model[0].weight.grad is grad and torch.equal(grad, torch.full_like(grad, 2.0))


def test_nan_values_are_not_mistaken_for_writes():
    model = nn.Linear(2, 1).to(DT)
    model.register_buffer("stat", torch.tensor([float("nan"), 1.0], dtype=DT))
    version = model.stat._version
    with preserve_model_state(model):
        pass
    assert model.stat._version == version and torch.isnan(model.stat[0])


def _count_builds(monkeypatch) -> list[int]:
    """Count the kept graphs built (a batch product with a cache key that does not match)."""
    calls = [0]
    build = products_module._build

    def counting(obj, kernel, key, *args, **kwargs):
        if key is not None:  # graphs (re)built to be kept
            calls[0] += 1
        return build(obj, kernel, key, *args, **kwargs)

    monkeypatch.setattr(products_module, "_build", counting)
    return calls


def test_kept_graph_built_once_on_a_batchnorm_model(monkeypatch):
    """Before the fix every product rebuilt it (restored BN buffers changed their versions)."""
    calls = _count_builds(monkeypatch)
    model = _bn_model()
    op = HessianOperator(
        model, nn.functional.mse_loss, _data(), backend="autograd", cache_graph=True
    )
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        op.matvec(torch.randn(op.shape[0], dtype=DT, generator=g))
    assert calls[0] == 1
    # a real change of a buffer is seen: the graph is rebuilt
    with torch.no_grad():
        model[1].running_var.mul_(2.0)
    op.matvec(torch.ones(op.shape[0], dtype=DT))
    assert calls[0] == 2


def test_top_eigenvalues_single_batch_builds_one_graph(monkeypatch):
    calls = _count_builds(monkeypatch)
    res = top_eigenvalues(
        _bn_model(),
        nn.functional.mse_loss,
        _data(),
        k=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert res.num_matvecs > 3 and calls[0] == 1


def test_cache_graph_with_several_batches_keeps_them_or_warns():
    x, y = _data()
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    model = _bn_model()
    plain = HessianOperator(model, nn.functional.mse_loss, loader).to_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bn="eval", double backward: the graphs are kept
        kept = HessianOperator(model, nn.functional.mse_loss, loader, cache_graph=True)
        dense = kept.to_dense()
    assert torch.allclose(dense, plain, rtol=1e-12, atol=1e-12)
    with pytest.warns(UserWarning, match="keeps the gradient graphs of several batches only"):
        op = HessianOperator(model, nn.functional.mse_loss, loader, bn="batch", cache_graph=True)
    batch = HessianOperator(model, nn.functional.mse_loss, loader, bn="batch").to_dense()
    assert torch.allclose(op.to_dense(), batch, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cache_graph", [False, True])
def test_selected_parameters_are_fixed_at_construction_others_are_read_live(cache_graph):
    """What the curvature guide states: the base point is a copy; the rest is the model's."""
    model = _bn_model()
    loss = nn.functional.mse_loss
    op = HessianOperator(
        model, loss, _data(), params=["0.weight"], backend="autograd", cache_graph=cache_graph
    )
    v = torch.linspace(-1.0, 1.0, op.shape[0], dtype=DT)
    before = op @ v
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # a selected parameter: not seen
    assert torch.equal(op @ v, before)
    with torch.no_grad():
        model[0].weight.div_(2.0)
        model[3].weight.mul_(3.0)  # an unselected parameter: seen (the kept graph is rebuilt)
    after = op @ v
    fresh = HessianOperator(model, loss, _data(), params=["0.weight"], backend="autograd")
    assert not torch.allclose(after, before)
    assert torch.allclose(after, fresh @ v, rtol=1e-12, atol=1e-12)
