"""HessianOperator against dense float64 truth (torch.func.hessian), both backends."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import eigsh
from torch.utils.data import DataLoader, TensorDataset

from sharpgen.curvature import HessianOperator

DT = torch.float64
RTOL = 1e-8
BACKENDS = ["func", "autograd"]


def _close(A, B, rtol=RTOL):
    scale = B.abs().max().clamp_min(1e-300)
    assert (A - B).abs().max() <= rtol * scale, float((A - B).abs().max() / scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_mse(cv, state_check, backend):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    check = state_check(model)
    H = HessianOperator(model, F.mse_loss, (x, y), backend=backend)
    D = H.to_dense()
    _close(D, cv.dense_hessian(model, F.mse_loss, [(x, y)]))
    assert H.shape == (26, 26) and H.dtype == DT and H.num_matvecs == 26
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_classifier_cross_entropy(cv, state_check, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model = model.to(DT)
    x, y = cv.classification_data()
    check = state_check(model)
    H = HessianOperator(model, F.cross_entropy, (x, y), backend=backend)
    _close(H.to_dense(), cv.dense_hessian(model, F.cross_entropy, [(x, y)]))
    check()


@pytest.mark.parametrize("bn", ["eval", "batch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_batchnorm(cv, state_check, bn, backend):
    model = cv.make_convbn()
    model.train()  # the caller's flag must survive
    x, y = cv.image_data()
    check = state_check(model)
    H = HessianOperator(model, F.cross_entropy, (x, y), bn=bn, backend=backend)
    D = H.to_dense()
    truth = cv.dense_hessian(model, F.cross_entropy, [(x, y)], bn=bn)
    _close(D, truth)
    other = cv.dense_hessian(
        model, F.cross_entropy, [(x, y)], bn="batch" if bn == "eval" else "eval"
    )
    assert (D - other).abs().max() > 1e-3 * truth.abs().max()  # the two modes really differ
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_and_unused_parameters(cv, state_check, backend):
    torch.manual_seed(0)
    model = cv.FrozenUnused().to(DT)
    x, y = cv.regression_data()
    check = state_check(model)
    H = HessianOperator(model, F.mse_loss, (x, y), backend=backend)
    assert list(H.params) == ["unused", "lin.weight", "lin.bias"]  # named_parameters order
    D = H.to_dense()
    _close(D, cv.dense_hessian(model, F.mse_loss, [(x, y)]))
    assert torch.all(D[:2] == 0) and torch.all(D[:, :2] == 0)
    # the frozen parameter can be selected by name; its curvature is then included
    H2 = HessianOperator(model, F.mse_loss, (x, y), ["lin.weight", "scale"], backend=backend)
    names = ["lin.weight", "scale"]
    _close(H2.to_dense(), cv.dense_hessian(model, F.mse_loss, [(x, y)], names=names))
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dict_input_model(cv, state_check, backend):
    torch.manual_seed(0)
    model = cv.DictInput().to(DT)
    inputs, y = cv.dict_data()
    check = state_check(model)
    H = HessianOperator(model, F.mse_loss, (inputs, y), backend=backend)
    _close(H.to_dense(), cv.dense_hessian(model, F.mse_loss, [(inputs, y)]))
    check()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uneven_dataloader_equals_full_batch(cv, state_check, backend, reduction):
    model = cv.make_mlp()
    x, y = cv.regression_data(n=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches of 4, 4, 2

    def loss_fn(o, t):
        return F.mse_loss(o, t, reduction=reduction)

    check = state_check(model)
    H = HessianOperator(model, loss_fn, loader, reduction=reduction, backend=backend)
    assert H.num_samples == 10
    _close(H.to_dense(), cv.dense_hessian(model, loss_fn, [(x, y)]))
    check()


def test_subset_selection_is_a_block_of_the_full_hessian(cv):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    full = HessianOperator(model, F.mse_loss, (x, y)).to_dense()
    H = HessianOperator(model, F.mse_loss, (x, y), lambda name, p: name.startswith("2."))
    assert list(H.params) == ["2.weight", "2.bias"]
    _close(H.to_dense(), full[16:, 16:])


def test_block_matmat_equals_columns_and_counts(cv):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    H = HessianOperator(model, F.cross_entropy, (x, y.softmax(1)))
    V = torch.randn(26, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    block = H.matmat(V)
    cols = torch.stack([H.matvec(V[:, j]) for j in range(5)], 1)
    _close(block, cols, rtol=1e-12)
    assert H.num_matvecs == 10
    chunked = HessianOperator(model, F.cross_entropy, (x, y.softmax(1)), max_block=2)
    _close(chunked.matmat(V), cols, rtol=1e-12)  # 5 columns in passes of 2, 2, 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_graph_matches_and_follows_model_changes(cv, state_check, backend):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    truth = cv.dense_hessian(model, F.mse_loss, [(x, y)], names=["2.weight", "2.bias"])
    H = HessianOperator(
        model, F.mse_loss, (x, y), ["2.weight", "2.bias"], backend=backend, cache_graph=True
    )
    _close(H.to_dense(), truth)
    assert H.objective._graph_cache is not None
    _close(H.to_dense(), truth)  # second use of the cached graph
    with torch.no_grad():  # the non-selected first layer changes: the graph must be rebuilt
        model[0].weight.mul_(2.0)
    _close(
        H.to_dense(), cv.dense_hessian(model, F.mse_loss, [(x, y)], names=["2.weight", "2.bias"])
    )
    H.clear_cache()


def test_scipy_eigsh_top_eigenvalue(cv):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    H = HessianOperator(model, F.mse_loss, (x, y))
    truth = torch.linalg.eigvalsh(cv.dense_hessian(model, F.mse_loss, [(x, y)]))
    top = eigsh(H.to_scipy(), k=2, which="LA", tol=1e-12, v0=np.ones(26))[0]
    np.testing.assert_allclose(np.sort(top), truth[-2:].numpy(), rtol=1e-8)


def test_flatten_unflatten_loss_gradient(cv):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    H = HessianOperator(model, F.mse_loss, (x, y))
    v = torch.arange(26, dtype=DT)
    assert torch.equal(H.flatten(H.unflatten(v)), v)
    assert H.unflatten(v)["0.weight"].shape == (4, 3)
    assert torch.allclose(H.loss(), F.mse_loss(model(x), y), rtol=1e-14)
    g = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
    assert torch.allclose(H.gradient(), torch.cat([t.reshape(-1) for t in g]), rtol=1e-12)
    for p in model.parameters():
        p.grad = None


class _OldStyleTanh(torch.autograd.Function):
    """An autograd.Function without setup_context: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)  # differentiable, so double backward works


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_OldStyleTanh.apply(self.a(x)))


