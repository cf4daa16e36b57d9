"""WSAM and FriendlySAM: the papers' updates computed by hand on a quadratic (float64)."""

from __future__ import annotations

import pytest
import torch

from sharpgen.optim import SAM, WSAM, FriendlySAM

D = torch.float64


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_steps_equal_the_paper_update(h, decouple):
    w, a, c = h.spd_quadratic()
    lr, mu, rho, gamma = 0.05, 0.9, 0.2, 0.8
    alpha = gamma / (1 - gamma)
    opt = WSAM([w], torch.optim.SGD, rho=rho, gamma=gamma, decouple=decouple, lr=lr, momentum=mu)
    wh, v = w.detach().clone(), None
    for _ in range(3):
        opt.step(h.quadratic_closure(opt, w, a, c))
        g = a @ (wh - c)
        gs = a @ (wh + rho * g / g.norm() - c)
        fed = g if decouple else g + alpha * (gs - g)
        v = fed.clone() if v is None else mu * v + fed
        wh = wh - lr * v
        if decouple:
            wh = wh - lr * alpha * (gs - g)
        torch.testing.assert_close(w.detach(), wh, rtol=1e-13, atol=1e-14)


def test_wsam_gamma_half_coupled_is_sam(h):
    w, a, c = h.spd_quadratic(1)
    ref = torch.nn.Parameter(w.detach().clone())
    opt = WSAM([w], torch.optim.SGD, rho=0.3, gamma=0.5, decouple=False, lr=0.05)
    sam = SAM([ref], torch.optim.SGD, rho=0.3, lr=0.05)
    for _ in range(3):
        opt.step(h.quadratic_closure(opt, w, a, c))
        sam.step(h.quadratic_closure(sam, ref, a, c))
        torch.testing.assert_close(w, ref, rtol=1e-14, atol=1e-15)


def test_friendly_sam_steps_equal_the_paper_update(h):
    w, a, c = h.spd_quadratic(2)
    lr, rho, sigma, lmbda = 0.05, 0.2, 1.0, 0.9
    noise = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=D)
    opt = FriendlySAM([w], torch.optim.SGD, rho=rho, sigma=sigma, lmbda=lmbda, lr=lr)
    wh, m = w.detach().clone(), torch.zeros(5, dtype=D)
    for t in range(4):

        def closure(t=t):
            opt.zero_grad()
            loss = 0.5 * (w - c) @ a @ (w - c) + noise[t] @ w
            loss.backward()
            return loss

        opt.step(closure)
        g = a @ (wh - c) + noise[t]
        m = lmbda * m + (1 - lmbda) * g
        d = g - sigma * m
        final = a @ (wh + rho * d / d.norm() - c) + noise[t]
        wh = wh - lr * final
        torch.testing.assert_close(w.detach(), wh, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(opt.state[w]["fsam_momentum"], m, rtol=1e-13, atol=1e-15)


def test_friendly_sam_sigma_zero_is_sam(h):
    w, a, c = h.spd_quadratic(4)
    ref = torch.nn.Parameter(w.detach().clone())
    opt = FriendlySAM([w], torch.optim.SGD, rho=0.3, sigma=0.0, lr=0.05)
    sam = SAM([ref], torch.optim.SGD, rho=0.3, lr=0.05)
    for _ in range(3):
        opt.step(h.quadratic_closure(opt, w, a, c))
        sam.step(h.quadratic_closure(sam, ref, a, c))
        assert torch.equal(w, ref)


def test_errors(h):
    w, _, _ = h.spd_quadratic()
    with pytest.raises(ValueError, match="gamma must be in"):
        WSAM([w], torch.optim.SGD, gamma=1.0, lr=0.1)
    with pytest.raises(TypeError, match="decouple must be a bool"):
        WSAM([w], torch.optim.SGD, decouple=1, lr=0.1)
    with pytest.raises(ValueError, match="lmbda must be in"):
        FriendlySAM([w], torch.optim.SGD, lmbda=1.0, lr=0.1)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        FriendlySAM([w], torch.optim.SGD, sigma=-1.0, lr=0.1)
