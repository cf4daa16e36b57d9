"""The validation's forward pass reused as the first graph build of a measure (one batch)."""

import pytest
import torch
import torch.nn.functional as F

from sharpgen import hessian_trace, top_eigenvalues
from sharpgen.curvature import HessianOperator, ModelObjective
from sharpgen.curvature._validate import keeping_first_graph

DT = torch.float64


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def vec(n, seed=0):
    return torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("measure", ["top_eigenvalues", "hessian_trace"])
def test_a_measure_on_one_batch_runs_the_model_forward_once(cv, measure):
    model, (x, y) = cv.make_convbn(), cv.image_data(n=6)
    calls, handle = count_forwards(model)
    g = torch.Generator().manual_seed(0)
    if measure == "top_eigenvalues":
        value = float(top_eigenvalues(model, F.cross_entropy, (x, y), generator=g).eigenvalues[0])
    else:
        res = hessian_trace(model, F.cross_entropy, (x, y), num_matvecs=12, generator=g)
    handle.remove()
    assert len(calls) == 1  # validation and graph build share one forward (two before)
    dense = cv.dense_hessian(model, F.cross_entropy, [(x, y)])
    if measure == "top_eigenvalues":
        assert value == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-3)
    else:
        truth = float(torch.trace(dense))
        assert float(res.value) == pytest.approx(truth, abs=5 * float(res.stderr) + 1e-9)


def test_an_objective_built_outside_a_measure_keeps_no_graph(cv):
    model, batch = cv.make_mlp(), cv.regression_data(n=8)
    obj = ModelObjective(model, F.mse_loss, batch)
    assert obj._first_graph is None  # a caller's objective holds no graph between calls
    calls, handle = count_forwards(model)
    HessianOperator(obj).matvec(vec(obj.numel))
    handle.remove()
    assert len(calls) == 1  # the build's own forward


def test_the_kept_validation_graph_serves_one_build_only(cv):
    model, batch = cv.make_mlp(), cv.regression_data(n=8)
    with keeping_first_graph():
        obj = ModelObjective(model, F.mse_loss, batch)
    assert obj._first_graph is not None
    H = HessianOperator(obj, cache_graph=False)  # a graph per product
    calls, handle = count_forwards(model)
    v = vec(obj.numel)
    first, second = H.matvec(v), H.matvec(v)
    handle.remove()
    assert len(calls) == 1 and obj._first_graph is None
    truth = cv.dense_hessian(model, F.mse_loss, [batch]) @ v
    torch.testing.assert_close(first, truth)
    torch.testing.assert_close(second, truth)


def written_buffer(model, x):
    model.bn.running_mean.add_(0.5)  # eval-mode BatchNorm reads it: the loss changes


def written_base_point(obj, x):
    next(iter(obj.params.values())).add_(0.1)  # the objective's own copy of the parameters


def new_batch_tensor(obj, x):
    x.mul_(2.0)  # the batch written in place


@pytest.mark.parametrize("write", [written_buffer, written_base_point, new_batch_tensor])
def test_a_write_after_validation_is_seen_by_the_first_build(cv, write):
    model, (x, y) = cv.make_convbn(), cv.image_data(n=6)
    with keeping_first_graph():
        obj = ModelObjective(model, F.cross_entropy, (x, y))
    write(model if write is written_buffer else obj, x)
    got = HessianOperator(obj).matvec(vec(obj.numel))
    # truth: the model at the objective's (possibly written) base point, on the data as it is
    fresh = ModelObjective(model, F.cross_entropy, (x, y), params=dict(obj.params))
    want = HessianOperator(fresh, cache_graph=False).matvec(vec(obj.numel))
    torch.testing.assert_close(got, want)
    assert obj._first_graph is None


def test_no_graph_is_kept_with_dropout_or_several_batches(cv):
    model, (x, y) = cv.make_mlp(), cv.regression_data(n=8)
    with keeping_first_graph():
        loader = ModelObjective(model, F.mse_loss, [(x[:4], y[:4]), (x[4:], y[4:])])
        dropout = ModelObjective(model, F.mse_loss, (x, y), dropout=True)
    assert loader._first_graph is None and dropout._first_graph is None


def test_the_measures_leave_the_model_and_global_rng_as_they_were(cv, state_check):
    model, batch = cv.make_convbn(), cv.image_data(n=6)
    check, rng = state_check(model), torch.get_rng_state()
    top_eigenvalues(model, F.cross_entropy, batch, generator=torch.Generator().manual_seed(1))
    check()
    assert torch.equal(torch.get_rng_state(), rng)
