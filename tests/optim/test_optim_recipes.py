"""Training-loop recipes: BatchNorm, dropout replay, AMP GradScaler, accumulation, schedulers,
clipping -- each checked against an equation or an exact state."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from sharpgen.optim import SAM, disable_running_stats, sam_gradient
from sharpgen.sharpness import sam_perturbation

D = torch.float64


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def data(n=8, d=3, k=2, seed=1, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype)


# -- BatchNorm ---------------------------------------------------------------------------------
def test_batchnorm_buffers_updated_once_per_step_at_w(h):
    model = seeded(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(D))
    x, y = data()
    reference = copy.deepcopy(model)
    reference(x)  # one training forward at w: the buffers a base optimizer step leaves
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0, model=model)
    opt.step(h.mse_closure(model, opt, x, y))
    assert opt.last_step_info.perturbed
    bn, ref_bn = model[1], reference[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)
    assert bn.track_running_stats


def test_disable_running_stats_leaves_every_buffer_and_flag_unchanged():
    model = nn.Sequential(
        nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.InstanceNorm1d(3, track_running_stats=True),
        nn.BatchNorm1d(3),
    ).to(D)  # fmt: skip
    model[3].eval()
    x = torch.randn(4, 2, 5, dtype=D)
    model(x)  # non-trivial buffers
    before = copy.deepcopy(model.state_dict())
    eval_out = model[3](torch.ones(2, 3, 5, dtype=D))
    with pytest.raises(KeyError):
        with disable_running_stats(model):
            model(x)
            assert not model[1].track_running_stats
            # eval-mode modules still use (and keep) their running statistics
            assert torch.equal(model[3](torch.ones(2, 3, 5, dtype=D)), eval_out)
            raise KeyError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.track_running_stats for m in model[1:]] == [True, True, True]
    assert [m.training for m in model[1:]] == [True, True, False]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        with disable_running_stats(None):
            pass


# -- dropout replay ----------------------------------------------------------------------------
class Masks(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 6).to(D)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(6, 2).to(D)
        self.masks = []

    def forward(self, x):
        h = self.drop(torch.ones(x.shape[0], 6, dtype=D))
        self.masks.append(h != 0)
        return self.out(self.lin(x) * h)


@pytest.mark.parametrize("same", [True, False])
def test_same_dropout_replays_the_masks_and_leaves_rng_as_after_one_pass(h, same):
    torch.manual_seed(0)
    model = seeded(Masks())
    x, y = data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, same_dropout=same)
    state = torch.get_rng_state()
    torch.nn.Dropout(0.5)(torch.ones(x.shape[0], 6, dtype=D))  # what one pass consumes
    after_one_pass = torch.get_rng_state()
    torch.set_rng_state(state)
    opt.step(h.mse_closure(model, opt, x, y))
    assert len(model.masks) == 2
    assert torch.equal(model.masks[0], model.masks[1]) == same
    if same:
        assert torch.equal(torch.get_rng_state(), after_one_pass)


# -- AMP -----------------------------------------------------------------------------------------
def amp_step(model, opt, scaler, x, y, inject=None, autocast=True):
    """The recipe of docs/guide/sam.md with an optional artificial overflow."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = ((model(x) - y) ** 2).float().mean()
    scaler.scale(loss).backward()
    if inject == 1:
        model[0].weight.grad[0, 0] = float("inf")
    if opt.first_step(zero_grad=True, grad_scale=scaler.get_scale()):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with disable_running_stats(model):
                loss2 = ((model(x) - y) ** 2).float().mean()
        scaler.scale(loss2).backward()
        if inject == 2:
            model[0].weight.grad[0, 0] = float("inf")
        opt.restore()
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("inject", [1, 2])
def test_grad_scaler_skips_the_step_on_overflow_in_either_pass(inject):
    model = seeded(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    x, y = data(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = copy.deepcopy(model.state_dict())
    amp_step(model, opt, scaler, x, y, inject=inject)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert scaler.get_scale() == 2.0**9
    assert opt.base_optimizer.state_dict()["state"] == {}
    amp_step(model, opt, scaler, x, y)  # the next iteration is a normal step
    assert opt.last_step_info.stepped and opt.last_step_info.perturbed
    assert not torch.equal(model[0].weight, before["0.weight"])


@pytest.mark.parametrize("normalize", [True, False])
def test_grad_scaler_step_equals_unscaled_step(h, normalize):
    x, y = data(dtype=torch.float32)
    a = seeded(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    b = copy.deepcopy(a)
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, normalize=normalize)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, normalize=normalize)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    amp_step(a, opt_a, scaler, x, y, autocast=False)  # exact power-of-two scaling
    opt_b.step(h.mse_closure(b, opt_b, x, y))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- gradient accumulation -----------------------------------------------------------------------
def test_accumulation_per_micro_batch_is_m_sam(h):
    model = seeded(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D))
    x, y = data(n=8)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_fn(p, batch):
        xb, yb = batch
        return ((functional_call(model, p, (xb,)) - yb) ** 2).mean()

    expected = sam_gradient(loss_fn, params, (x, y), 0.2, micro_batch=4)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.5)
    for i in range(2):
        opt.accumulate(h.mse_closure(model, opt, x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4], 0.5))
    opt.step()
    assert opt.last_step_info.micro_batches == 2
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            p.detach(), params[n] - 0.5 * expected[n], rtol=1e-13, atol=1e-14
        )


