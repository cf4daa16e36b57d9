"""Contracts of every measure: model state untouched, generator isolation, determinism, dtype."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from sharpgen.sharpness import (
    average_sharpness,
    hessian_trace,
    sam_sharpness,
    spectral_density,
    top_eigenvalues,
)

DT = torch.float64


def _bn_model(dtype=DT) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 2)
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=dtype, generator=g))
    x = torch.randn(8, 3, dtype=dtype, generator=g)
    model.train()
    model(x).sum().backward()  # running statistics moved, .grad set
    model[4].bias.requires_grad_(False)
    model[4].bias.grad = None
    return model


def _data(dtype=DT):
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 3, dtype=dtype, generator=g), torch.randn(
        10, 2, dtype=dtype, generator=g
    )


def _mse(out, y):
    return nn.functional.mse_loss(out, y)


MEASURES = {
    "trace_exact": lambda m, f, d, g: hessian_trace(m, f, d, method="exact", generator=g),
    "trace_xtrace": lambda m, f, d, g: hessian_trace(
        m, f, d, method="xtrace", num_matvecs=8, generator=g
    ),
    "trace_hutchpp": lambda m, f, d, g: hessian_trace(
        m, f, d, method="hutchpp", num_matvecs=9, generator=g
    ),
    "eigen": lambda m, f, d, g: top_eigenvalues(m, f, d, k=2, generator=g),
    "density": lambda m, f, d, g: spectral_density(m, f, d, num_probes=3, num_steps=5, generator=g),
    "sam": lambda m, f, d, g: sam_sharpness(m, f, d, 0.1, steps=3, restarts=2, generator=g),
    "sam_m": lambda m, f, d, g: sam_sharpness(
        m, f, d, 0.1, steps=2, m=5, restarts=1, norm="linf", generator=g
    ),
    "average": lambda m, f, d, g: average_sharpness(m, f, d, 0.1, num_samples=4, generator=g),
}  # fmt: skip


def _fingerprint(result) -> list[torch.Tensor]:
    """Every number of a result, as tensors (for bitwise comparison)."""
    out = []
    for value in vars(result).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, float):
            out.append(torch.tensor(value, dtype=torch.float64))
        elif isinstance(value, dict):
            out.extend(value.values())
        elif isinstance(value, list):
            for d in value:
                out.extend(d.values())
    return out


@pytest.mark.parametrize("name", list(MEASURES))
def test_state_untouched_generator_isolated_and_deterministic(state_check, name):
    model = _bn_model()
    data = _data()
    check = state_check(model)
    rng = torch.get_rng_state()
    first = MEASURES[name](model, _mse, data, torch.Generator().manual_seed(7))
    check()
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was used"
    second = MEASURES[name](model, _mse, data, torch.Generator().manual_seed(7))
    a, b = _fingerprint(first), _fingerprint(second)
    assert len(a) == len(b) and len(a) > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    third = MEASURES[name](model, _mse, data, torch.Generator().manual_seed(8))
    # the exact trace has no randomness; the attacks' restarts need not win
    if name not in ("trace_exact", "sam", "sam_m"):
        c = _fingerprint(third)
        assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    check()


class _FailingLoss:
    """A loss that raises on its ``fail_at``-th call or in its first backward pass."""

    def __init__(self, fail_at: int) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, out, y):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise ValueError("boom")
        loss = _mse(out, y)
        if loss.requires_grad:
            loss.register_hook(self._boom)
        return loss

    @staticmethod
    def _boom(grad):
        raise ValueError("boom")


@pytest.mark.parametrize("name", list(MEASURES))
def test_state_restored_after_an_exception(state_check, name):
    model = _bn_model()
    check = state_check(model)
    # call 1 validates the objective; the first backward pass or call 2 is inside the first
    # product (on one batch the measures build the first graph from the validation's loss)
    with pytest.raises(ValueError, match="boom"):
        MEASURES[name](model, _FailingLoss(2), _data(), torch.Generator().manual_seed(0))
    check()


def test_batch_statistics_policy_leaves_running_stats(state_check):
    model = _bn_model()
    check = state_check(model)
    data = _data()
    a = hessian_trace(model, _mse, data, bn="batch").value
    b = hessian_trace(model, _mse, data, bn="eval").value
    assert a != b  # the two policies are different functions
    sam_sharpness(model, _mse, data, 0.1, bn="batch", m=5)
    check()


def test_dtype_follows_the_model():
    model = _bn_model(torch.float32)
    data = _data(torch.float32)
    g = torch.Generator().manual_seed(0)
    res = top_eigenvalues(model, _mse, data, k=1, tol=1e-2, generator=g)
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.dtype == torch.float32
    sam = sam_sharpness(model, _mse, data, 0.1, steps=2, restarts=1, generator=g)
    assert all(t.dtype == torch.float32 for t in sam.perturbation.values())
    dens = spectral_density(model, _mse, data, num_probes=2, num_steps=4, generator=g)
    assert dens.nodes.dtype == torch.float32


def test_progress_bar_does_not_change_results(capsys):
    model = _bn_model()
    data = _data()
    runs = [
        lambda p: hessian_trace(model, _mse, data, method="hutchpp", num_matvecs=6,
                                generator=torch.Generator().manual_seed(0), progress=p),
        lambda p: top_eigenvalues(model, _mse, data, generator=torch.Generator().manual_seed(0),
                                  progress=p),
        lambda p: spectral_density(model, _mse, data, num_probes=2, num_steps=3,
                                   generator=torch.Generator().manual_seed(0), progress=p),
        lambda p: sam_sharpness(model, _mse, data, 0.1, steps=2, progress=p),
        lambda p: average_sharpness(model, _mse, data, 0.1, num_samples=3,
                                    generator=torch.Generator().manual_seed(0), progress=p),
        lambda p: hessian_trace(model, _mse, data, method="exact", block_size=5, progress=p),
    ]  # fmt: skip
    for run in runs:
        quiet, shown = run(False), run(True)
        a, b = _fingerprint(quiet), _fingerprint(shown)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    err = capsys.readouterr().err
    for desc in ("hessian_trace", "top_eigenvalues", "spectral_density", "sam_sharpness",
                 "average_sharpness"):  # fmt: skip
        assert desc in err


def test_missing_tqdm_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    model = _bn_model()
    with pytest.raises(ImportError, match="progress=True needs tqdm.*pip install tqdm"):
        hessian_trace(model, _mse, _data(), progress=True)
    with pytest.raises(TypeError, match="progress must be a bool"):
        sam_sharpness(model, _mse, _data(), 0.1, progress="yes")


@pytest.mark.parametrize("name", list(MEASURES))
def test_non_finite_loss_raises_floating_point_error(state_check, name):
    model = _bn_model()
    x, y = _data()
    y = y.clone()
    y[3, 0] = float("inf")
    check = state_check(model)
    with pytest.raises(FloatingPointError):
        MEASURES[name](model, _mse, (x, y), torch.Generator().manual_seed(0))
    check()
