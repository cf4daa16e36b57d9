"""MSAM: the momentum-direction perturbation against the paper's update, by hand (float64)."""

from __future__ import annotations

import pytest
import torch

from sharpgen.optim import MSAM

D = torch.float64


def test_three_steps_equal_the_paper_update_with_sgd_momentum(h):
    w, a, c = h.spd_quadratic(n=4)
    lr, mu, rho = 0.05, 0.9, 0.4
    opt = MSAM([w], torch.optim.SGD, rho=rho, lr=lr, momentum=mu)
    wh, v = w.detach().clone(), None
    for step in range(3):
        opt.step(h.quadratic_closure(opt, w, a, c))
        # the paper: w~ = w - rho v / ||v||, v <- mu v + grad(w~), w <- w - lr v
        wt = wh if v is None else wh - rho * v / torch.linalg.vector_norm(v)
        g = a @ (wt - c)
        v = g.clone() if v is None else mu * v + g
        wh = wh - lr * v
        torch.testing.assert_close(w.detach(), wh, rtol=1e-14, atol=1e-15)
        assert opt.last_step_info.perturbed == (step > 0)
        assert opt.last_step_info.stepped


def test_adam_base_follows_its_first_moment(h):
    w, a, c = h.spd_quadratic(1, n=4)
    opt = MSAM([w], torch.optim.Adam, rho=0.2, lr=0.01)
    ref = torch.nn.Parameter(w.detach().clone())
    adam = torch.optim.Adam([ref], lr=0.01)
    for _ in range(3):
        m = adam.state[ref].get("exp_avg")
        shift = torch.zeros_like(ref) if m is None else -0.2 * m / torch.linalg.vector_norm(m)
        adam.zero_grad()
        ref.grad = a @ (ref.detach() + shift - c)
        adam.step()
        opt.step(h.quadratic_closure(opt, w, a, c))
        torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-14, atol=1e-15)


def test_two_call_style_equals_closure_and_weights_are_restored_between_steps(h):
    w, a, c = h.spd_quadratic(2, n=4)
    w2 = torch.nn.Parameter(w.detach().clone())
    opt = MSAM([w], torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    opt2 = MSAM([w2], torch.optim.SGD, rho=0.3, lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.step(h.quadratic_closure(opt, w, a, c))
        before = w2.detach().clone()
        perturbed = opt2.first_step()
        assert perturbed == opt2.perturbed
        if perturbed:
            assert not torch.equal(w2.detach(), before)
        h.quadratic_closure(opt2, w2, a, c)()
        opt2.second_step()
        assert torch.equal(w.detach(), w2.detach())


def test_rho_zero_is_sgd_bitwise_and_one_pass_per_step(h):
    w, a, c = h.spd_quadratic(3, n=4)
    ref = torch.nn.Parameter(w.detach().clone())
    opt = MSAM([w], torch.optim.SGD, rho=0.0, lr=0.05, momentum=0.9)
    sgd = torch.optim.SGD([ref], lr=0.05, momentum=0.9)
    calls = []
    for _ in range(3):

        def closure():
            calls.append(1)
            return h.quadratic_closure(opt, w, a, c)()

        opt.step(closure)
        h.quadratic_closure(sgd, ref, a, c)()
        sgd.step()
        assert torch.equal(w, ref)
    assert len(calls) == 3


def test_errors(h):
    w, _, _ = h.spd_quadratic(n=4)
    with pytest.raises(TypeError, match="MSAM follows the momentum"):
        MSAM([w], torch.optim.Adagrad, lr=0.1)
    with pytest.raises(ValueError, match="momentum > 0"):
        MSAM([w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        MSAM([w], torch.optim.SGD, rho=-1.0, lr=0.1, momentum=0.9)
