"""The columns of a double-backward block: loop or batched backward, chosen by a probe."""

import pytest
import torch
import torch.nn.functional as F

import sharpgen.curvature._columns as columns
from sharpgen.curvature import GGNOperator, HessianOperator
from sharpgen.curvature._columns import ColumnPlan, column_plan, take_columns

from .test_curvature_ggn import dense_ggn

DT = torch.float64


def _block(n, k, seed=0):
    return torch.randn(n, k, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _problem(cv, case):
    if case == "mlp":
        model, x = cv.make_mlp(), cv.regression_data(n=11)
        batches, loss = [(x[0][:6], x[1][:6]), (x[0][6:], x[1][6:])], F.mse_loss
    else:
        model, x = cv.make_convbn(), cv.image_data(n=7)
        batches, loss = [(x[0][:4], x[1][:4]), (x[0][4:], x[1][4:])], F.cross_entropy
    return model, batches, loss


@pytest.mark.parametrize("case", ["mlp", "convbn"])
@pytest.mark.parametrize("choice", ["loop", "batched"])
@pytest.mark.parametrize("cache", [False, True])
def test_both_paths_give_the_dense_hessian(cv, state_check, case, choice, cache):
    model, batches, loss = _problem(cv, case)
    check = state_check(model)
    H = HessianOperator(model, loss, batches, backend="autograd", cache_graph=cache,
                        max_block=None)  # fmt: skip
    plan = column_plan(H.objective, "hvp")
    plan.choice, plan.column_bytes = choice, columns.BATCHED_BYTES // 4  # chunks of 4
    V = _block(H.shape[0], 11)
    dense = cv.dense_hessian(model, loss, batches)
    torch.testing.assert_close(H.matmat(V), dense @ V, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(H.matmat(V), dense @ V, rtol=1e-9, atol=1e-11)  # kept graphs
    assert plan.choice == choice
    check()


@pytest.mark.parametrize("choice", ["loop", "batched"])
def test_both_paths_give_the_dense_ggn(cv, choice):
    model, batches, loss = _problem(cv, "convbn")
    G = GGNOperator(model, loss, batches, backend="autograd", max_block=None)
    plan = column_plan(G.objective, "ggn")
    plan.choice, plan.column_bytes = choice, columns.BATCHED_BYTES // 3
    V = _block(G.shape[0], 7)
    torch.testing.assert_close(G.matmat(V), dense_ggn(model, loss, batches) @ V, rtol=1e-9,
                               atol=1e-11)  # fmt: skip


@pytest.mark.parametrize("margin, expected", [(1e9, "batched"), (0.0, "loop")])
def test_the_probe_decides_once_and_its_columns_are_the_products(cv, monkeypatch, margin,
                                                                 expected):  # fmt: skip
    monkeypatch.setattr(columns, "MARGIN", margin)
    monkeypatch.setattr(columns, "PROBE_ON_CPU", True)
    model, batches, loss = _problem(cv, "convbn")
    H = HessianOperator(model, loss, batches, backend="autograd", cache_graph=True,
                        max_block=None)  # fmt: skip
    plan = column_plan(H.objective, "hvp")
    dense = cv.dense_hessian(model, loss, batches)
    V = _block(H.shape[0], 3)
    torch.testing.assert_close(H.matmat(V), dense @ V, rtol=1e-9, atol=1e-11)
    assert plan.choice is None and plan.column_bytes > 0  # too narrow to probe
    V = _block(H.shape[0], columns.PROBE_COLUMNS + 2, seed=1)
    torch.testing.assert_close(H.matmat(V), dense @ V, rtol=1e-9, atol=1e-11)
    assert plan.choice == expected
    assert plan.loop_seconds > 0 and plan.batched_seconds > 0
    seen = (plan.loop_seconds, plan.batched_seconds)
    torch.testing.assert_close(H.matmat(V), dense @ V, rtol=1e-9, atol=1e-11)
    assert (plan.loop_seconds, plan.batched_seconds) == seen  # probed once


def test_over_the_memory_cap_the_loop_is_chosen_without_a_probe(cv, monkeypatch):
    monkeypatch.setattr(columns, "BATCHED_BYTES", 0)
    monkeypatch.setattr(columns, "PROBE_ON_CPU", True)
    model, batches, loss = _problem(cv, "mlp")
    H = HessianOperator(model, loss, batches, backend="autograd", max_block=None)
    V = _block(H.shape[0], 12)
    torch.testing.assert_close(H.matmat(V), cv.dense_hessian(model, loss, batches) @ V,
                               rtol=1e-9, atol=1e-11)  # fmt: skip
    plan = column_plan(H.objective, "hvp")
    assert plan.choice == "loop" and plan.loop_seconds is None


def test_on_a_cpu_the_columns_loop_without_a_probe(cv):
    model, batches, loss = _problem(cv, "mlp")
    H = HessianOperator(model, loss, batches, backend="autograd", cache_graph=True,
                        max_block=None)  # fmt: skip
    V = _block(H.shape[0], 12)
    first = H.matmat(V)
    plan = column_plan(H.objective, "hvp")
    assert plan == ColumnPlan(choice="loop")  # no bytes counted, nothing timed
    again = HessianOperator(model, loss, batches, backend="autograd", max_block=None)
    assert torch.equal(again.matmat(V), first)  # bit for bit, from one objective to the next


def _linear_column(A, calls):
    """``column`` of the linear map A (rows of a chunk are columns), recording the calls."""

    def column(v, retain, batched):
        calls.append((tuple(v[0].shape), retain, batched))
        if batched and v[0].shape[0] > 2:
            raise RuntimeError("no batching rule")  # like vmap on an op without one
        return [v[0] @ A.T]

    return column


@pytest.mark.parametrize("keep", [False, True])
def test_take_columns_order_chunks_and_the_last_backward(keep):
    A = torch.arange(12.0, dtype=DT).reshape(4, 3)
    V = [_block(10, 3)]
    plan = ColumnPlan(choice="batched", column_bytes=columns.BATCHED_BYTES // 2)
    calls = []
    out = take_columns(plan, V, _linear_column(A, calls), keep)
    torch.testing.assert_close(torch.stack([c[0] for c in out]), V[0] @ A.T)
    assert [c[2] for c in calls] == [True] * 5  # chunks of 2 columns
    assert all(c[1] for c in calls)  # a batched backward retains the graph


def test_a_batched_backward_that_fails_falls_back_to_the_loop(monkeypatch):
    monkeypatch.setattr(columns, "PROBE_ON_CPU", True)
    A = torch.arange(12.0, dtype=DT).reshape(4, 3)
    V = [_block(10, 3)]
    plan = ColumnPlan(column_bytes=1)  # chunks of all columns: the fake rule fails
    calls = []
    out = take_columns(plan, V, _linear_column(A, calls), keep=False)
    torch.testing.assert_close(torch.stack([c[0] for c in out]), V[0] @ A.T)
    assert plan.choice == "loop"
    loops = [c for c in calls if not c[2]]
    assert len(loops) == 10 and [c[1] for c in loops] == [True] * 9 + [False]


def test_a_counted_graph_is_freed_with_its_last_reference():
    import gc
    import weakref

    from torch.autograd.graph import saved_tensors_hooks

    from sharpgen.curvature._columns import SavedBytes

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def counted_graph():
        counter = SavedBytes()
        with saved_tensors_hooks(counter.pack, lambda t: t):
            y = x.exp()  # exp saves its output: returned as it is, it would hold its grad_fn
            (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        assert counter.bytes >= 5 * 8  # y, and what the backward saves
        return y, g

    y, g = counted_graph()  # kept, as a kept graph is, and never backpropagated to the end
    ref = weakref.ref(y)
    del y, g
    gc.collect()
    assert ref() is None
    _, g = counted_graph()  # the double backward through a counted graph is unchanged
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, x.detach().exp())
