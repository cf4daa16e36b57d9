"""Shared helpers of the integration tests: tiny data, model snapshots."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def snapshot(model: nn.Module) -> dict:
    """Everything the callbacks promise not to change: values, modes, flags, gradients."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["training"] == b["training"]
    assert a["requires_grad"] == b["requires_grad"]
    for ga, gb in zip(a["grad"], b["grad"], strict=True):
        assert (ga is None) == (gb is None)
        if ga is not None:
            assert torch.equal(ga, gb)


@pytest.fixture
def regression():
    """32 float64 samples of a 3 -> 1 regression problem."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(32, 1, generator=g, dtype=torch.float64)
    return x, y


def mlp(seed: int = 0, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1)]
    return nn.Sequential(*layers).double()


class _Helpers:
    snapshot = staticmethod(snapshot)
    assert_same_snapshot = staticmethod(assert_same_snapshot)
    mlp = staticmethod(mlp)


@pytest.fixture
def ih():
    """Namespace of the helpers above (conftest is not importable)."""
    return _Helpers
