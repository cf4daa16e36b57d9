"""Every study measure against its closed form or dense truth on tiny hand-set networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sharpgen.models import TwoLayerNet
from sharpgen.sharpness import average_sharpness, pac_bayes_sigma, sam_sharpness
from sharpgen.study import MEASURES, TrainedModel

F64 = torch.float64
W1 = torch.tensor([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]], dtype=F64)
W2 = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 1.5, 1.0]], dtype=F64)
W1_0 = torch.tensor([[0.5, -1.0], [0.0, 1.0], [-1.0, 0.0]], dtype=F64)
W2_0 = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]], dtype=F64)
X = torch.tensor(
    [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5], [0.3, -0.7], [2.0, 1.0], [-0.5, -1.5]],
    dtype=F64,
)


def _mlp(bias: bool = False) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 3, bias=bias), nn.ReLU(), nn.Linear(3, 2, bias=bias))
    net = net.to(F64)
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[2].weight.copy_(W2)
        if bias:
            net[0].bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=F64))
            net[2].bias.copy_(torch.tensor([0.5, -0.4], dtype=F64))
    return net


def _record(net=None, init=True) -> TrainedModel:
    net = net or _mlp()
    with torch.no_grad():
        y = net(X).argmax(-1)  # labels the net fits: every margin positive
    init_params = {"0.weight": W1_0, "2.weight": W2_0} if init else None
    return TrainedModel("m", {}, net, nn.functional.cross_entropy, (X, y), (X, y), init_params)


def _value(name, tm, seed=0):
    return MEASURES[name].fn(tm, torch.Generator().manual_seed(seed))


def _gamma(net) -> float:
    with torch.no_grad():
        f = net(X).numpy()
    top = np.sort(f, axis=1)
    return float(np.percentile(top[:, -1] - top[:, -2], 10))  # margin w.r.t. the argmax label


def _spec2(w):
    return float(np.linalg.norm(w.numpy(), 2)) ** 2


def test_norm_measures_closed_forms():
    tm = _record()
    f1, f2 = float((W1**2).sum()), float((W2**2).sum())
    s1, s2 = _spec2(W1), _spec2(W2)
    g = _gamma(tm.model)
    d1, d2 = float(((W1 - W1_0) ** 2).sum()), float(((W2 - W2_0) ** 2).sum())
    truth = {
        "num_params": 12.0,
        "param_norm": f1 + f2,
        "frob_distance": d1 + d2,
        "dist_spec_init": _spec2(W1 - W1_0) + _spec2(W2 - W2_0),
        "log_prod_of_fro": math.log(f1 * f2),
        "log_sum_of_fro": math.log(2 * math.sqrt(f1 * f2)),
        "log_prod_of_fro_over_margin": math.log(f1 * f2 / g**2),
        "log_prod_of_spec": math.log(s1 * s2),
        "log_sum_of_spec": math.log(2 * math.sqrt(s1 * s2)),
        "log_spec_over_margin": math.log(s1 * s2 / g**2),
        "log_spec_orig_main": math.log(s1 * s2 * (f1 / s1 + f2 / s2) / g**2),
        "log_spec_init_main": math.log(s1 * s2 * (d1 / s1 + d2 / s2) / g**2),
        "inverse_margin": 1 / g**2,
    }
    for name, value in truth.items():
        assert _value(name, tm) == pytest.approx(value, rel=1e-10), name


def test_path_norm_is_the_sum_over_paths_of_squared_weights():
    tm = _record()
    paths = sum(
        float(W2[k, j] ** 2 * W1[j, i] ** 2) for i in range(2) for j in range(3) for k in range(2)
    )
    assert _value("path_norm", tm) == pytest.approx(paths, rel=1e-12)
    assert _value("path_norm_over_margin", tm) == pytest.approx(
        paths / _gamma(tm.model) ** 2, rel=1e-10
    )
    # with biases: f_{w^2}(1) = W2^2 (W1^2 1 + b1^2) + b2^2, summed over outputs
    net = _mlp(bias=True)
    b1, b2 = net[0].bias.detach(), net[2].bias.detach()
    hidden = (W1**2).sum(1) + b1**2
    truth = float(((W2**2) @ hidden + b2**2).sum())
    assert _value("path_norm", _record(net)) == pytest.approx(truth, rel=1e-12)


def test_two_layer_net_counts_w2_as_a_matrix_and_uses_sign_margins():
    w1 = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=F64)  # f(x) != 0 off a line
    w2 = torch.tensor([1.0, -2.0], dtype=F64)
    net = TwoLayerNet("no_bias", w1, w2)
    x = torch.randn(20, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = net(x)
    y = torch.where(f >= 0, 1.0, -1.0).to(F64)
    y[0] = -y[0]  # one misfit sample of 20: a negative margin below the 10th percentile
    tm = TrainedModel("t", {}, net, nn.functional.mse_loss, (x, y), (x, y))
    assert _value("param_norm", tm) == pytest.approx(float((w1**2).sum() + (w2**2).sum()))
    assert _value("log_prod_of_spec", tm) == pytest.approx(
        math.log(_spec2(w1) * float((w2**2).sum()))
    )
    assert _value("path_norm", tm) == pytest.approx(float((w2**2 * (w1**2).sum(1)).sum()))
    margins = (y * f).numpy()
    assert _value("inverse_margin", tm) == pytest.approx(1 / np.percentile(margins, 10) ** 2)


def test_margin_measures_refuse_a_model_that_does_not_fit():
    tm = _record()
    x, y = tm.train_data
    bad = TrainedModel("bad", {}, tm.model, tm.loss_fn, (x, 1 - y), (x, y))
    with pytest.raises(ValueError, match="10th-percentile training margin"):
        _value("inverse_margin", bad)
    with pytest.raises(ValueError, match="init_params"):
        _value("frob_distance", _record(init=False))


def _dense(tm):
    net, (x, y) = tm.model, tm.train_data
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def outputs(v):
        return torch.func.functional_call(net, unflat(v), (x,))

    def loss(v):
        return nn.functional.cross_entropy(outputs(v), y)

    H = torch.func.hessian(loss)(theta)
    J = torch.func.jacrev(outputs)(theta)  # (n, c, p)
    f = outputs(theta).detach()
    p = torch.softmax(f, -1)
    Hl = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(x)  # per-sample, mean
    G = torch.einsum("nci,ncd,ndj->ij", J, Hl, J)
    return theta, H, G


def test_curvature_measures_against_dense_float64_truth():
    tm = _record()
    theta, H, G = _dense(tm)
    assert _value("hessian_trace", tm) == pytest.approx(float(torch.trace(H)), rel=1e-8)
    assert _value("top_eigenvalue", tm) == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-3
    )
    assert _value("ggn_trace", tm) == pytest.approx(float(torch.trace(G)), rel=1e-8)
    assert _value("fisher_rao_norm", tm) == pytest.approx(float(theta @ G @ theta) ** 0.5, rel=1e-8)
    # relative flatness of the last layer W (2 x 3): tr(A^1/2 H_W A^1/2), A = (W W^T) kron I
    hw = H[6:, 6:]
    a = torch.kron(W2 @ W2.T, torch.eye(3, dtype=F64))
    root = torch.linalg.cholesky(a)  # tr(L^T H L) = tr(H A) for A = L L^T
    assert _value("relative_flatness", tm) == pytest.approx(
        float(torch.trace(root.T @ hw @ root)), rel=1e-8
    )


def test_perturbation_measures_are_sharpgens_own_with_the_stated_options():
    tm = _record()
    args = (tm.model, tm.loss_fn, tm.train_data)

    def g():
        return torch.Generator().manual_seed(0)

    wc = sam_sharpness(*args, rho=0.05, steps=3, generator=g())
    assert _value("worst_case_sharpness", tm) == float(wc)
    awc = sam_sharpness(*args, rho=0.5, steps=3, adaptive=True, generator=g())
    assert _value("adaptive_worst_case_sharpness", tm) == float(awc)
    assert _value("average_sharpness", tm) == float(
        average_sharpness(*args, rho=0.05, generator=g())
    )
    aav = average_sharpness(*args, rho=0.5, adaptive=True, generator=g())
    assert _value("adaptive_average_sharpness", tm) == float(aav)
    for name, mag in (("pac_bayes_flatness", False), ("pac_bayes_mag_flatness", True)):
        sigma = pac_bayes_sigma(
            *args, magnitude_aware=mag, num_samples=8, max_samples=32, rtol=0.05, generator=g()
        )
        assert _value(name, tm) == pytest.approx(1 / float(sigma) ** 2), name


def test_every_measure_is_documented_and_leaves_the_model_alone():
    tm = _record(_mlp(bias=True))
    before = {n: p.detach().clone() for n, p in tm.model.named_parameters()}
    tm.model.train()
    for name, m in MEASURES.items():
        assert m.formula and m.reference, name
        _value(name, tm)
    assert tm.model.training
    for n, p in tm.model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n
