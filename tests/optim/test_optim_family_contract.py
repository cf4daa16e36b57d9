"""The contract every SAM-family optimizer keeps, checked on each variant.

Exact restore (lr = 0 leaves the weights bit-identical), state_dict resume equals an
uninterrupted run bit for bit, a non-finite gradient skips the step and reports it, an
exception in the closure restores the weights, and BatchNorm statistics are updated once per
step (in the pass at w for the two-pass variants).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from sharpgen.optim import BSAM, MSAM, SAM, WSAM, FriendlySAM, LookSAM

D = torch.float64
KW = {"lr": 0.05, "momentum": 0.9}

BUILDERS = {
    "sam_interval2": lambda ps, m, **kw: SAM(
        ps, torch.optim.SGD, rho=0.1, interval=2, model=m, **kw
    ),
    "looksam": lambda ps, m, **kw: LookSAM(ps, torch.optim.SGD, rho=0.1, k=2, model=m, **kw),
    "msam": lambda ps, m, **kw: MSAM(ps, torch.optim.SGD, rho=0.3, model=m, **kw),
    "wsam": lambda ps, m, **kw: WSAM(ps, torch.optim.SGD, rho=0.1, gamma=0.8, model=m, **kw),
    "wsam_coupled": lambda ps, m, **kw: WSAM(
        ps, torch.optim.SGD, rho=0.1, gamma=0.8, decouple=False, model=m, **kw
    ),
    "fsam": lambda ps, m, **kw: FriendlySAM(ps, torch.optim.SGD, rho=0.1, model=m, **kw),
    "bsam": lambda ps, m, lr, momentum: BSAM(
        ps,
        num_data=50,
        lr=lr,
        rho=0.1,
        betas=(momentum, 0.99),
        model=m,
        generator=torch.Generator().manual_seed(3),
    ),  # fmt: skip
}
TWO_PASS = {"sam_interval2", "looksam", "wsam", "wsam_coupled", "fsam"}


def make_model(seed: int = 0, bn: bool = False) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(3, 4)] + ([nn.BatchNorm1d(4)] if bn else []) + [nn.Tanh(), nn.Linear(4, 2)]
    model = nn.Sequential(*layers).to(D)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    return model


def make_data(seed: int = 1, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=D), torch.randn(n, 2, generator=g, dtype=D)


@pytest.mark.parametrize("name", BUILDERS)
def test_lr_zero_leaves_weights_bit_identical(h, name):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    opt = BUILDERS[name](model.parameters(), model, lr=0.0, momentum=0.9)
    x, y = make_data()
    for _ in range(4):
        opt.step(h.mse_closure(model, opt, x, y))
        assert opt.last_step_info.stepped
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_resume_equals_uninterrupted_run_bitwise(h, name):
    x, y = make_data()
    ref = make_model()
    ref_opt = BUILDERS[name](ref.parameters(), ref, **KW)
    for _ in range(6):
        ref_opt.step(h.mse_closure(ref, ref_opt, x, y))
    model = make_model()
    opt = BUILDERS[name](model.parameters(), model, **KW)
    for _ in range(3):
        opt.step(h.mse_closure(model, opt, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_model(seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = BUILDERS[name](resumed.parameters(), resumed, lr=1.0, momentum=0.1)
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(3):
        opt2.step(h.mse_closure(resumed, opt2, x, y))
    for p, q in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", BUILDERS)
def test_non_finite_gradient_skips_the_step_and_recovers(h, name):
    model = make_model()
    x, y = make_data()
    opt = BUILDERS[name](model.parameters(), model, **KW)
    for _ in range(2):  # momentum / sharpness state exists
        opt.step(h.mse_closure(model, opt, x, y))
    before = copy.deepcopy(model.state_dict())

    def poison():
        model[0].weight.grad[0, 0] = float("nan")

    opt.step(h.mse_closure(model, opt, x, y, hook=poison))
    assert not opt.last_step_info.stepped
    assert "non-finite" in opt.last_step_info.reason
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for _ in range(3):
        opt.step(h.mse_closure(model, opt, x, y))
        assert opt.last_step_info.stepped
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("name", BUILDERS)
def test_exception_in_the_perturbed_pass_restores_the_weights(h, name):
    model = make_model()
    x, y = make_data()
    opt = BUILDERS[name](model.parameters(), model, **KW)
    opt.step(h.mse_closure(model, opt, x, y))
    raised = 0
    for _ in range(4):  # SAM steps and, for the efficient variants, one-pass steps
        before = copy.deepcopy(model.state_dict())

        def closure():
            if opt.perturbed:
                raise KeyError("boom")
            return h.mse_closure(model, opt, x, y)()

        try:
            opt.step(closure)
        except KeyError:
            raised += 1
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), k
            assert not opt.perturbed
            opt.step(h.mse_closure(model, opt, x, y))  # usable afterwards
    assert raised >= 2


@pytest.mark.parametrize("name", BUILDERS)
def test_batchnorm_statistics_are_updated_once_per_step(h, name):
    model = make_model(bn=True)
    x, y = make_data()
    opt = BUILDERS[name](model.parameters(), model, **KW)
    for _ in range(3):
        bn = model[1]
        tracked = int(bn.num_batches_tracked)
        opt.step(h.mse_closure(model, opt, x, y))
        assert int(bn.num_batches_tracked) == tracked + 1


@pytest.mark.parametrize("name", BUILDERS)
def test_two_call_style_equals_step_closure_bitwise(h, name):
    x, y = make_data()
    ref = make_model()
    ref_opt = BUILDERS[name](ref.parameters(), ref, **KW)
    model = make_model()
    opt = BUILDERS[name](model.parameters(), model, **KW)
    for _ in range(5):
        ref_opt.step(h.mse_closure(ref, ref_opt, x, y))
        opt.zero_grad()
        if name == "bsam":  # noise, backward at w + e, perturb, backward at w + eps
            opt.sample_noise()
            ((model(x) - y) ** 2).mean().backward()
            assert opt.first_step(zero_grad=True)
            ((model(x) - y) ** 2).mean().backward()
        elif name in TWO_PASS:  # backward at w, perturb, backward at w + eps (if perturbed)
            ((model(x) - y) ** 2).mean().backward()
            if opt.first_step(zero_grad=True):
                ((model(x) - y) ** 2).mean().backward()
        else:  # MSAM: perturb from the momentum first, then the only backward
            opt.first_step()
            ((model(x) - y) ** 2).mean().backward()
        opt.second_step()
        for p, q in zip(ref.parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("cls", "own"),
    [
        (SAM, "rho, adaptive, eta, normalize, norm, perturb, model, same_dropout, interval"),
        (LookSAM, "rho, k, alpha, adaptive, eta, norm, perturb, model, same_dropout"),
        (WSAM, "rho, gamma, decouple, adaptive, eta, norm, perturb, model, same_dropout"),
        (FriendlySAM, "rho, sigma, lmbda, adaptive, eta, norm, perturb, model, same_dropout"),
        (MSAM, "rho, perturb, model"),
    ],
)
def test_unknown_option_names_the_variants_own_options(cls, own):
    w = nn.Parameter(torch.zeros(2, dtype=D))
    message = (
        rf"unknown option\(s\) \[.foo.\]: not an option of {cls.__name__} \({own}\) nor of SGD"
    )
    with pytest.raises(TypeError, match=message):
        cls([w], torch.optim.SGD, lr=0.1, momentum=0.9, foo=1)
