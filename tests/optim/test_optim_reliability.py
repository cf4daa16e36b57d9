"""A skipped or aborted step leaves every SAM-family optimizer as it was: a retry equals an
uninterrupted run, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpgen.optim import BSAM, ESAM, GSAM, SAM, WSAM, FriendlySAM, LookSAM

D = torch.float64
KW = {"lr": 0.05, "momentum": 0.9}

BUILDERS = {
    "sam": lambda ps: SAM(ps, torch.optim.SGD, rho=0.1, **KW),
    "wsam": lambda ps: WSAM(ps, torch.optim.SGD, rho=0.1, gamma=0.8, **KW),
    "gsam": lambda ps: GSAM(ps, torch.optim.SGD, rho_max=0.1, alpha=0.2, **KW),
    "looksam": lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.1, k=1, **KW),
    "fsam": lambda ps: FriendlySAM(ps, torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.8, **KW),
    "looksam_k2": lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.1, k=2, **KW),
    "sam_interval2": lambda ps: SAM(ps, torch.optim.SGD, rho=0.1, interval=2, **KW),
}


def _model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    return model


def _closure(model, opt, t, fault=None):
    g = torch.Generator().manual_seed(10 + t)
    x, y = torch.randn(8, 3, generator=g, dtype=D), torch.randn(8, 2, generator=g, dtype=D)
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if calls[0] == 2 and fault == "nonfinite":
            loss = loss * float("inf")
        loss.backward()
        if calls[0] == 2 and fault == "exception":
            raise RuntimeError("out of memory in the second pass")
        if calls[0] == 2 and fault == "interrupt":
            raise KeyboardInterrupt
        return loss

    return closure


def _run(name, fault=None):
    model = _model()
    opt = BUILDERS[name](model.parameters())
    for t in range(4):
        if t == 2 and fault is not None:
            try:
                opt.step(_closure(model, opt, t, fault))
            except (RuntimeError, KeyboardInterrupt):
                pass
            if fault == "nonfinite":
                assert not opt.last_step_info.stepped
            assert not opt.perturbed
        opt.step(_closure(model, opt, t))
    return model, opt


def _assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    for (n, p), q in zip(ma.named_parameters(), mb.parameters(), strict=True):
        assert torch.equal(p, q), n
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k, st in sa["state"].items():
        assert st.keys() == sb["state"][k].keys()
        for key, v in st.items():
            w = sb["state"][k][key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, key)


@pytest.mark.parametrize("fault", ["nonfinite", "exception", "interrupt"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_retried_step_equals_an_uninterrupted_run(name, fault):
    _assert_same(_run(name, fault), _run(name))


def test_friendly_sam_average_unchanged_by_a_skipped_step():
    model = _model()
    opt = BUILDERS["fsam"](model.parameters())
    opt.step(_closure(model, opt, 0))
    before = {p: opt.state[p]["fsam_momentum"].clone() for p in model.parameters()}
    opt.step(_closure(model, opt, 1, "nonfinite"))
    assert opt.last_step_info.reason == "non-finite gradient at w + eps"
    for p in model.parameters():
        assert torch.equal(opt.state[p]["fsam_momentum"], before[p])


def test_friendly_sam_two_call_style_retry_after_an_error():
    ref, (model, opt) = _run("fsam"), (_model(), None)
    opt = BUILDERS["fsam"](model.parameters())
    for t in range(4):
        closure = _closure(model, opt, t)
        if t == 2:  # the first half, then the second pass fails: restore and retry
            closure()
            assert opt.first_step(zero_grad=True)
            opt.restore()
        closure()
        if opt.first_step(zero_grad=True):
            closure()
        opt.step()
    _assert_same((model, opt), ref)


def _snapshot(opt):
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.state.items()}  # fmt: skip
    return groups, state


@pytest.mark.parametrize(
    ("name", "key", "value", "error"),
    [
        ("sam", "rho", -1.0, ValueError),
        ("sam", "rho", float("nan"), ValueError),
        ("sam", "eta", -0.5, ValueError),
        ("sam", "adaptive", "yes", TypeError),
        ("fsam", "rho", -1.0, ValueError),
        ("looksam", "rho", "big", TypeError),
        ("gsam", "rho_min", 5.0, ValueError),
        ("gsam", "alpha", -1.0, ValueError),
    ],
)
def test_load_state_dict_with_a_bad_option_raises_before_changing_anything(name, key, value, error):
    model = _model()
    opt = BUILDERS[name](model.parameters())
    for t in range(2):
        opt.step(_closure(model, opt, t))
    saved = opt.state_dict()
    opt.step(_closure(model, opt, 2))  # the optimizer moves on from the saved state
    saved["param_groups"][0][key] = value
    saved["param_groups"][0]["lr"] = 123.0  # would be loaded first by a late check
    before = _snapshot(opt)
    owner = type(opt).__name__
    with pytest.raises(error, match=rf"{owner}.load_state_dict: param group 0.*{key}.*unchanged"):
        opt.load_state_dict(saved)
    after = _snapshot(opt)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    for k, st in before[1].items():
        for key2, v in st.items():
            w = after[1][k][key2]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


@pytest.mark.parametrize("cls", [SAM, WSAM, FriendlySAM, LookSAM])
def test_messages_name_the_class_in_use(cls):
    w = nn.Parameter(torch.zeros(2, dtype=D))
    name = cls.__name__
    with pytest.raises(TypeError, match=rf"not an option of {name} \("):
        cls([w], torch.optim.SGD, lr=0.1, foo=1)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2, dtype=D))], lr=0.1)
    with pytest.raises(ValueError, match=rf"given to {name} \(group sizes.*e\.g\. {name}\(params"):
        cls([w], other)
    inner = SAM([nn.Parameter(torch.zeros(2, dtype=D))], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="cannot itself be a SAM-family optimizer, got a SAM"):
        cls([w], inner)


# -- the variants with a private generator (ESAM's random mask, BSAM's noise) -------------------
def _esam_closure(model, opt, t, fault=None):
    g = torch.Generator().manual_seed(10 + t)
    x, y = torch.randn(8, 3, generator=g, dtype=D), torch.randn(8, 2, generator=g, dtype=D)
    calls = [0]

    def closure():  # per-sample losses, no backward (ESAM's closure)
        calls[0] += 1
        losses = ((model(x) - y) ** 2).mean(1)
        if calls[0] == 2 and fault == "nonfinite":
            losses = losses * float("inf")
        if calls[0] == 2 and fault == "exception":
            raise RuntimeError("out of memory in the second pass")
        if calls[0] == 2 and fault == "interrupt":
            raise KeyboardInterrupt
        return losses

    return closure


GENERATOR_VARIANTS = {
    "esam": (lambda ps: ESAM(ps, torch.optim.SGD, rho=0.1, beta=0.5, gamma=0.5,
                             generator=torch.Generator().manual_seed(3), **KW), _esam_closure),
    "bsam": (lambda ps: BSAM(ps, num_data=50, lr=0.05, rho=0.1, betas=(0.9, 0.99),
                             generator=torch.Generator().manual_seed(3)), _closure),
}  # fmt: skip


def _run_generator_variant(name, fault=None):
    build, make_closure = GENERATOR_VARIANTS[name]
    model = _model()
    opt = build(model.parameters())
    for t in range(4):
        if t == 2 and fault is not None:
            try:
                opt.step(make_closure(model, opt, t, fault))
            except (RuntimeError, KeyboardInterrupt):
                pass
            if fault == "nonfinite":
                assert not opt.last_step_info.stepped
        opt.step(make_closure(model, opt, t))
    return model, opt


@pytest.mark.parametrize("fault", ["nonfinite", "exception", "interrupt"])
@pytest.mark.parametrize("name", list(GENERATOR_VARIANTS))
def test_a_retried_step_redraws_the_same_random_numbers(name, fault):
    a, b = _run_generator_variant(name, fault), _run_generator_variant(name)
    _assert_same(a, b)
    key = a[1]._generator_key
    assert torch.equal(a[1].state_dict()[key], b[1].state_dict()[key])
