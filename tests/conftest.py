"""The shared test helpers: the collection guard, tiny float64 problems, dense truth, and the
bitwise model-state check (one definition for every test folder).

Fixtures: ``gen`` (a seeded generator), ``state_check`` (``check = state_check(model)``
snapshots, ``check()`` asserts bitwise equality), and the namespaces ``cv`` (the curvature
cases) and ``h`` (the sharpness problems and the optimizer closures); conftest modules are not
importable, hence the namespaces.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")

# A run that collects fewer tests than this is broken (wrong path, import error hidden by a
# plugin, ...): fail loudly instead of passing with "no tests collected".
MIN_TESTS = 20


def pytest_collection_finish(session: pytest.Session) -> None:
    selected_all = not session.config.args or session.config.args == session.config.getini(
        "testpaths"
    )
    if selected_all and not session.config.option.keyword and len(session.items) < MIN_TESTS:
        raise pytest.UsageError(
            f"only {len(session.items)} tests collected (expected at least {MIN_TESTS}); "
            "the test suite is not being found."
        )


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """One thread for a test (then restored): long elementwise passes, no spinning on CI."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# -- tiny float64 problems and dense truth ------------------------------------------------------
DT = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def regression_data(n: int = 10, seed: int = 1, d: int = 3, out: int = 2):
    g = _g(seed)
    return torch.randn(n, d, dtype=DT, generator=g), torch.randn(n, out, dtype=DT, generator=g)


def classification_data(n: int = 12, seed: int = 2, classes: int = 3):
    g = _g(seed)
    return torch.randn(n, 3, dtype=DT, generator=g), torch.randint(0, classes, (n,), generator=g)


class ConvBN(nn.Module):
    """conv(1->2, 3x3) -> BatchNorm2d -> tanh -> linear; 2*9+2 + 2*2 + 2*9*... small."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def make_convbn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvBN().to(DT)
    # non-trivial running statistics, so that bn="eval" and bn="batch" differ
    with torch.no_grad():
        for s in range(3):
            model(torch.randn(6, 1, 5, 5, dtype=DT, generator=_g(100 + s)) * 2 + 1)
    return model


def image_data(n: int = 6, seed: int = 3):
    g = _g(seed)
    return torch.randn(n, 1, 5, 5, dtype=DT, generator=g), torch.randint(0, 2, (n,), generator=g)


class FrozenUnused(nn.Module):
    """A linear layer, a frozen scale and a parameter the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5]), requires_grad=False)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.scale


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) * self.b(z)


def dict_data(n: int = 8, seed: int = 4):
    g = _g(seed)
    inputs = {
        "x": torch.randn(n, 3, dtype=DT, generator=g),
        "z": torch.randn(n, 2, dtype=DT, generator=g),
    }
    return inputs, torch.randn(n, 2, dtype=DT, generator=g)


def _n(inputs) -> int:
    return inputs.shape[0] if torch.is_tensor(inputs) else next(iter(inputs.values())).shape[0]


def dense_hessian(model, loss_fn, batches, names=None, reduction="mean", bn="eval"):
    """Dense float64 truth: Hessian of the flattened dataset loss.

    ``bn="eval"``: ``torch.func.hessian`` of the loss of a deep copy in eval mode.
    ``bn="batch"``: ``torch.autograd.functional.hessian`` of a deep copy in *train* mode
    (batch statistics; its running buffers are updated on the copy only).
    """
    ref = copy.deepcopy(model)
    ref.eval() if bn == "eval" else ref.train()
    named = dict(ref.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if names is None else list(names)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    total = sum(_n(inputs) for inputs, _ in batches)

    def loss_of(vec):
        pieces = torch.split(vec, sizes)
        p = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        out = 0.0
        for inputs, targets in batches:
            if isinstance(inputs, dict):
                o = torch.func.functional_call(ref, p, (), inputs)
            else:
                o = torch.func.functional_call(ref, p, (inputs,))
            n_b = _n(inputs)
            w = n_b / total if reduction == "mean" else 1.0
            out = out + w * loss_fn(o, targets)
        return out

    vec = torch.cat([named[n].detach().reshape(-1) for n in names])
    if bn == "eval":
        return torch.func.hessian(loss_of)(vec)
    return torch.autograd.functional.hessian(loss_of, vec)


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


def scaled_mlp(seed: int = 0, d: int = 3, h: int = 5, out: int = 2) -> nn.Module:
    g = _g(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, out)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=DT, generator=g) * 0.8)
    return model


def mse(outputs, targets):
    return torch.nn.functional.mse_loss(outputs, targets)


