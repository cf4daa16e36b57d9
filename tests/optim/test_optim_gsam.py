"""GSAM: the surrogate-gap update and the rho schedule against hand computation."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from sharpgen.optim import GSAM, SAM

D = torch.float64


def make_mlp(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    return model


def make_data(seed: int = 1, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=D), torch.randn(n, 2, generator=g, dtype=D)


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def hand_gsam(model, x, y, rho, alpha, lr, adaptive=False, eta=0.0):
    def f(params):
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = grad(f)(w)
    t = {k: (w[k].abs() + eta) if adaptive else torch.ones_like(w[k]) for k in w}
    norm = torch.linalg.vector_norm(flat({k: t[k] * g[k] for k in w}))
    eps = {k: rho * t[k] ** 2 * g[k] / norm for k in w}
    gp = grad(f)({k: w[k] + eps[k] for k in w})
    gv, gpv = flat(g), flat(gp)
    g_perp = gv - (gv @ gpv) / (gpv @ gpv) * gpv
    final = gpv - alpha * g_perp
    out, i = {}, 0
    for k, v in w.items():
        out[k] = v - lr * final[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("style", ["closure", "two_call"])
def test_one_step_equals_hand_computed_gsam(h, adaptive, style):
    model = make_mlp()
    x, y = make_data()
    rho_max, rho_min, lr_max, lr = 0.2, 0.02, 1.0, 0.4
    rho_t = rho_min + (rho_max - rho_min) * (lr - 0.0) / (lr_max - 0.0)
    expected = hand_gsam(model, x, y, rho_t, 0.3, lr, adaptive=adaptive, eta=0.01)
    opt = GSAM(
        model.parameters(), torch.optim.SGD, rho_max=rho_max, rho_min=rho_min, alpha=0.3,
        lr_max=lr_max, lr_min=0.0, lr=lr, adaptive=adaptive, eta=0.01,
    )  # fmt: skip
    assert opt.current_rho() == [pytest.approx(rho_t, rel=1e-15)]
    if style == "closure":
        opt.step(h.mse_closure(model, opt, x, y))
    else:
        h.mse_closure(model, opt, x, y)()
        assert opt.first_step(zero_grad=True)
        h.mse_closure(model, opt, x, y)()
        opt.second_step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-13, atol=1e-14)


def test_quadratic_closed_form():
    g = torch.Generator().manual_seed(5)
    A = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=D))
    w0 = torch.randn(3, generator=g, dtype=D)
    rho, alpha, lr = 0.3, 0.5, 0.1
    gw = A @ w0
    gp = A @ (w0 + rho * gw / gw.norm())
    final = gp - alpha * (gw - (gw @ gp) / (gp @ gp) * gp)
    w = nn.Parameter(w0.clone())
    opt = GSAM([w], torch.optim.SGD, rho_max=rho, alpha=alpha, lr=lr)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(w.detach(), w0 - lr * final, rtol=1e-14, atol=1e-15)


def test_alpha_zero_is_sam_with_the_scheduled_rho(h):
    x, y = make_data()
    a, b = make_mlp(), make_mlp()
    gsam = GSAM(a.parameters(), torch.optim.SGD, rho_max=0.1, alpha=0.0, lr=0.2)
    sam = SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.2)
    for _ in range(3):
        gsam.step(h.mse_closure(a, gsam, x, y))
        sam.step(h.mse_closure(b, sam, x, y))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_rho_follows_the_lr_scheduler_and_is_clipped():
    w = nn.Parameter(torch.ones(2, dtype=D))
    opt = GSAM([w], torch.optim.SGD, rho_max=0.1, rho_min=0.01, lr=1.0, lr_min=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: [1.0, 0.5, 0.0, 2.0][epoch])
    seen = []
    for step in range(4):
        seen.append(opt.current_rho()[0])
        w.grad = torch.ones_like(w)
        opt.first_step(zero_grad=False)
        opt.second_step()
        if step < 3:
            sched.step()
    assert seen == pytest.approx([0.1, 0.055, 0.01, 0.1])  # lr 2.0 is clipped to lr_max


def test_parameter_without_gradient_in_pass_two():
    """A missing second-pass gradient counts as zero in the decomposition."""
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=D))
    v = nn.Parameter(torch.tensor([0.5], dtype=D))
    opt = GSAM([w, v], torch.optim.SGD, rho_max=0.2, alpha=0.4, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w**2).sum() + ((v**2).sum() if len(calls) == 1 else 0.0)
        loss.backward()
        return loss

    w0, v0 = w.detach().clone(), v.detach().clone()
    g = torch.cat([2 * w0, 2 * v0])
    eps = 0.2 * g / g.norm()
    gp = torch.cat([2 * (w0 + eps[:2]), torch.zeros(1, dtype=D)])
    final = gp - 0.4 * (g - (g @ gp) / (gp @ gp) * gp)
    opt.step(closure)
    torch.testing.assert_close(
        torch.cat([w.detach(), v.detach()]), torch.cat([w0, v0]) - 0.1 * final
    )


def test_state_dict_resume_bitwise_with_scheduler(h):
    x, y = make_data()

    def build(model):
        opt = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.1, rho_min=0.02, alpha=0.2,
                   lr=0.1, momentum=0.9)  # fmt: skip
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
        return opt, sched

    ref = make_mlp()
    opt, sched = build(ref)
    for _ in range(6):
        opt.step(h.mse_closure(ref, opt, x, y))
        sched.step()
    model = make_mlp()
    opt, sched = build(model)
    for _ in range(3):
        opt.step(h.mse_closure(model, opt, x, y))
        sched.step()
    buf = io.BytesIO()
    torch.save([model.state_dict(), opt.state_dict(), sched.state_dict()], buf)
    buf.seek(0)
    ms, os_, ss = torch.load(buf, weights_only=True)
    resumed = make_mlp(seed=7)
    resumed.load_state_dict(ms)
    opt, sched = build(resumed)
    opt.load_state_dict(os_)
    sched.load_state_dict(ss)
    for _ in range(3):
        opt.step(h.mse_closure(resumed, opt, x, y))
        sched.step()
    for p, q in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_input():
    params = list(make_mlp().parameters())
    with pytest.raises(
        ValueError, match="rho_min must be <= rho_max, got rho_min=0.2 > rho_max=0.1"
    ):
        GSAM(params, torch.optim.SGD, rho_max=0.1, rho_min=0.2, lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0.*got -0.1"):
        GSAM(params, torch.optim.SGD, rho_max=-0.1, lr=0.1)
    with pytest.raises(ValueError, match=r"alpha must be >= 0 \(0 is plain SAM\), got -1"):
        GSAM(params, torch.optim.SGD, alpha=-1, lr=0.1)
    with pytest.raises(ValueError, match="lr_max must be >= lr_min, got lr_max=0.1 < lr_min=0.5"):
        GSAM(params, torch.optim.SGD, lr=0.1, lr_min=0.5)
    with pytest.raises(ValueError, match="lr_min must be >= 0"):
        GSAM(params, torch.optim.SGD, lr=0.1, lr_min=-1.0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['normalize'\]"):
        GSAM(params, torch.optim.SGD, lr=0.1, normalize=False)