def test_auto_backend_falls_back_with_a_warning(cv, state_check):
    torch.manual_seed(0)
    model = _Untraceable().to(DT)
    x, y = cv.regression_data()
    check = state_check(model)
    H = HessianOperator(model, F.mse_loss, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on a CPU "auto" is double backward: no fallback
        D = H.to_dense()
    assert H.backend == "autograd"
    ref = torch.nn.Sequential(model.a, torch.nn.Tanh(), model.b)
    _close(D, cv.dense_hessian(ref, F.mse_loss, [(x, y)]))
    with pytest.raises(RuntimeError):
        HessianOperator(model, F.mse_loss, (x, y), backend="func").matvec(torch.ones(26, dtype=DT))
    check()


def test_dropout_is_off_by_default(cv, state_check):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)
    ).to(DT)
    model.train()
    x, y = cv.regression_data()
    check = state_check(model)
    H = HessianOperator(model, F.mse_loss, (x, y), check_deterministic=True)
    _close(H.to_dense(), cv.dense_hessian(model, F.mse_loss, [(x, y)]))
    check()


@pytest.mark.parametrize("case", ["mlp-mse", "ce", "convbn-eval", "convbn-batch"])
def test_forward_over_reverse_mode(cv, state_check, case):
    """func_mode="forward" (jvp of grad); F.mse_loss falls back to reverse mode per op."""
    bn = "batch" if case.endswith("batch") else "eval"
    if case.startswith("convbn"):
        model, (x, y), loss_fn = cv.make_convbn(), cv.image_data(), F.cross_entropy
    elif case == "ce":
        model, (x, y), loss_fn = cv.make_mlp(), cv.regression_data(), F.cross_entropy
        y = y.softmax(1)
    else:
        model, (x, y), loss_fn = cv.make_mlp(), cv.regression_data(), F.mse_loss
    check = state_check(model)
    H = HessianOperator(model, loss_fn, (x, y), bn=bn, backend="func", func_mode="forward")
    _close(H.to_dense(), cv.dense_hessian(model, loss_fn, [(x, y)], bn=bn))
    expected = "rev" if case == "mlp-mse" else "fwd"
    assert H.objective._func_mode == expected
    check()


@pytest.mark.parametrize("func_mode", ["reverse", "forward"])
@pytest.mark.parametrize("case", ["mlp-ce", "convbn-eval", "convbn-batch"])
def test_vmap_blocks(cv, state_check, case, func_mode):
    """vectorize=True (vmap over the columns, the default off the CPU) against the truth."""
    from sharpgen.curvature import GGNOperator

    bn = "batch" if case.endswith("batch") else "eval"
    if case.startswith("convbn"):
        model, (x, y) = cv.make_convbn(), cv.image_data()
    else:
        model, (x, y) = cv.make_mlp(), cv.regression_data()
        y = y.softmax(1)
    check = state_check(model)
    kw = dict(bn=bn, backend="func", func_mode=func_mode, vectorize=True, max_block=None)
    H = HessianOperator(model, F.cross_entropy, (x, y), **kw)
    assert H.objective.vectorize
    _close(H.to_dense(), cv.dense_hessian(model, F.cross_entropy, [(x, y)], bn=bn))
    G = GGNOperator(model, F.cross_entropy, (x, y), **kw).to_dense()
    kw["vectorize"] = False
    _close(G, GGNOperator(model, F.cross_entropy, (x, y), **kw).to_dense(), rtol=1e-12)
    check()


def test_auto_backend_does_not_blame_torch_func_for_a_user_error(cv, state_check):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.to(DT)
    x, y = cv.regression_data()
    calls = {"n": 0}

    def flaky_loss(out, target):
        calls["n"] += 1
        if calls["n"] > 1:  # construction evaluates the loss once; products fail
            raise RuntimeError("user bug in the loss")
        return F.mse_loss(out, target)

    check = state_check(model)
    H = HessianOperator(model, flaky_loss, (x, y))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no misleading fallback warning
        with pytest.raises(RuntimeError, match="user bug in the loss"):
            H.matvec(torch.ones(H.shape[0], dtype=DT))
    check()


def test_run_with_fallback_warns_when_func_fails():
    from sharpgen.curvature._backend import run_with_fallback

    def run(backend, mode):
        if backend == "func":
            raise RuntimeError("vmap: no batching rule")
        return backend

    with pytest.warns(RuntimeWarning, match="falling back to double backward"):
        out, used, _ = run_with_fallback(run, "auto", "fwd", owner="HessianOperator")
    assert out == used == "autograd"
    with pytest.raises(RuntimeError, match="no batching rule"):
        run_with_fallback(run, "func", "fwd", owner="HessianOperator")