def test_accumulation_global_perturbation_equals_full_batch_sam(h):
    x, y = data(n=8)
    a = seeded(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D))
    b = copy.deepcopy(a)
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.2, lr=0.5)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.2, lr=0.5)

    def accumulating_closure():
        opt_a.zero_grad()
        total = 0.0
        for i in range(2):
            loss = ((a(x[4 * i : 4 * i + 4]) - y[4 * i : 4 * i + 4]) ** 2).mean() / 2
            loss.backward()
            total += loss.detach()
        return total

    opt_a.step(accumulating_closure)
    opt_b.step(h.mse_closure(b, opt_b, x, y))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-14)


def test_accumulate_skips_when_a_micro_batch_is_non_finite(h):
    model = seeded(nn.Sequential(nn.Linear(3, 2)).to(D))
    x, y = data(n=4)
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.5)
    opt.accumulate(h.mse_closure(model, opt, x[:2], y[:2]))
    opt.accumulate(h.mse_closure(model, opt, x[2:], y[2:], scale=float("nan")))
    opt.step()
    assert not opt.last_step_info.stepped
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# -- schedulers, clipping ------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["closure", "two_call"])
def test_lr_scheduler_without_warnings_and_lr_reaches_base(h, style):
    model = seeded(nn.Sequential(nn.Linear(3, 2)).to(D))
    x, y = data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):
            if style == "closure":
                opt.step(h.mse_closure(model, opt, x, y))
            else:
                h.mse_closure(model, opt, x, y)()
                opt.first_step(zero_grad=True)
                h.mse_closure(model, opt, x, y)()
                opt.second_step()
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    # the next update uses the scheduled lr
    lr = 0.1 * 0.5**3

    def f(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps = sam_perturbation(grad(f)(w), w, 0.1)
    gp = grad(f)({k: w[k] + eps[k] for k in w})
    opt.step(h.mse_closure(model, opt, x, y))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n] - lr * gp[n], rtol=1e-13, atol=1e-15)


def test_clipping_the_final_gradient_with_a_base_pre_hook(h):
    model = seeded(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D))
    x, y = data()

    def f(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps = sam_perturbation(grad(f)(w), w, 0.3)
    gp = grad(f)({k: w[k] + eps[k] for k in w})
    norm = torch.linalg.vector_norm(torch.cat([v.reshape(-1) for v in gp.values()]))
    max_norm = 0.5 * float(norm)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)

    def clip_final_gradient(optimizer, args, kwargs):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    opt.base_optimizer.register_step_pre_hook(clip_final_gradient)
    opt.step(h.mse_closure(model, opt, x, y))
    clip = max_norm / (float(norm) + 1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n] - 0.1 * clip * gp[n], rtol=1e-12, atol=1e-14)
