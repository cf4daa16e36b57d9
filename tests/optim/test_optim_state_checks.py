"""A SAM/GSAM state dict saved with another base optimizer class is refused at load time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpgen.optim import GSAM, SAM

DT = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _trained(opt, model) -> dict:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, dtype=DT, generator=g), torch.randn(8, 1, dtype=DT, generator=g)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return opt.state_dict()


def _make(kind: str, model: nn.Module, base, **kw):
    if kind == "SAM":
        return SAM(model.parameters(), base, rho=0.05, lr=0.1, **kw)
    return GSAM(model.parameters(), base, rho_max=0.05, alpha=0.1, lr=0.1, **kw)


@pytest.mark.parametrize("kind", ["SAM", "GSAM"])
def test_adam_state_into_sgd_is_refused_naming_classes_and_keys(kind):
    model = _model()
    state = _trained(_make(kind, model, torch.optim.Adam), model)
    opt = _make(kind, model, torch.optim.SGD, momentum=0.9)
    before = opt.state_dict()
    pattern = (
        rf"{kind}.load_state_dict: this state dict cannot belong to {kind}\(\.\.\., SGD\): its "
        r"param groups lack the SGD options \['dampening', 'momentum'\] and carry "
        r"options SGD does not have \[.*'betas'.*\]\. It looks like a state of torch.optim.Adam"
    )
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(state)
    # nothing was loaded: the optimizer still steps with its own state
    assert opt.state_dict() == before
    _trained(opt, model)


@pytest.mark.parametrize("kind", ["SAM", "GSAM"])
def test_sgd_state_into_adam_is_refused(kind):
    model = _model()
    state = _trained(_make(kind, model, torch.optim.SGD, momentum=0.9), model)
    opt = _make(kind, model, torch.optim.Adam)
    with pytest.raises(ValueError, match=r"lack the Adam options \['betas', 'eps'\]"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("kind", ["SAM", "GSAM"])
def test_matching_state_and_state_from_an_older_torch_still_load(kind):
    model = _model()
    state = _trained(_make(kind, model, torch.optim.Adam), model)
    # an option a newer torch added (torch fills it in on load) is not required in the file
    for group in state["param_groups"]:
        del group["decoupled_weight_decay"]
    opt = _make(kind, model, torch.optim.Adam)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["decoupled_weight_decay"] is False
    assert opt.state is opt.base_optimizer.state and len(opt.state) == 4
    _trained(opt, model)
