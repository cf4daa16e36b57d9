"""ESAM: the paper's update (SWP + SDS) computed by hand on least squares (float64)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from sharpgen.optim import ESAM

D = torch.float64


def problem(seed: int = 0, n: int = 8, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    w = torch.nn.Parameter(torch.randn(d, generator=g, dtype=D))
    return w, x, y


def test_esam_steps_equal_the_paper_update():
    w, x, y = problem()
    lr, rho, beta, gamma = 0.05, 0.3, 0.6, 0.5
    opt = ESAM([w], torch.optim.SGD, rho=rho, beta=beta, gamma=gamma, lr=lr,
               generator=torch.Generator().manual_seed(4))  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    wh = w.detach().clone()
    k = math.ceil(gamma * len(y))
    for _ in range(3):
        loss = opt.step(lambda: 0.5 * (x @ w - y) ** 2)
        l0 = 0.5 * (x @ wh - y) ** 2
        torch.testing.assert_close(loss.detach(), l0.mean(), rtol=1e-13, atol=1e-14)
        g = x.T @ (x @ wh - y) / len(y)
        mask = (torch.rand(5, generator=gen) < beta).to(D)
        wt = wh + rho / beta * mask * g / g.norm()
        sel = torch.topk(0.5 * (x @ wt - y) ** 2 - l0, k).indices
        g_plus = x[sel].T @ (x[sel] @ wt - y[sel]) / k
        wh = wh - lr * g_plus
        torch.testing.assert_close(w.detach(), wh, rtol=1e-13, atol=1e-14)


def test_esam_beta_gamma_one_is_sam():
    from sharpgen.optim import SAM

    w, x, y = problem(1)
    ref = torch.nn.Parameter(w.detach().clone())
    opt = ESAM([w], torch.optim.SGD, rho=0.2, beta=1.0, gamma=1.0, lr=0.1)
    sam = SAM([ref], torch.optim.SGD, rho=0.2, lr=0.1)

    def closure():
        sam.zero_grad()
        loss = (0.5 * (x @ ref - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(lambda: 0.5 * (x @ w - y) ** 2)
        sam.step(closure)
        torch.testing.assert_close(w, ref, rtol=1e-14, atol=1e-15)


def test_esam_lr_zero_and_bitwise_resume():
    w, x, y = problem(2)
    before = w.detach().clone()
    opt = ESAM([w], torch.optim.SGD, lr=0.0, momentum=0.9)
    for _ in range(3):
        opt.step(lambda: 0.5 * (x @ w - y) ** 2)
    assert torch.equal(w, before)

    def run(param, o, steps):
        for _ in range(steps):
            o.step(lambda: 0.5 * (x @ param - y) ** 2)

    ref = torch.nn.Parameter(before.clone())
    run(ref, ESAM([ref], torch.optim.SGD, lr=0.1, momentum=0.9), 6)
    a = torch.nn.Parameter(before.clone())
    opt_a = ESAM([a], torch.optim.SGD, lr=0.1, momentum=0.9)
    run(a, opt_a, 3)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    b = torch.nn.Parameter(a.detach().clone())
    opt_b = ESAM([b], torch.optim.SGD, lr=0.5, momentum=0.1,
                 generator=torch.Generator().manual_seed(9))  # fmt: skip
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    run(b, opt_b, 3)
    assert torch.equal(b, ref)


def test_esam_non_finite_skips_and_exception_restores():
    w, x, y = problem(3)
    opt = ESAM([w], torch.optim.SGD, lr=0.1)
    before = w.detach().clone()
    opt.step(lambda: 0.5 * (x @ w - y) ** 2 * float("nan"))
    assert not opt.last_step_info.stepped
    assert "non-finite" in opt.last_step_info.reason
    assert torch.equal(w, before)

    def boom():
        if opt.perturbed:
            raise KeyError("boom")
        return 0.5 * (x @ w - y) ** 2

    with pytest.raises(KeyError):
        opt.step(boom)
    assert torch.equal(w, before) and not opt.perturbed


def test_esam_batchnorm_updated_once_per_step():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(D)
    x = torch.randn(8, 3, dtype=D)
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    bn = copy.deepcopy(model[1].num_batches_tracked)
    opt.step(lambda: (model(x) ** 2).mean(dim=1))
    assert int(model[1].num_batches_tracked) == int(bn) + 1


@pytest.mark.parametrize(("kwargs", "match"), [({"beta": 0.0}, "beta"), ({"gamma": 1.5}, "gamma")])
def test_esam_bad_options(kwargs, match):
    w, _, _ = problem()
    with pytest.raises(ValueError, match=match):
        ESAM([w], torch.optim.SGD, lr=0.1, **kwargs)


def test_esam_closure_must_return_per_sample_losses():
    w, x, y = problem()
    opt = ESAM([w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="per-sample"):
        opt.step(lambda: (0.5 * (x @ w - y) ** 2).mean())
