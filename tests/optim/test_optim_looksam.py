"""LookSAM and SAM every k steps: the updates of the paper / Composer, by hand (float64)."""

from __future__ import annotations

import pytest
import torch

from sharpgen.optim import SAM, LookSAM

D = torch.float64


def test_looksam_steps_equal_the_paper_update(h):
    w, a, c = h.spd_quadratic()
    lr, rho, alpha, k = 0.05, 0.2, 0.7, 2
    opt = LookSAM([w], torch.optim.SGD, rho=rho, k=k, alpha=alpha, lr=lr)
    wh, gv = w.detach().clone(), None
    for t in range(5):
        opt.step(h.quadratic_closure(opt, w, a, c))
        g = a @ (wh - c)
        if t % k == 0:  # SAM step; keep the part of g_s orthogonal to g
            gs = a @ (wh + rho * g / g.norm() - c)
            gv = gs - (g @ gs) / (g @ g) * g
            final = gs
        else:  # reuse step
            final = g + alpha * g.norm() / gv.norm() * gv
        wh = wh - lr * final
        torch.testing.assert_close(w.detach(), wh, rtol=1e-14, atol=1e-15)
        assert opt.last_step_info.perturbed == (t % k == 0)
        torch.testing.assert_close(opt.state[w]["looksam_gv"], gv, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("interval", [1, 3])
def test_sam_every_k_steps_is_sam_then_base_steps(h, interval):
    w, a, c = h.spd_quadratic(1)
    lr, rho = 0.05, 0.3
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr, interval=interval)
    same = LookSAM(
        [ref := torch.nn.Parameter(w.detach().clone())], torch.optim.SGD, rho=rho, k=interval,
        alpha=0.0, lr=lr,
    )  # fmt: skip
    wh = w.detach().clone()
    calls = []
    for t in range(6):

        def closure():
            calls.append(1)
            return h.quadratic_closure(opt, w, a, c)()

        opt.step(closure)
        same.step(h.quadratic_closure(same, ref, a, c))
        g = a @ (wh - c)
        final = a @ (wh + rho * g / g.norm() - c) if t % interval == 0 else g
        wh = wh - lr * final
        torch.testing.assert_close(w.detach(), wh, rtol=1e-14, atol=1e-15)
        assert torch.equal(w, ref)  # LookSAM with alpha = 0 is SAM every k steps
    assert len(calls) == sum(2 if t % interval == 0 else 1 for t in range(6))
    if interval > 1:
        assert opt.param_groups[0]["sam_steps"] == 6
        assert opt.last_step_info.reason == "SAM every 3 steps"
    else:
        assert "sam_steps" not in opt.param_groups[0]


def test_looksam_errors(h):
    w, _, _ = h.spd_quadratic()
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        LookSAM([w], torch.optim.SGD, k=0, lr=0.1)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        LookSAM([w], torch.optim.SGD, alpha=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="interval must be an int"):
        SAM([w], torch.optim.SGD, interval=1.5, lr=0.1)
