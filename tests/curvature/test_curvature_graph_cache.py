"""Kept gradient graphs across the batches of a loader: same products, fewer passes."""

import pytest
import torch
import torch.nn.functional as F

import sharpgen.curvature._products as products
from sharpgen.curvature import HessianOperator
from sharpgen.curvature._backend import plan_backend

DT = torch.float64


def loader(cv, sizes=(4, 4, 3)):
    x, y = cv.image_data(n=sum(sizes))
    out, start = [], 0
    for s in sizes:  # an uneven last batch
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def mlp_loader(cv, sizes=(4, 4, 3)):
    x, y = cv.regression_data(n=sum(sizes))
    return [(x[a : a + s], y[a : a + s]) for a, s in zip((0, 4, 8), sizes, strict=True)]


@pytest.mark.parametrize("case", ["mlp", "convbn"])
def test_kept_graphs_of_several_batches_give_the_dense_hessian(cv, state_check, case):
    if case == "mlp":
        model, batches, loss = cv.make_mlp(), mlp_loader(cv), F.mse_loss
    else:
        model, batches, loss = cv.make_convbn(), loader(cv), F.cross_entropy
    data = cv.CountingBatches(batches)
    check = state_check(model)
    H = HessianOperator(model, loss, data, backend="autograd", cache_graph=True, max_block=8)
    before = data.passes
    dense = H.to_dense()  # several blocks of max_block columns
    torch.testing.assert_close(dense, cv.dense_hessian(model, loss, batches), rtol=1e-8, atol=1e-10)
    assert data.passes - before == 1  # one pass in all
    v = torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-8, atol=1e-10)
    assert data.passes - before == 1
    check()


def test_a_changed_buffer_rebuilds_the_graphs(cv):
    model = cv.make_convbn()
    batches = loader(cv)
    data = cv.CountingBatches(batches)
    H = HessianOperator(model, F.cross_entropy, data, backend="autograd", cache_graph=True)
    v = torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0))
    H.matvec(v)
    passes = data.passes
    with torch.no_grad():
        model.bn.running_mean.add_(0.5)
    fresh = HessianOperator(model, F.cross_entropy, batches, backend="autograd")
    torch.testing.assert_close(H.matvec(v), fresh.matvec(v), rtol=1e-10, atol=1e-12)
    assert data.passes == passes + 1


def test_graphs_over_the_memory_budget_are_not_kept(cv, monkeypatch):
    monkeypatch.setattr(products, "GRAPH_CACHE_BYTES", 0)
    model = cv.make_mlp()
    data = cv.CountingBatches(mlp_loader(cv))
    H = HessianOperator(model, F.mse_loss, data, backend="autograd", cache_graph=True)
    v = torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0))
    first = H.matvec(v)
    passes = data.passes
    torch.testing.assert_close(H.matvec(v), first, rtol=1e-12, atol=1e-14)
    assert data.passes == passes + 1  # built again, not kept
    assert H.objective._graph_cache[1] == ()  # and not retried


@pytest.mark.parametrize("options", [{"bn": "batch"}, {"dropout": True}, {"backend": "func"}])
def test_no_graphs_kept_when_passes_may_differ_or_memory_cannot_be_counted(cv, options):
    model = cv.make_convbn()
    data = cv.CountingBatches(loader(cv))
    options = {"backend": "autograd", **options}
    H = HessianOperator(model, F.cross_entropy, data, cache_graph=True, **options)
    v = torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0))
    H.matvec(v)
    passes = data.passes
    H.matvec(v)
    assert data.passes == passes + 1


def test_plan_and_default_backend():
    assert plan_backend("auto", single_vectors=False, single_batch=False) == ("autograd", True)
    assert plan_backend("func", single_vectors=True, single_batch=True) == ("func", False)


def test_auto_is_double_backward_on_a_cpu(cv):
    model = cv.make_mlp()
    H = HessianOperator(model, F.mse_loss, cv.regression_data())
    H.matvec(torch.ones(H.shape[0], dtype=DT))
    assert H.backend == "autograd"
