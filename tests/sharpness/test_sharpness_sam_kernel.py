"""The one SAM perturbation kernel: closed forms, its flavours agree, and every user uses it."""

from __future__ import annotations

import pytest
import torch

from sharpgen.experiments import ExperimentSpec, Phase, _trainer
from sharpgen.experiments._kernels import kernels_for
from sharpgen.experiments._trainer import make_runs
from sharpgen.optim import GSAM, SAM
from sharpgen.sharpness import sam_perturbation
from sharpgen.sharpness._sam_kernel import (
    sam_grad_norms,
    sam_perturb_,
    sam_perturbation_list,
    total_norm,
)

D = torch.float64
VARIANTS = [
    {"norm": "l2"},
    {"norm": "l2", "adaptive": True, "eta": 0.1},
    {"norm": "l2", "normalize": False},
    {"norm": "l2", "normalize": False, "adaptive": True, "eta": 0.2},
    {"norm": "linf"},
    {"norm": "linf", "adaptive": True, "eta": 0.05},
]


def _tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (4,), (1,)]
    params = [torch.randn(s, generator=g, dtype=D) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=D) for s in shapes]
    return params, grads


def _hand(params, grads, rho, norm="l2", adaptive=False, eta=0.0, normalize=True, scale=1.0):
    """The perturbation on flat vectors, written out from the formula."""
    w = torch.cat([p.reshape(-1) for p in params])
    g = torch.cat([q.reshape(-1) for q in grads]) / scale
    t = w.abs() + eta if adaptive else torch.ones_like(w)
    if norm == "linf":
        e = rho * t * torch.sign(g)
    elif not normalize:
        e = rho * t * t * g
    else:
        e = rho * t * t * g / torch.linalg.vector_norm(t * g)
    return e


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("opts", VARIANTS, ids=str)
@pytest.mark.parametrize("grad_scale", [None, 1024.0])
def test_kernel_closed_forms_and_flavours(opts, grad_scale):
    params, grads = _tensors(0)
    scale = grad_scale or 1.0
    grads = [g * scale for g in grads]  # gradients as GradScaler leaves them
    kw = {k: v for k, v in opts.items() if k != "eta"}
    eta = opts.get("eta", 0.0)
    n = sam_grad_norms(params, grads, adaptive=kw.get("adaptive", False), eta=eta)
    n_fe = sam_grad_norms(params, grads, adaptive=kw.get("adaptive", False), eta=eta, foreach=True)
    total = total_norm(n)
    assert torch.equal(total, total_norm(n_fe))
    expected = _hand(params, grads, 0.3, **opts, scale=scale)
    common = dict(rho=0.3, eta=eta, grad_scale=grad_scale, **kw)
    out = sam_perturbation_list(params, grads, grad_norm=total, **common)
    torch.testing.assert_close(_flat(out), expected, rtol=1e-13, atol=1e-15)
    # in place, single-tensor and foreach, with a host (float) or a device (tensor) norm
    results = []
    for foreach in (False, True):
        for grad_norm in (float(total), total):
            moved = [p.clone() for p in params]
            sam_perturb_(moved, grads, grad_norm=grad_norm, foreach=foreach, **common)
            results.append(_flat(moved))
            torch.testing.assert_close(results[-1], _flat(params) + expected, rtol=1e-13, atol=0)
    assert torch.equal(results[0], results[2])  # foreach == single tensor, bit for bit
    assert torch.equal(results[1], results[3])


@pytest.mark.parametrize("grad_norm", [0.0, torch.zeros((), dtype=D)])
def test_zero_norm_gives_zero_perturbation_not_nan(grad_norm):
    params, _ = _tensors(1)
    grads = [torch.zeros_like(p) for p in params]
    out = sam_perturbation_list(params, grads, rho=0.5, grad_norm=grad_norm)
    assert all(torch.equal(e, torch.zeros_like(e)) for e in out)
    moved = [p.clone() for p in params]
    sam_perturb_(moved, grads, rho=0.5, grad_norm=grad_norm, foreach=True)
    assert all(torch.equal(a, b) for a, b in zip(moved, params, strict=True))


