"""The operators keep their gradient graphs by default (``cache_graph="auto"``), safely."""

import pytest
import torch
import torch.nn.functional as F

import sharpgen.curvature._products as products
from sharpgen.curvature import GGNOperator, HessianOperator

DT = torch.float64


@pytest.fixture
def builds(monkeypatch):
    """Count the passes that build graphs (kept or not)."""
    count = {"n": 0}
    real = products._build

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(products, "_build", counting)
    return count


def _v(H, seed=0):
    return torch.randn(H.shape[0], dtype=DT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", ["mlp", "convbn"])
def test_the_default_keeps_one_batch_graph_and_leaves_the_model_alone(cv, state_check, builds,
                                                                     case):  # fmt: skip
    if case == "mlp":
        model, (x, y), loss = cv.make_mlp(), cv.regression_data(), F.mse_loss
    else:  # BatchNorm: restoring the running statistics must not invalidate the graph
        model, (x, y), loss = cv.make_convbn(), cv.image_data(), F.cross_entropy
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    check = state_check(model)
    rng = torch.get_rng_state()
    H = HessianOperator(model, loss, (x, y))
    assert H.cache_graph == "auto"
    dense = cv.dense_hessian(model, loss, [(x, y)])
    for seed in range(3):
        v = _v(H, seed)
        torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(H.to_dense(), dense, rtol=1e-9, atol=1e-11)
    assert builds["n"] == 1
    check()
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_default_keeps_the_graphs_of_a_loader(cv, builds):
    model, (x, y) = cv.make_mlp(), cv.regression_data(n=11)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    H = HessianOperator(model, F.mse_loss, batches)
    dense = cv.dense_hessian(model, F.mse_loss, batches)
    for seed in range(2):
        v = _v(H, seed)
        torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-9, atol=1e-11)
    assert builds["n"] == 1


def test_a_step_on_the_model_leaves_the_operator_at_its_point(cv, builds):
    """All parameters selected: the operator is the Hessian at the values it copied."""
    model, (x, y) = cv.make_mlp(), cv.regression_data()
    dense = cv.dense_hessian(model, F.mse_loss, [(x, y)])
    H = HessianOperator(model, F.mse_loss, (x, y))
    v = _v(H)
    H.matvec(v)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.mse_loss(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-9, atol=1e-11)
    assert builds["n"] == 1


@pytest.mark.parametrize("change", ["step", "in place", "replaced", "data", "buffer"])
def test_what_the_graph_reads_from_outside_rebuilds_it(cv, builds, change):
    """A step on a non-selected parameter, a write into it, a new one, a write into the
    batch or into a buffer."""
    model, (x, y) = cv.make_convbn(), cv.image_data()
    x = x.clone()
    H = HessianOperator(model, F.cross_entropy, (x, y), params=["fc.weight", "fc.bias"])
    fresh = HessianOperator(model, F.cross_entropy, (x, y), params=["fc.weight", "fc.bias"],
                            cache_graph=False)  # fmt: skip
    v = _v(H)
    before = H.matvec(v)
    if change == "step":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        F.cross_entropy(model.eval()(x), y).backward()
        opt.step()
    with torch.no_grad():
        if change == "in place":
            model.conv.weight.mul_(1.5)
        elif change == "replaced":
            model.conv.weight = torch.nn.Parameter(model.conv.weight * 1.5)
        elif change == "data":
            x.mul_(2.0)
        elif change == "buffer":
            model.bn.running_var.mul_(3.0)
    after = H.matvec(v)
    torch.testing.assert_close(after, fresh.matvec(v), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(after, before)
    assert builds["n"] == 3  # H twice, fresh once


def test_auto_keeps_nothing_with_dropout_and_true_keeps_one_mask(cv, builds):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 2)).to(DT)  # fmt: skip
    x, y = cv.regression_data()
    H = HessianOperator(model, F.mse_loss, (x, y), dropout=True)
    v = _v(H)
    H.matvec(v), H.matvec(v)
    assert builds["n"] == 2
    kept = HessianOperator(model, F.mse_loss, (x, y), dropout=True, cache_graph=True)
    torch.testing.assert_close(kept.matvec(v), kept.matvec(v), rtol=0, atol=0)
    assert builds["n"] == 3


def test_the_func_ggn_is_not_kept_as_it_calls_the_model(cv, state_check, builds):
    model, (x, y) = cv.make_convbn(), cv.image_data()
    model.train()
    check = state_check(model)
    G = GGNOperator(model, F.cross_entropy, (x, y), backend="func")
    G.matvec(_v(G)), G.matvec(_v(G))
    assert builds["n"] == 2
    check()


def test_cache_graph_must_be_a_bool_or_auto(cv):
    model, data = cv.make_mlp(), cv.regression_data()
    with pytest.raises(TypeError, match="cache_graph must be True, False or 'auto', got 'yes'"):
        HessianOperator(model, F.mse_loss, data, cache_graph="yes")


def test_a_replaced_selected_parameter_rebuilds_once_with_the_same_products(cv, builds):
    model, (x, y) = cv.make_mlp(), cv.regression_data()
    H = HessianOperator(model, F.mse_loss, (x, y))
    v = _v(H)
    before = H.matvec(v)
    first = next(n for n, _ in model.named_parameters())
    module_name, attr = first.rsplit(".", 1)
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(getattr(module, attr).detach() * 2.0))
    torch.testing.assert_close(H.matvec(v), before, rtol=0, atol=0)  # the operator's copies
    torch.testing.assert_close(H.matvec(v), before, rtol=0, atol=0)
    assert builds["n"] == 2
