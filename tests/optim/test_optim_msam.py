"""MSAM: the momentum-direction perturbation against the paper's update, by hand (float64)."""

from __future__ import annotations

import pytest
import torch

from sharpgen.optim import MSAM

D = torch.float64


def quadratic(seed: int = 0):
    """L(w) = 1/2 (w - c)^T A (w - c) with A symmetric positive definite; gradient A (w - c)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(4, 4, generator=g, dtype=D)
    a = m @ m.T + torch.eye(4, dtype=D)
    c = torch.randn(4, generator=g, dtype=D)
    w = torch.nn.Parameter(torch.randn(4, generator=g, dtype=D))
    return w, a, c


def closure_for(opt, w, a, c):
    def closure():
        opt.zero_grad()
        loss = 0.5 * (w - c) @ a @ (w - c)
        loss.backward()
        return loss

    return closure


def test_three_steps_equal_the_paper_update_with_sgd_momentum():
    w, a, c = quadratic()
    lr, mu, rho = 0.05, 0.9, 0.4
    opt = MSAM([w], torch.optim.SGD, rho=rho, lr=lr, momentum=mu)
    wh, v = w.detach().clone(), None
    for step in range(3):
        opt.step(closure_for(opt, w, a, c))
        # the paper: w~ = w - rho v / ||v||, v <- mu v + grad(w~), w <- w - lr v
        wt = wh if v is None else wh - rho * v / torch.linalg.vector_norm(v)
        g = a @ (wt - c)
        v = g.clone() if v is None else mu * v + g
        wh = wh - lr * v
        torch.testing.assert_close(w.detach(), wh, rtol=1e-14, atol=1e-15)
        assert opt.last_step_info.perturbed == (step > 0)
        assert opt.last_step_info.stepped


def test_adam_base_follows_its_first_moment():
    w, a, c = quadratic(1)
    opt = MSAM([w], torch.optim.Adam, rho=0.2, lr=0.01)
    ref = torch.nn.Parameter(w.detach().clone())
    adam = torch.optim.Adam([ref], lr=0.01)
    for _ in range(3):
        m = adam.state[ref].get("exp_avg")
        shift = torch.zeros_like(ref) if m is None else -0.2 * m / torch.linalg.vector_norm(m)
        adam.zero_grad()
        ref.grad = a @ (ref.detach() + shift - c)
        adam.step()
        opt.step(closure_for(opt, w, a, c))
        torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-14, atol=1e-15)


def test_two_call_style_equals_closure_and_weights_are_restored_between_steps():
    w, a, c = quadratic(2)
    w2 = torch.nn.Parameter(w.detach().clone())
    opt = MSAM([w], torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    opt2 = MSAM([w2], torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.step(closure_for(opt, w, a, c))
        before = w2.detach().clone()
        perturbed = opt2.first_step()
        assert perturbed == opt2.perturbed
        if perturbed:
            assert not torch.equal(w2.detach(), before)
        closure_for(opt2, w2, a, c)()
        opt2.second_step()
        assert torch.equal(w.detach(), w2.detach())


def test_rho_zero_is_sgd_bitwise_and_one_pass_per_step():
    w, a, c = quadratic(3)
    ref = torch.nn.Parameter(w.detach().clone())
    opt = MSAM([w], torch.optim.SGD, rho=0.0, lr=0.05, momentum=0.9)
    sgd = torch.optim.SGD([ref], lr=0.05, momentum=0.9)
    calls = []
    for _ in range(3):

        def closure():
            calls.append(1)
            return closure_for(opt, w, a, c)()

        opt.step(closure)
        closure_for(sgd, ref, a, c)()
        sgd.step()
        assert torch.equal(w, ref)
    assert len(calls) == 3


def test_errors():
    w, _, _ = quadratic()
    with pytest.raises(TypeError, match="MSAM follows the momentum"):
        MSAM([w], torch.optim.Adagrad, lr=0.1)
    with pytest.raises(ValueError, match="momentum > 0"):
        MSAM([w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        MSAM([w], torch.optim.SGD, rho=-1.0, lr=0.1, momentum=0.9)
