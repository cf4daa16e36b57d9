"""``loss_fn=None`` is the model's own loss (`sharpgen.model_loss`) everywhere a measure takes
a loss: the tracker, the landscapes, SAM and the callbacks, on a tiny Hugging Face BERT with
its dict batch as it comes (issue 23). Each value equals the one computed with the explicit
``lambda outputs, targets: outputs.loss``, and the loss itself is the model's
``outputs.loss``; the Gauss-Newton measures, which need a loss of the outputs, are refused
when the tracker or a callback is built."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _zoo_hf import bert, own_loss
from torch.utils.data import DataLoader

import sharpgen
from sharpgen.integrations import SharpnessMonitor, SharpnessTrainerCallback

SEL = ["bert.embeddings.LayerNorm.weight", "classifier.bias"]


@pytest.fixture(scope="module")
def hf():
    model, _, (batch, _) = bert()
    return model.eval(), batch


def _loss(model, batch) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def _direction(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    return {n: torch.randn(named[n].shape, generator=g, dtype=named[n].dtype) for n in SEL}


def _tracker(model, loss_fn, batch, **kw):
    return sharpgen.SharpnessTracker(
        model, loss_fn, batch, every=1, params=SEL,
        generator=torch.Generator().manual_seed(0), **kw,
    )  # fmt: skip


def test_the_tracker_with_no_loss_fn_measures_the_models_own_loss(hf):
    model, batch = hf
    measures = ("loss", "trace", "top_eigenvalue", "sam")
    record = _tracker(model, None, batch, measures=measures).measure(0)
    explicit = _tracker(model, own_loss, (batch, None), measures=measures).measure(0)
    assert record == explicit
    assert record["loss"] == pytest.approx(_loss(model, batch), rel=1e-12)
    trace = sharpgen.hessian_trace(model, own_loss, (batch, None), params=SEL, method="exact")
    assert record["trace"] == pytest.approx(trace.value, rel=1e-12)


@pytest.mark.parametrize(
    ("measures", "options"),
    [(("ggn_trace",), None), (("loss", "fisher_rao"), None),
     (("fisher_rao",), {"fisher_rao": {"fisher": "ggn"}})],
    ids=["ggn_trace", "fisher_rao", "fisher_rao_ggn"],
)  # fmt: skip
def test_a_gauss_newton_measure_on_the_models_own_loss_is_refused_when_built(hf, measures, options):
    model, batch = hf
    for loss_fn in (None, sharpgen.model_loss):
        with pytest.raises(ValueError, match=r"Gauss-Newton.*loss_fn=\(outputs, targets\)"):
            _tracker(model, loss_fn, batch, measures=measures, options=options)
    ready = sharpgen.ModelObjective(model, None, batch, params=SEL)
    with pytest.raises(ValueError, match="Gauss-Newton"):
        sharpgen.SharpnessTracker(ready, measures=measures, options=options)
    with pytest.raises(ValueError, match="Gauss-Newton"):
        SharpnessTrainerCallback(batch, every_n_steps=1, measures=measures, options=options)
    with pytest.raises(ValueError, match="Gauss-Newton"):
        SharpnessMonitor(None, batch, every_n_steps=1, measures=measures, options=options)


def test_the_empirical_fisher_rao_norm_runs_on_the_models_own_loss(hf):
    model, batch = hf
    options = {"fisher_rao": {"fisher": "empirical", "backend": "autograd"}}
    record = _tracker(model, None, batch, measures=("fisher_rao",), options=options).measure(0)
    direct = sharpgen.fisher_rao_norm(model, own_loss, (batch, None), params=SEL,
                                      fisher="empirical", backend="autograd")  # fmt: skip
    assert record["fisher_rao"] == pytest.approx(direct.value, rel=1e-12)


def test_a_non_callable_loss_fn_is_still_a_type_error(hf):
    model, batch = hf
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        _tracker(model, "cross_entropy", batch, measures=("loss",))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        SharpnessMonitor("cross_entropy", batch, every_n_steps=1)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        sharpgen.linear_interpolation(model, model, 3, batch)


def _landscape_1d(model, loss_fn, data):
    return sharpgen.loss_landscape_1d(
        model, loss_fn, data, direction=_direction(model), num_points=3, params=SEL
    ).loss


def _landscape_2d(model, loss_fn, data):
    dirs = (_direction(model, 0), _direction(model, 1))
    return sharpgen.loss_landscape_2d(
        model, loss_fn, data, directions=dirs, num_points=3, params=SEL
    ).loss


def _hessian_directions(model, loss_fn, data):
    g = torch.Generator().manual_seed(0)
    dirs, values = sharpgen.hessian_directions(model, loss_fn, data, params=SEL, generator=g)
    return torch.cat([values, *(t.reshape(-1) for d in dirs for t in d.values())])


def _sam(model, loss_fn, data):
    return torch.tensor(sharpgen.sam_sharpness(model, loss_fn, data, rho=0.05, params=SEL).value)


def _average(model, loss_fn, data):
    g = torch.Generator().manual_seed(0)
    res = sharpgen.average_sharpness(model, loss_fn, data, rho=0.01, params=SEL, generator=g)
    return torch.tensor(res.value)


@pytest.mark.parametrize(
    "measure", [_landscape_1d, _landscape_2d, _hessian_directions, _sam, _average],
    ids=["landscape_1d", "landscape_2d", "hessian_directions", "sam", "average"],
)  # fmt: skip
def test_landscapes_and_sam_with_no_loss_fn_equal_the_explicit_own_loss(hf, measure):
    model, batch = hf
    assert torch.equal(measure(model, None, batch), measure(model, own_loss, (batch, None)))


def test_linear_interpolation_with_no_loss_fn_runs_between_the_models_own_losses(hf):
    model_a, batch = hf
    model_b = bert()[0].eval()
    with torch.no_grad():
        for p in model_b.parameters():
            p.mul_(0.5)
    path = sharpgen.linear_interpolation(model_a, model_b, None, batch, num_points=3)
    explicit = sharpgen.linear_interpolation(model_a, model_b, own_loss, (batch, None),
                                             num_points=3)  # fmt: skip
    assert torch.equal(path.loss, explicit.loss)
    assert float(path.loss[0]) == pytest.approx(_loss(model_a, batch), rel=1e-12)
    assert float(path.loss[-1]) == pytest.approx(_loss(model_b, batch), rel=1e-12)


class _BertModule(pl.LightningModule):
    """A LightningModule around a Hugging Face model trained on its own loss."""

    def __init__(self):
        super().__init__()
        self.net = bert()[0].float()

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_lightning_monitor_with_no_loss_fn_logs_the_models_own_loss(hf):
    _, batch = hf
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["labels"]))]
    loader = DataLoader(rows, batch_size=2)
    torch.manual_seed(0)
    module = _BertModule()
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    monitor = SharpnessMonitor(None, batch, every_n_steps=2, measures=("loss", "sam"),
                               module="net")  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=2, callbacks=[monitor], logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    history = monitor.tracker.history
    assert [r["step"] for r in history] == [0, 2]
    initial = bert()[0].float().eval()
    initial.load_state_dict(start)
    assert history[0]["loss"] == pytest.approx(_loss(initial, batch), rel=1e-6)
    assert history[-1]["loss"] == pytest.approx(_loss(module.net.eval(), batch), rel=1e-6)
    assert all(r["sam"] >= 0 for r in history)