def test_normalized_l2_needs_the_norm():
    params, grads = _tensors(2)
    with pytest.raises(ValueError, match="grad_norm"):
        sam_perturbation_list(params, grads, rho=0.1, grad_norm=None)


def test_kernel_under_vmap_matches_the_loop():
    params, _ = _tensors(3)
    g = torch.Generator().manual_seed(9)
    batch = [torch.randn((5, *p.shape), generator=g, dtype=D) for p in params]

    def one(*gs):
        total = total_norm(sam_grad_norms(params, gs, adaptive=True, eta=0.1))
        return tuple(
            sam_perturbation_list(params, gs, rho=0.2, grad_norm=total, adaptive=True, eta=0.1)
        )

    out = torch.func.vmap(one)(*batch)
    for i in range(5):
        single = one(*[b[i] for b in batch])
        for a, b in zip(out, single, strict=True):
            torch.testing.assert_close(a[i], b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("opts", [v for v in VARIANTS if v.get("normalize", True)], ids=str)
def test_sam_and_gsam_first_step_is_the_kernel(opts):
    """SAM's and GSAM's perturbation is the kernel's, bit for bit (same inputs, same calls)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.to(D)
    x, y = torch.randn(6, 3, dtype=D), torch.randn(6, 1, dtype=D)
    for cls, kw in ((SAM, {"rho": 0.2}), (GSAM, {"rho_max": 0.2})):
        opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, **kw, **opts)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        params = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        adaptive, eta = opts.get("adaptive", False), opts.get("eta", 0.0)
        total = total_norm(sam_grad_norms(params, grads, adaptive=adaptive, eta=eta))
        sam_perturb_(
            params, grads, rho=0.2, grad_norm=float(total), norm=opts["norm"],
            adaptive=adaptive, eta=eta, foreach=True,
        )  # fmt: skip
        assert opt.first_step()
        for p, q in zip(model.parameters(), params, strict=True):
            assert torch.equal(p.detach(), q)
        opt.restore()
        opt.zero_grad()


def test_sam_perturbation_dict_form_is_the_kernel():
    params, grads = _tensors(4)
    names = ["a", "b", "c"]
    eps = sam_perturbation(
        dict(zip(names, grads, strict=True)), dict(zip(names, params, strict=True)), 0.4,
        adaptive=True, eta=0.3,
    )  # fmt: skip
    total = total_norm(sam_grad_norms(params, grads, adaptive=True, eta=0.3))
    out = sam_perturbation_list(params, grads, rho=0.4, grad_norm=total, adaptive=True, eta=0.3)
    for n, e in zip(names, out, strict=True):
        assert torch.equal(eps[n], e)


@pytest.mark.parametrize("arch", ["bias", "no_bias"])
def test_batched_trainer_perturbation_equals_the_kernel(arch, monkeypatch):
    """The trainer's batched SAM step (one perturbation per run) is the kernel run by run."""
    spec = ExperimentSpec(
        "k", arch, "sam1", (Phase(1, 0.05, 0.1),), d=4, n=8, width=6, test_size=4,
        batch_size=4, dtype="float64",
    )  # fmt: skip
    (X, Y, _, _), P, _ = make_runs(spec, [0, 1, 2])
    idx = torch.arange(4).repeat(3, 1)
    calls = []
    kernels = kernels_for(spec)
    original = kernels.loss_and_grad

    def recording(params, *args, **kwargs):
        loss, grads = original(params, *args, **kwargs)
        calls.append(({k: v.clone() for k, v in params.items()}, grads))
        return loss, grads

    monkeypatch.setattr(kernels, "loss_and_grad", recording)
    names = kernels.names(P)
    _trainer._sam_step(spec, kernels, {k: v.clone() for k, v in P.items()}, X, Y, idx, 0.05, 0.1)
    assert len(calls) == 2
    (w, g), (q, _) = calls
    for r in range(3):
        ps = [w[k][r] for k in names]
        gs = [g[k][r] for k in names]
        total = total_norm(sam_grad_norms(ps, gs))
        expected = [p.clone() for p in ps]
        sam_perturb_(expected, gs, rho=0.1, grad_norm=total)
        for k, e in zip(names, expected, strict=True):
            torch.testing.assert_close(q[k][r], e, rtol=1e-14, atol=1e-16)
