"""BSAM: Algorithm 1 of Moellenhoff & Khan (2023) computed by hand on a quadratic (float64)."""

from __future__ import annotations

import pytest
import torch

from sharpgen.optim import BSAM

D = torch.float64


def test_bsam_steps_equal_the_paper_update(h):
    w, a, c = h.spd_quadratic()
    n_data, lr, rho, b1, b2, delta, gamma, s0 = 10, 0.05, 0.1, 0.8, 0.9, 1e-2, 0.1, 2.0
    opt = BSAM(
        [w], num_data=n_data, lr=lr, rho=rho, betas=(b1, b2), weight_decay=delta,
        damping=gamma, s_init=s0, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    wh, s, gm = w.detach().clone(), torch.full((5,), s0, dtype=D), torch.zeros(5, dtype=D)
    for _ in range(3):
        opt.step(h.quadratic_closure(opt, w, a, c))
        e = torch.randn(5, generator=gen, dtype=D) / (n_data * s).sqrt()
        g = a @ (wh + e - c)
        g_eps = a @ (wh + rho * g / s - c)
        gm = b1 * gm + (1 - b1) * (g_eps + delta * wh)
        s = b2 * s + (1 - b2) * (s.sqrt() * g.abs() + delta + gamma)
        wh = wh - lr * gm / s
        torch.testing.assert_close(w.detach(), wh, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(opt.state[w]["bsam_s"], s, rtol=1e-13, atol=1e-14)
    assert opt.last_step_info.stepped and opt.last_step_info.perturbed


def test_bsam_two_call_style_equals_closure_bitwise(h):
    w, a, c = h.spd_quadratic(1)
    ref = torch.nn.Parameter(w.detach().clone())
    kw = {"num_data": 20, "lr": 0.05, "rho": 0.1}
    opt = BSAM([w], generator=torch.Generator().manual_seed(2), **kw)
    ref_opt = BSAM([ref], generator=torch.Generator().manual_seed(2), **kw)
    for _ in range(3):
        ref_opt.step(h.quadratic_closure(ref_opt, ref, a, c))
        opt.zero_grad()
        opt.sample_noise()
        (0.5 * (w - c) @ a @ (w - c)).backward()
        assert opt.first_step(zero_grad=True)
        (0.5 * (w - c) @ a @ (w - c)).backward()
        opt.second_step()
        assert torch.equal(w, ref)


def test_bsam_leaves_the_global_rng_alone(h):
    w, a, c = h.spd_quadratic(2)
    opt = BSAM([w], num_data=10)
    state = torch.get_rng_state()
    opt.step(h.quadratic_closure(opt, w, a, c))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_data": 0}, "num_data"),
        ({"num_data": 5, "betas": (1.0, 0.9)}, "betas"),
        ({"num_data": 5, "s_init": 0.0}, "s_init"),
        ({"num_data": 5, "rho": -1.0}, "rho"),
    ],
)
def test_bsam_bad_options_are_named(h, kwargs, match):
    w, _, _ = h.spd_quadratic()
    with pytest.raises(ValueError, match=match):
        BSAM([w], **kwargs)


def test_bsam_generator_type_is_checked(h):
    w, _, _ = h.spd_quadratic()
    with pytest.raises(TypeError, match="generator"):
        BSAM([w], num_data=5, generator=0)  # type: ignore[arg-type]
