"""sam_gradient (SAM, m-SAM, 1-SAM via vmap) against Python loops; the perturbed() context."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from sharpgen.optim import SAM, perturbed, sam_gradient
from sharpgen.sharpness import sam_perturbation

D = torch.float64


def make_model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=D))
    return model


def make_batch(n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=D)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loss_fn_for(model):
    def loss_fn(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss_fn


def loop_sam(loss_fn, params, batch, rho, m, **opts):
    """The reference: a Python loop over chunks of size m."""
    x, y = batch
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    k = x.shape[0] // m
    for i in range(k):
        chunk = (x[i * m : (i + 1) * m], y[i * m : (i + 1) * m])
        g = grad(loss_fn)(params, chunk)
        eps = sam_perturbation(g, params, rho, **opts)
        gp = grad(loss_fn)({n: params[n] + eps[n] for n in params}, chunk)
        for n in out:
            out[n] += gp[n] / k
    return out


OPTS = [
    {},
    {"adaptive": True, "eta": 0.01},
    {"norm": "linf"},
    {"normalize": False},
]


@pytest.mark.parametrize("opts", OPTS, ids=["sam", "asam", "linf", "usam"])
@pytest.mark.parametrize("m", [None, 1, 3, 12])
def test_vmapped_chunks_equal_the_python_loop(opts, m):
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    batch = make_batch()
    loss_fn = loss_fn_for(model)
    if m == 1:
        got = sam_gradient(loss_fn, params, batch, 0.1, per_example=True, **opts)
    else:
        got = sam_gradient(loss_fn, params, batch, 0.1, micro_batch=m, **opts)
    expected = loop_sam(loss_fn, params, batch, 0.1, m or 12, **opts)
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-12)


def test_per_example_is_different_from_full_batch_sam():
    """1-SAM is not SAM: the perturbations differ per example (guards against a no-op vmap)."""
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    batch = make_batch()
    loss_fn = loss_fn_for(model)
    full = sam_gradient(loss_fn, params, batch, 0.5)
    one = sam_gradient(loss_fn, params, batch, 0.5, per_example=True)
    assert max(float((full[n] - one[n]).abs().max()) for n in params) > 1e-3


def test_chunk_size_and_rho_zero():
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    batch = make_batch()
    loss_fn = loss_fn_for(model)
    a = sam_gradient(loss_fn, params, batch, 0.2, per_example=True)
    b = sam_gradient(loss_fn, params, batch, 0.2, per_example=True, chunk_size=5)
    for n in params:
        torch.testing.assert_close(a[n], b[n], rtol=1e-13, atol=1e-15)
    plain = grad(loss_fn)(params, batch)
    zero = sam_gradient(loss_fn, params, batch, 0.0, micro_batch=4)
    for n in params:
        torch.testing.assert_close(zero[n], plain[n], rtol=1e-12, atol=1e-14)


def test_optimizer_step_equals_functional_gradient_step():
    model = make_model()
    x, y = make_batch()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = sam_gradient(loss_fn_for(model), params, (x, y), 0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n] - 0.2 * g[n], rtol=1e-13, atol=1e-14)


def test_dict_batch_and_tensor_batch():
    w = {"w": torch.tensor([0.5, -1.0], dtype=D)}
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=D)

    def loss_tensor(p, xb):
        return ((xb @ p["w"]) ** 2).mean()

    def loss_dict(p, b):
        return ((b["x"] @ p["w"]) ** 2).mean()

    a = sam_gradient(loss_tensor, w, x, 0.1, micro_batch=2)
    b = sam_gradient(loss_dict, w, {"x": x}, 0.1, micro_batch=2)
    torch.testing.assert_close(a["w"], b["w"], rtol=0, atol=0)


def test_bad_input():
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    batch = make_batch()
    loss_fn = loss_fn_for(model)
    with pytest.raises(ValueError, match=r"micro_batch=5 must divide the batch size 12"):
        sam_gradient(loss_fn, params, batch, 0.1, micro_batch=5)
    with pytest.raises(
        ValueError, match=r"micro_batch=24 must divide the batch size 12 \(and not exceed"
    ):
        sam_gradient(loss_fn, params, batch, 0.1, micro_batch=24)
    with pytest.raises(ValueError, match="micro_batch must be a positive int, got 0"):
        sam_gradient(loss_fn, params, batch, 0.1, micro_batch=0)
    with pytest.raises(ValueError, match="per_example=True and micro_batch=2 are exclusive"):
        sam_gradient(loss_fn, params, batch, 0.1, per_example=True, micro_batch=2)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        sam_gradient(loss_fn, params, batch, -1.0)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sam_gradient(loss_fn, params, batch, 0.1, adaptive=True, eta=-1.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        sam_gradient(loss_fn, params, batch, 0.1, norm="l1")
    with pytest.raises(ValueError, match="different leading \\(batch\\) dimensions \\[12, 11\\]"):
        sam_gradient(loss_fn, params, (batch[0], batch[1][:11]), 0.1)
    with pytest.raises(TypeError, match="batch must be a Tensor or a"):
        sam_gradient(loss_fn, params, (batch[0], "labels"), 0.1)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        sam_gradient(None, params, batch, 0.1)
    with pytest.raises(TypeError, match="params must be a dict"):
        sam_gradient(loss_fn, list(params.values()), batch, 0.1)

    def bad_loss(p, b):
        return loss_fn(p, b) * torch.tensor(float("inf"), dtype=D)

    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        sam_gradient(bad_loss, params, batch, 0.1)
    with pytest.raises(FloatingPointError, match="non-finite gradient in a chunk"):
        sam_gradient(bad_loss, params, batch, 0.1, micro_batch=4)


def test_perturbed_adds_and_restores_exactly():
    model = make_model()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = copy.deepcopy(model.state_dict())
    eps = {"0.weight": 1e-3 * torch.randn(6, 4, dtype=D), "2.bias": None}
    with perturbed(model, eps) as m:
        assert m is model
        assert torch.equal(model[0].weight, before["0.weight"] + eps["0.weight"])
        assert torch.equal(model[2].bias, before["2.bias"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(model[0].weight.grad, torch.ones(6, 4, dtype=D))
    assert all(p.requires_grad for p in model.parameters())


def test_perturbed_restores_on_exception_and_validates_first():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="inside"):
        with perturbed(model, {"0.bias": torch.ones(6, dtype=D)}):
            raise RuntimeError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match=r"not parameters of the model: \['nope'\]"):
        with perturbed(model, {"0.bias": torch.ones(6, dtype=D), "nope": torch.ones(1)}):
            pass
    with pytest.raises(ValueError, match=r"eps\['0.bias'\] has shape \(5,\)"):
        with perturbed(model, {"0.bias": torch.ones(5, dtype=D)}):
            pass
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        with perturbed(model, {"0.bias": torch.full((6,), float("nan"), dtype=D)}):
            pass
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        with perturbed("model", {}):
            pass
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
