"""Hugging Face batches as they come: a dict with the labels inside and the model's own loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpgen import (
    ModelObjective,
    SharpnessTracker,
    ggn_trace,
    hessian_trace,
    loss_landscape_1d,
    model_loss,
    top_eigenvalues,
)
from sharpgen.curvature import as_batches

DT = torch.float64


class SelfLoss(nn.Module):
    """Returns ``{"logits", "loss"}`` like a Transformers model, the loss from ``labels``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _ce(outputs, y):
    return nn.functional.cross_entropy(outputs["logits"], y)


def _setup(n=(5, 3)):
    torch.manual_seed(0)
    model = SelfLoss().to(DT)
    g = torch.Generator().manual_seed(1)
    batches = [
        {
            "x": torch.randn(k, 3, dtype=DT, generator=g),
            "labels": torch.randint(0, 2, (k,), generator=g),
        }
        for k in n
    ]
    return model, batches


def test_a_dict_batch_is_one_batch_with_the_labels_inside():
    _, (batch, _) = _setup()
    inputs, targets = as_batches(batch).first()
    assert targets is None and inputs.keys() == batch.keys()
    assert as_batches(batch).single


@pytest.mark.parametrize("loss_fn", [None, model_loss])
def test_the_models_own_loss_equals_the_explicit_form(loss_fn):
    model, (batch, _) = _setup()
    explicit = ({"x": batch["x"]}, batch["labels"])
    a = hessian_trace(model, loss_fn, batch, method="exact")
    b = hessian_trace(model, _ce, explicit, method="exact")
    assert a.value == pytest.approx(b.value, rel=1e-12)
    g = torch.Generator
    ea = top_eigenvalues(model, loss_fn, batch, tol=1e-8, generator=g().manual_seed(0))
    eb = top_eigenvalues(model, _ce, explicit, tol=1e-8, generator=g().manual_seed(0))
    torch.testing.assert_close(ea.eigenvalues, eb.eigenvalues, rtol=1e-7, atol=0)


def test_uneven_dict_batches_are_weighted_by_their_samples():
    model, batches = _setup((5, 3))
    obj = ModelObjective(model, None, batches)
    per_batch = [float(model(**b)["loss"].detach()) for b in batches]
    expected = (5 * per_batch[0] + 3 * per_batch[1]) / 8
    assert float(obj.loss()) == pytest.approx(expected, rel=1e-12)
    assert obj.num_samples == 8


def test_a_model_without_a_loss_gets_a_clear_error():
    model, (batch, _) = _setup()
    with pytest.raises(ValueError, match=r"returned none .* put the labels in the batch"):
        ModelObjective(model, None, {"x": batch["x"]})


def test_a_missing_loss_fn_and_data_still_names_both():
    model, _ = _setup()
    with pytest.raises(TypeError, match="needs loss_fn and data"):
        hessian_trace(model)


def test_the_ggn_refuses_the_models_own_loss_instead_of_a_silent_zero():
    model, (batch, _) = _setup()
    with pytest.raises(ValueError, match="the GGN needs the loss as a function of the model's"):
        ggn_trace(model, None, batch)
    explicit = ({"x": batch["x"]}, batch["labels"])
    assert ggn_trace(model, _ce, explicit, method="exact").value > 0


def test_model_loss_serves_the_landscape_and_the_tracker():
    model, (batch, _) = _setup()
    explicit = ({"x": batch["x"]}, batch["labels"])
    g = torch.Generator
    a = loss_landscape_1d(model, model_loss, batch, num_points=3, generator=g().manual_seed(0))
    b = loss_landscape_1d(model, _ce, explicit, num_points=3, generator=g().manual_seed(0))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    tracker = SharpnessTracker(model, model_loss, batch, every=1, measures=("trace",))
    exact = hessian_trace(model, _ce, explicit, method="exact").value
    assert tracker.measure(0)["trace"] == pytest.approx(exact, rel=1e-10)
