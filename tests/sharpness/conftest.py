"""Fixtures for the sharpness tests: tiny float64 problems, dense truth, a state check."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sharpgen.curvature import flatten_params, unflatten_params

DT = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Quadratic(nn.Module):
    r"""$f(\theta) = \frac12 \theta^\top A \theta + c\,\|\theta\|^4$, returned once per sample."""

    def __init__(self, A: torch.Tensor, theta0: torch.Tensor, quartic: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("A", A.clone())
        self.theta = nn.Parameter(theta0.clone())
        self.quartic = quartic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.theta
        value = 0.5 * t @ self.A @ t + self.quartic * (t @ t) ** 2
        return value.expand(x.shape[0])


def mean_loss(outputs: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    return outputs.mean()


def random_spd(eigs: list[float], seed: int = 0) -> torch.Tensor:
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=_g(seed)))
    return Q @ torch.diag(torch.tensor(eigs, dtype=DT)) @ Q.T


def quadratic_problem(eigs, theta0=None, quartic: float = 0.0, seed: int = 0):
    A = random_spd(eigs, seed)
    theta0 = torch.zeros(len(eigs), dtype=DT) if theta0 is None else theta0
    model = Quadratic(A, theta0, quartic)
    data = (torch.zeros(4, 1, dtype=DT), torch.zeros(4, dtype=DT))
    return model, mean_loss, data, A


def make_mlp(seed: int = 0, d: int = 3, h: int = 5, out: int = 2) -> nn.Module:
    g = _g(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, out)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=DT, generator=g) * 0.8)
    return model


def regression_data(n: int = 12, d: int = 3, out: int = 2, seed: int = 1):
    g = _g(seed)
    return torch.randn(n, d, dtype=DT, generator=g), torch.randn(n, out, dtype=DT, generator=g)


def mse(outputs, targets):
    return torch.nn.functional.mse_loss(outputs, targets)


def dense_hessian(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(v):
        return loss_fn(functional_call(model, unflatten_params(v, params), (x,)), y)

    return torch.func.hessian(f)(flatten_params(params))


def _snapshot(model: nn.Module) -> dict:
    params = [
        (
            n,
            p,
            p.detach().clone(),
            p.requires_grad,
            p.grad,
            None if p.grad is None else p.grad.clone(),
        )
        for n, p in model.named_parameters()
    ]
    buffers = [(n, b, b.clone()) for n, b in model.named_buffers()]
    flags = [
        (n, m.training, getattr(m, "track_running_stats", None)) for n, m in model.named_modules()
    ]
    return {"params": params, "buffers": buffers, "flags": flags}


def _assert_same(model: nn.Module, snap: dict) -> None:
    now = dict(model.named_parameters())
    assert list(now) == [s[0] for s in snap["params"]]
    for name, obj, value, req, grad, grad_value in snap["params"]:
        p = now[name]
        assert p is obj and torch.equal(p.detach(), value), name
        assert p.requires_grad == req, name
        assert p.grad is grad, name
        if grad is not None:
            assert torch.equal(p.grad, grad_value), name
    bufs = dict(model.named_buffers())
    for name, obj, value in snap["buffers"]:
        assert bufs[name] is obj and torch.equal(bufs[name], value), name
    for name, training, track in snap["flags"]:
        m = model.get_submodule(name) if name else model
        assert m.training == training and getattr(m, "track_running_stats", None) == track, name


@pytest.fixture
def state_check():
    """``check = state_check(model)`` snapshots; ``check()`` asserts bitwise equality."""

    def make(model: nn.Module):
        snap = _snapshot(model)
        return lambda: _assert_same(model, snap)

    return make


class _Helpers:
    DT = DT
    g = staticmethod(_g)
    Quadratic = Quadratic
    mean_loss = staticmethod(mean_loss)
    random_spd = staticmethod(random_spd)
    quadratic_problem = staticmethod(quadratic_problem)
    make_mlp = staticmethod(make_mlp)
    regression_data = staticmethod(regression_data)
    mse = staticmethod(mse)
    dense_hessian = staticmethod(dense_hessian)


@pytest.fixture(scope="session")
def h():
    """Namespace of the factories and the dense truth (conftest is not importable)."""
    return _Helpers
