"""GGNOperator against J^T H_loss J computed densely (torch.func.jacrev / hessian)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sharpgen.curvature import GGNOperator, HessianOperator

DT = torch.float64
BACKENDS = ["func", "autograd"]


def _close(A, B, rtol=1e-8):
    scale = B.abs().max().clamp_min(1e-300)
    assert (A - B).abs().max() <= rtol * scale, float((A - B).abs().max() / scale)


def dense_ggn(model, loss_fn, batches, reduction="mean"):
    ref = copy.deepcopy(model).eval()
    named = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
    sizes = [p.numel() for p in named.values()]
    vec = torch.cat([p.reshape(-1) for p in named.values()])

    def unflat(v):
        return {
            n: t.reshape(p.shape)
            for (n, p), t in zip(named.items(), torch.split(v, sizes), strict=True)
        }

    def n_of(inputs):
        return inputs.shape[0] if torch.is_tensor(inputs) else next(iter(inputs.values())).shape[0]

    total = sum(n_of(i) for i, _ in batches)
    G = torch.zeros(vec.numel(), vec.numel(), dtype=DT)
    for inputs, targets in batches:
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
        out = torch.func.functional_call(ref, unflat(vec), args, kwargs)

        def out_fn(v, args=args, kwargs=kwargs):
            return torch.func.functional_call(ref, unflat(v), args, kwargs).reshape(-1)

        def loss_of_out(o, shape=out.shape, targets=targets):
            return loss_fn(o.reshape(shape), targets)

        J = torch.func.jacrev(out_fn)(vec)
        HL = torch.func.hessian(loss_of_out)(out.detach().reshape(-1))
        w = n_of(inputs) / total if reduction == "mean" else 1.0
        G += w * J.T @ HL @ J
    return G


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_mse_uneven_loader(cv, state_check, backend, reduction):
    model = cv.make_mlp()
    x, y = cv.regression_data(n=10)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]

    def loss_fn(o, t):
        return F.mse_loss(o, t, reduction=reduction)

    check = state_check(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    G = GGNOperator(model, loss_fn, loader, reduction=reduction, backend=backend)
    _close(G.to_dense(), dense_ggn(model, loss_fn, batches, reduction))
    check()


@pytest.mark.parametrize("backend", [*BACKENDS, "func-forward"])
def test_classifier_cross_entropy_is_psd(cv, state_check, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.to(DT)
    x, y = cv.classification_data()
    check = state_check(model)
    mode = "forward" if backend == "func-forward" else "reverse"
    backend = backend.removesuffix("-forward")
    G = GGNOperator(model, F.cross_entropy, (x, y), backend=backend, func_mode=mode).to_dense()
    _close(G, dense_ggn(model, F.cross_entropy, [(x, y)]))
    assert torch.linalg.eigvalsh(G).min() > -1e-12 * G.abs().max()
    H = HessianOperator(model, F.cross_entropy, (x, y), backend=backend).to_dense()
    assert (G - H).abs().max() > 1e-4 * H.abs().max()  # a nonlinear model: G != H
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_batchnorm_eval(cv, state_check, backend):
    model = cv.make_convbn()
    x, y = cv.image_data()
    check = state_check(model)
    G = GGNOperator(model, F.cross_entropy, (x, y), backend=backend)
    _close(G.to_dense(), dense_ggn(model, F.cross_entropy, [(x, y)]))
    check()


def test_dict_input_model(cv):
    torch.manual_seed(0)
    model = cv.DictInput().to(DT)
    inputs, y = cv.dict_data()
    G = GGNOperator(model, F.mse_loss, (inputs, y))
    _close(G.to_dense(), dense_ggn(model, F.mse_loss, [(inputs, y)]))


def test_linear_model_ggn_equals_hessian(cv):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).to(DT)
    x, y = cv.classification_data()
    G = GGNOperator(model, F.cross_entropy, (x, y)).to_dense()
    H = HessianOperator(model, F.cross_entropy, (x, y)).to_dense()
    _close(G, H, rtol=1e-12)


def test_block_matmat_equals_columns(cv):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    G = GGNOperator(model, F.mse_loss, (x, y))
    V = torch.randn(26, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    cols = torch.stack([G.matvec(V[:, j]) for j in range(3)], 1)
    _close(G.matmat(V), cols, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_graph(cv, backend):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    G = GGNOperator(model, F.mse_loss, (x, y), backend=backend, cache_graph=True)
    truth = dense_ggn(model, F.mse_loss, [(x, y)])
    _close(G.to_dense(), truth)
    _close(G.to_dense(), truth)