def spd_quadratic(seed: int = 0, n: int = 5):
    r"""$L(w) = \frac12 (w - c)^\top A (w - c)$, $A = M M^\top + I$ symmetric positive definite
    (gradient $A (w - c)$): returns ``(w, A, c)`` with ``w`` a float64 ``nn.Parameter``."""
    g = _g(seed)
    m = torch.randn(n, n, generator=g, dtype=DT)
    a = m @ m.T + torch.eye(n, dtype=DT)
    c = torch.randn(n, generator=g, dtype=DT)
    w = nn.Parameter(torch.randn(n, generator=g, dtype=DT))
    return w, a, c


def quadratic_closure(opt, w, a, c):
    """The optimizer closure of ``spd_quadratic``: zero the gradients, loss, backward."""

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w - c) @ a @ (w - c)
        loss.backward()
        return loss

    return closure


def mse_closure(model, opt, x, y, scale: float = 1.0, hook=None):
    """The optimizer closure of ``scale * mean((model(x) - y)^2)``; ``hook()`` runs after the
    backward pass."""

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() * scale
        loss.backward()
        if hook is not None:
            hook()
        return loss

    return closure


# -- the model-state check ------------------------------------------------------------------------
def _snapshot(model: nn.Module) -> dict:
    params = []
    for name, p in model.named_parameters():
        grad = p.grad
        params.append(
            (
                name,
                p,
                p.detach().clone(),
                p.requires_grad,
                grad,
                None if grad is None else grad.clone(),
            )
        )
    buffers = [(name, b, b.clone()) for name, b in model.named_buffers()]
    flags = [
        (name, m.training, getattr(m, "track_running_stats", None))
        for name, m in model.named_modules()
    ]
    return {"params": params, "buffers": buffers, "flags": flags}


def _assert_same(model: nn.Module, snap: dict) -> None:
    now = dict(model.named_parameters())
    assert list(now) == [s[0] for s in snap["params"]]
    for name, obj, value, req, grad, grad_value in snap["params"]:
        p = now[name]
        assert p is obj, f"parameter {name} was replaced"
        assert torch.equal(p.detach(), value), f"parameter {name} changed"
        assert p.requires_grad == req, f"requires_grad of {name} changed"
        assert p.grad is grad, f".grad of {name} was replaced"
        if grad is not None:
            assert torch.equal(p.grad, grad_value), f".grad of {name} changed"
    bufs = dict(model.named_buffers())
    assert list(bufs) == [s[0] for s in snap["buffers"]]
    for name, obj, value in snap["buffers"]:
        assert bufs[name] is obj, f"buffer {name} was replaced"
        assert torch.equal(bufs[name], value), f"buffer {name} changed"
    for name, training, track in snap["flags"]:
        m = model.get_submodule(name) if name else model
        assert m.training == training, f"training flag of {name!r} changed"
        assert getattr(m, "track_running_stats", None) == track


@pytest.fixture
def state_check():
    """``check = state_check(model)`` snapshots; ``check()`` asserts bitwise equality."""

    def make(model: nn.Module):
        snap = _snapshot(model)
        return lambda: _assert_same(model, snap)

    return make


class CountingBatches:
    """A re-iterable list of batches that counts how often it is iterated."""

    def __init__(self, batches):
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class _Cases:
    make_mlp = staticmethod(make_mlp)
    regression_data = staticmethod(regression_data)
    classification_data = staticmethod(classification_data)
    make_convbn = staticmethod(make_convbn)
    image_data = staticmethod(image_data)
    FrozenUnused = FrozenUnused
    DictInput = DictInput
    dict_data = staticmethod(dict_data)
    dense_hessian = staticmethod(dense_hessian)
    CountingBatches = CountingBatches


@pytest.fixture
def cv():
    """The curvature cases: model/data factories and the dense truth."""
    return _Cases


def _sharpness_data(n: int = 12, d: int = 3, out: int = 2, seed: int = 1):
    return regression_data(n, seed, d, out)


def _dense_hessian_of_batch(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    return dense_hessian(model, loss_fn, [(x, y)], names=[n for n, _ in model.named_parameters()])


class _Helpers:
    DT = DT
    g = staticmethod(_g)
    Quadratic = Quadratic
    mean_loss = staticmethod(mean_loss)
    random_spd = staticmethod(random_spd)
    quadratic_problem = staticmethod(quadratic_problem)
    make_mlp = staticmethod(scaled_mlp)
    regression_data = staticmethod(_sharpness_data)
    mse = staticmethod(mse)
    dense_hessian = staticmethod(_dense_hessian_of_batch)
    spd_quadratic = staticmethod(spd_quadratic)
    quadratic_closure = staticmethod(quadratic_closure)
    mse_closure = staticmethod(mse_closure)


@pytest.fixture(scope="session")
def h():
    """The sharpness problems (quadratics, scaled MLPs, the dense truth) and the optimizer
    closures of the tests in tests/optim."""
    return _Helpers
