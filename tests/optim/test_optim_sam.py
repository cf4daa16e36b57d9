"""SAM / ASAM / USAM / l-inf SAM: one step against hand-computed updates, exactness, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from sharpgen.optim import SAM, SAMStepInfo

D = torch.float64


def make_mlp(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    return model


def make_data(seed: int = 1, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=D), torch.randn(n, 2, generator=g, dtype=D)


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


def make_closure(model, opt, x, y, counter=None):
    def closure():
        if counter is not None:
            counter.append(1)
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        return loss

    return closure


def functional_loss(model, x, y):
    def f(params):
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    return f


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def unflat(v, like):
    out, i = {}, 0
    for k, t in like.items():
        out[k] = v[i : i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def hand_eps(g, w, rho, variant, eta=0.01):
    """The perturbation written out on flat vectors (independent of sam_perturbation)."""
    gv, wv = flat(g), flat(w)
    t = wv.abs() + eta if VARIANTS[variant].get("adaptive") else torch.ones_like(wv)
    if variant.startswith("linf"):
        e = rho * t * torch.sign(gv)
    elif variant == "usam":
        e = rho * gv
    else:
        e = rho * t * t * gv / torch.linalg.vector_norm(t * gv)
    return unflat(e, w)


VARIANTS = {
    "sam": {},
    "asam": {"adaptive": True, "eta": 0.01},
    "usam": {"normalize": False},
    "linf": {"norm": "linf"},
    "linf_adaptive": {"norm": "linf", "adaptive": True, "eta": 0.01},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("style", ["closure", "two_call"])
def test_one_step_equals_hand_computed_update_on_mlp(variant, style):
    model = make_mlp()
    x, y = make_data()
    rho, lr = 0.1, 0.3
    f = functional_loss(model, x, y)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = grad(f)(w)
    eps = hand_eps(g, w, rho, variant)
    gp = grad(f)({k: w[k] + eps[k] for k in w})
    expected = {k: w[k] - lr * gp[k] for k in w}

    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, **VARIANTS[variant])
    if style == "closure":
        opt.step(make_closure(model, opt, x, y))
    else:
        mse(model, x, y).backward()
        assert opt.first_step(zero_grad=True)
        assert opt.perturbed
        for n, p in model.named_parameters():  # the weights are at w + eps
            torch.testing.assert_close(p.detach(), w[n] + eps[n], rtol=1e-14, atol=1e-15)
        mse(model, x, y).backward()
        opt.second_step(zero_grad=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-13, atol=1e-14)
    info = opt.last_step_info
    assert isinstance(info, SAMStepInfo) and info.perturbed and info.stepped
    t = flat(w).abs() + 0.01 if VARIANTS[variant].get("adaptive") else 1.0
    assert info.grad_norm == pytest.approx(float(torch.linalg.vector_norm(t * flat(g))), rel=1e-12)


class Quadratic(nn.Module):
    def __init__(self, w0):
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, A, b):
        return 0.5 * self.w @ A @ self.w - b @ self.w


@pytest.mark.parametrize("variant", ["sam", "asam", "usam"])
def test_one_step_on_a_quadratic_closed_form(variant):
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=D))[0]
    A = Q @ torch.diag(torch.tensor([5.0, 3, 2, 1, 0.5, 0.1], dtype=D)) @ Q.T
    b = torch.randn(6, generator=g, dtype=D)
    w0 = torch.randn(6, generator=g, dtype=D)
    rho, lr, eta = 0.2, 0.05, 0.01
    gw = A @ w0 - b
    if variant == "sam":
        eps = rho * gw / gw.norm()
    elif variant == "usam":
        eps = rho * gw
    else:
        t = w0.abs() + eta
        eps = rho * t**2 * gw / (t * gw).norm()
    expected = w0 - lr * (A @ (w0 + eps) - b)
    model = Quadratic(w0)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, **VARIANTS[variant])

    def closure():
        opt.zero_grad()
        loss = model(A, b)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(float(0.5 * w0 @ A @ w0 - b @ w0), rel=1e-14)
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    "base,kwargs",
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ],
)
def test_rho_zero_reproduces_the_base_optimizer_bitwise(base, kwargs):
    x, y = make_data()
    ref, model = make_mlp(), make_mlp()
    ref_opt = base(ref.parameters(), **kwargs)
    opt = SAM(model.parameters(), base, rho=0.0, **kwargs)
    calls = []
    for _ in range(5):
        ref_opt.zero_grad()
        mse(ref, x, y).backward()
        ref_opt.step()
        opt.step(make_closure(model, opt, x, y, calls))
        assert opt.last_step_info.reason == "rho = 0" and opt.last_step_info.stepped
    assert len(calls) == 5  # one pass per step when nothing is perturbed
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "base,kwargs",
    [
        (torch.optim.SGD, {"lr": 0.0, "momentum": 0.9, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"lr": 0.0, "weight_decay": 0.1}),
    ],
)
@pytest.mark.parametrize("variant", ["sam", "asam", "linf"])
def test_lr_zero_leaves_weights_bit_identical(base, kwargs, variant):
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    x, y = make_data()
    opt = SAM(model.parameters(), base, rho=0.5, **VARIANTS[variant], **kwargs)
    for _ in range(3):
        opt.step(make_closure(model, opt, x, y))
        assert opt.last_step_info.perturbed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class TwoBranch(nn.Module):
    """``extra`` is used only in the first pass, ``unused`` never."""

    def __init__(self):
        super().__init__()
        self.core = make_mlp()
        self.extra = nn.Parameter(torch.ones(2, dtype=D))
        self.unused = nn.Parameter(torch.ones(2, dtype=D))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.core(x)
        return out * self.extra if self.calls % 2 == 1 else out


def test_parameter_without_gradient_in_pass_two_is_restored_exactly():
    model = TwoBranch()
    x, y = make_data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    extra0, unused0 = model.extra.detach().clone(), model.unused.detach().clone()
    opt.step(make_closure(model, opt, x, y))
    assert opt.last_step_info.perturbed
    assert torch.equal(model.extra, extra0)  # perturbed, then restored; no grad in pass 2
    assert torch.equal(model.unused, unused0)
    assert model.extra.grad is None


def test_zero_gradient_step_is_a_no_op():
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = sum((p * 0).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    info = opt.last_step_info
    assert (info.perturbed, info.stepped, info.grad_norm, info.reason) == (
        False,
        True,
        0.0,
        "zero gradient norm",
    )
    assert len(calls) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
        assert not torch.isnan(v).any()


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_non_finite_gradient_skips_the_step(bad_pass):
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    x, y = make_data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        if len(calls) == bad_pass:
            model[0].weight.grad[0, 0] = float("nan")
        return loss

    opt.step(closure)
    info = opt.last_step_info
    assert not info.stepped
    assert info.reason == (
        "non-finite gradient at w" if bad_pass == 1 else "non-finite gradient at w + eps"
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert opt.state_dict()["state"] == {}  # the base optimizer never stepped
    opt.step(make_closure(model, opt, x, y))  # and the optimizer is usable afterwards
    assert opt.last_step_info.stepped


def test_exception_in_second_pass_restores_weights():
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    x, y = make_data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(KeyError, match="boom"):
        opt.step(closure)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not opt.perturbed
    opt.step(make_closure(model, opt, x, y))
    assert opt.last_step_info.stepped


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.step(make_closure(model, opt, x, y))


@pytest.mark.parametrize("variant", ["sam", "asam"])
def test_state_dict_resume_equals_uninterrupted_run_bitwise(variant):
    x, y = make_data()
    kwargs = {"lr": 1e-2, "weight_decay": 0.05, **VARIANTS[variant]}
    ref = make_mlp()
    ref_opt = SAM(ref.parameters(), torch.optim.AdamW, rho=0.05, **kwargs)
    _train(ref, ref_opt, x, y, 6)

    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, **kwargs)
    _train(model, opt, x, y, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_mlp(seed=99)  # different weights, overwritten by the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = SAM(resumed.parameters(), torch.optim.AdamW, rho=0.7, lr=1.0)  # options restored too
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["rho"] == 0.05 and opt2.param_groups[0]["lr"] == 1e-2
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    _train(resumed, opt2, x, y, 3)
    for p, q in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_is_the_base_state_and_nothing_transient():
    model = make_mlp()
    x, y = make_data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    _train(model, opt, x, y, 1)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())
    mse(model, x, y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="middle of a SAM step"):
        opt.state_dict()
    opt.second_step()


def test_param_groups_are_shared_and_per_group_rho():
    model = make_mlp()
    x, y = make_data()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = SAM(
        [{"params": first, "rho": 0.2}, {"params": second, "rho": 0.0, "lr": 0.05}],
        torch.optim.SGD,
        rho=0.1,
        lr=0.3,
    )
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert [g["rho"] for g in opt.param_groups] == [0.2, 0.0]
    f = functional_loss(model, x, y)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = grad(f)(w)
    names0 = ["0.weight", "0.bias"]
    norm = torch.linalg.vector_norm(torch.cat([g[k].reshape(-1) for k in names0]))
    eps = {k: (0.2 * g[k] / norm if k in names0 else torch.zeros_like(g[k])) for k in w}
    gp = grad(f)({k: w[k] + eps[k] for k in w})
    opt.step(make_closure(model, opt, x, y))
    for n, p in model.named_parameters():
        lr = 0.3 if n in names0 else 0.05
        torch.testing.assert_close(p.detach(), w[n] - lr * gp[n], rtol=1e-13, atol=1e-14)


def test_base_optimizer_instance():
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = SAM(model.parameters(), base, rho=0.1)
    assert opt.base_optimizer is base and opt.param_groups is base.param_groups
    assert base.param_groups[0]["rho"] == 0.1
    with pytest.raises(ValueError, match="built on different parameters or param groups"):
        SAM(list(model.parameters())[:2], torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"group sizes \[2, 2\]"):
        params = list(model.parameters())
        inst = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1)
        SAM(params, inst)
    with pytest.raises(
        TypeError, match=r"options \['lr'\] were given with a base optimizer instance"
    ):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), lr=0.2)


@pytest.mark.parametrize("by", ["predicate", "module_type"])
def test_perturbation_restricted_to_selected_parameters(by):
    model = make_mlp()
    x, y = make_data()
    if by == "predicate":
        opt = SAM(
            model.named_parameters(),
            torch.optim.SGD,
            rho=0.3,
            lr=0.1,
            perturb=lambda name, p: name.startswith("2."),
        )
    else:
        model = nn.Sequential(model[0], nn.Tanh(), nn.LayerNorm(5).to(D), model[2])
        opt = SAM(
            model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, perturb=nn.LayerNorm, model=model
        )
    selected = ["2.weight", "2.bias"]
    f = functional_loss(model, x, y)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = grad(f)(w)
    norm = torch.linalg.vector_norm(torch.cat([g[k].reshape(-1) for k in selected]))
    eps = {k: (0.3 * g[k] / norm if k in selected else torch.zeros_like(g[k])) for k in w}
    gp = grad(f)({k: w[k] + eps[k] for k in w})
    opt.step(make_closure(model, opt, x, y))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n] - 0.1 * gp[n], rtol=1e-13, atol=1e-14)


def test_bad_input():
    model = make_mlp()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="rho must be a finite number >= 0.*got -0.1"):
        SAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0.*got -1"):
        SAM([{"params": params, "rho": -1}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0.*got -0.5"):
        SAM(params, torch.optim.SGD, adaptive=True, eta=-0.5, lr=0.1)
    with pytest.raises(ValueError, match=r"norm must be one of \('l2', 'linf'\), got 'l1'"):
        SAM(params, torch.optim.SGD, norm="l1", lr=0.1)
    with pytest.raises(ValueError, match="only defined for norm='l2'"):
        SAM(params, torch.optim.SGD, norm="linf", normalize=False, lr=0.1)
    with pytest.raises(
        TypeError, match=r"unknown option\(s\) \['foo'\]: not an option of SAM .* nor of SGD"
    ):
        SAM(params, torch.optim.SGD, lr=0.1, foo=1)
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer"):
        SAM(params, "sgd", lr=0.1)
    with pytest.raises(
        TypeError,
        match="Optimizer subclass or instance, got the class int",
    ):
        SAM(params, int)
    with pytest.raises(ValueError, match="needs the model: pass model=model"):
        SAM(params, torch.optim.SGD, lr=0.1, perturb=nn.BatchNorm1d)
    with pytest.raises(TypeError, match="perturb must be None, a predicate"):
        SAM(params, torch.optim.SGD, lr=0.1, perturb=3)
    with pytest.raises(ValueError, match="selected none of the optimized parameters"):
        SAM(params, torch.optim.SGD, lr=0.1, perturb=nn.BatchNorm1d, model=model)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        SAM(params, torch.optim.SGD, lr=0.1, normalize="no")
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"SAM.step\(\) needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match=r"SAM.step\(\) needs a closure"):
        opt.second_step()
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(3)
    x, y = make_data()
    mse(model, x, y).backward()
    with pytest.raises(ValueError, match="grad_scale must be > 0"):
        opt.first_step(grad_scale=0.0)
    opt.first_step()
    with pytest.raises(
        RuntimeError, match=r"first_step\(\) called while a SAM step is in progress"
    ):
        opt.first_step()
    with pytest.raises(RuntimeError, match="step\\(closure\\) called while a two-call step"):
        opt.step(make_closure(model, opt, x, y))
    opt.second_step()


def test_repr_and_closure_sees_perturbed_flag():
    model = make_mlp()
    x, y = make_data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    assert repr(opt).startswith("SAM(SGD, rho=0.1")
    seen = []

    def closure():
        seen.append(opt.perturbed)
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    assert seen == [False, True]


def test_add_param_group_reaches_the_base_optimizer():
    model = make_mlp()
    opt = SAM(list(model[0].parameters()), torch.optim.SGD, rho=0.1, lr=0.1)
    opt.add_param_group({"params": list(model[2].parameters()), "rho": 0.3})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.3 and opt.param_groups[1]["lr"] == 0.1
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "rho": -2.0})


def test_reasons_when_nothing_can_be_perturbed():
    model = make_mlp()
    x, y = make_data()
    opt = SAM(model.named_parameters(), torch.optim.SGD, rho=0.1, lr=0.1,
              perturb=lambda name, p: name == "2.bias")  # fmt: skip
    assert not opt.first_step()  # no gradient at all
    opt.second_step()
    assert opt.last_step_info.reason == "no parameter has a gradient"
    model[2].bias.requires_grad_(False)
    mse(model, x, y).backward()
    assert not opt.first_step()
    opt.second_step()
    assert opt.last_step_info.reason == "no perturbed parameter has a gradient"
    assert opt.last_step_info.stepped


def test_load_a_plain_base_optimizer_state_dict():
    model = make_mlp()
    x, y = make_data()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    base.zero_grad()
    mse(model, x, y).backward()
    base.step()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.5, momentum=0.9)
    opt.load_state_dict(base.state_dict())
    assert opt.param_groups[0]["rho"] == 0.2 and opt.param_groups[0]["lr"] == 0.1
    assert all("momentum_buffer" in s for s in opt.state.values())
    assert opt.state is opt.base_optimizer.state


def test_deepcopy_and_pickle_keep_a_working_optimizer():
    import pickle

    model = make_mlp()
    x, y = make_data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt.step(make_closure(model, opt, x, y))
    model2, opt2 = copy.deepcopy((model, opt))
    model3, opt3 = pickle.loads(pickle.dumps((model, opt)))
    for m, o in ((model2, opt2), (model3, opt3)):
        assert o.param_groups is o.base_optimizer.param_groups and o.state is o.base_optimizer.state
        assert o.param_groups[0]["params"][0] is m[0].weight
    opt.step(make_closure(model, opt, x, y))
    opt2.step(make_closure(model2, opt2, x, y))
    opt3.step(make_closure(model3, opt3, x, y))
    for p, q, r in zip(model.parameters(), model2.parameters(), model3.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)


@pytest.mark.parametrize("seed", range(4))
def test_first_step_matches_sam_perturbation_with_per_group_options(seed):
    from sharpgen.sharpness import sam_perturbation

    g = torch.Generator().manual_seed(seed)
    model = make_mlp(seed)
    x, y = make_data(seed + 10)
    rho, eta = 0.05 + torch.rand(1, generator=g).item(), 0.1 * torch.rand(1, generator=g).item()
    norm = ["l2", "linf"][seed % 2]
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = SAM(
        [{"params": first}, {"params": second, "adaptive": True, "eta": eta}],
        torch.optim.SGD, rho=rho, lr=0.1, norm=norm,
    )  # fmt: skip
    mse(model, x, y).backward()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the pure function with the per-group scaling: T = 1 for group 0, |w| + eta for group 1
    t = {n: (w[n].abs() + eta if n.startswith("2.") else torch.ones_like(w[n])) for n in w}
    if norm == "l2":
        tg = torch.cat([(t[n] * grads[n]).reshape(-1) for n in w])
        expected = {n: rho * t[n] ** 2 * grads[n] / tg.norm() for n in w}
    else:
        expected = {n: rho * t[n] * grads[n].sign() for n in w}
    names0 = ["0.weight", "0.bias"]
    single = sam_perturbation({n: grads[n] for n in names0}, w, rho, norm=norm)
    opt.first_step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - w[n], expected[n], rtol=1e-12, atol=1e-15)
    if norm == "linf":  # group 0 is plain l-inf SAM, the same as the pure function
        for n in names0:
            torch.testing.assert_close(expected[n], single[n], rtol=0, atol=0)
    opt.second_step()
