"""Lightning: the monitor logs what the measures give by hand, changes nothing the trainer
sees; SAM / GSAM in automatic and manual optimization make the bare loop's updates."""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import subprocess
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sharpgen import GSAM, SAM, disable_running_stats, hessian_trace, sam_sharpness
from sharpgen.curvature import ModelObjective
from sharpgen.integrations import SharpnessMonitor, lightning_sam_step

mse = nn.functional.mse_loss


class MemoryLogger(Logger):
    """Keeps every log_metrics call."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("sharpness/") for k in metrics):
            self.rows.append((step, dict(metrics)))


class Regressor(pl.LightningModule):
    def __init__(self, net, make_optimizer, seen=None):
        super().__init__()
        self.net = net
        self.make_optimizer = make_optimizer
        self.seen = seen

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.seen is not None:
            self.seen.append(x.sum().item())
        return mse(self(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.net)


def fit(module, loader, callbacks=(), max_steps=5, logger=None, **kwargs):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=logger if logger is not None else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def sgd(net):
    return torch.optim.SGD(net.parameters(), lr=0.1)


def test_logged_metrics_equal_the_measures_by_hand_at_the_same_steps(ih, regression):
    x, y = regression
    held = (x[:8], y[:8])
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    monitor = SharpnessMonitor(
        mse, held, every_n_steps=2, measures=("loss", "trace", "sam"), module="net"
    )
    logger = MemoryLogger()
    fit(Regressor(ih.mlp(0), sgd), loader, [monitor], max_steps=5, logger=logger)

    net = ih.mlp(0)  # the same run in a bare loop, measured by hand
    opt = sgd(net)
    expected = {}
    for step, (xb, yb) in enumerate(list(loader) + list(loader)):
        if step % 2 == 0:
            trace = hessian_trace(net, mse, held)
            expected[step] = {
                "sharpness/loss": float(ModelObjective(net, mse, held).loss()),
                "sharpness/trace": trace.value,
                "sharpness/sam": sam_sharpness(net, mse, held, 0.05).value,
                "sharpness/matvecs": float(trace.num_matvecs),
            }
        if step == 5:
            break
        opt.zero_grad()
        mse(net(xb), yb).backward()
        opt.step()
    assert [step for step, _ in logger.rows] == [0, 2, 4]
    for step, metrics in logger.rows:
        for key, value in expected[step].items():
            assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-14), (step, key)
    assert monitor.tracker.to_dataframe().index.tolist() == [0, 2, 4]


def test_the_trainer_sees_the_same_run_with_and_without_the_monitor(ih, regression):
    """Dropout (global RNG), a shuffled loader with its own generator given as the data,
    a measure that draws from the global RNG: the run is bit for bit the same."""
    x, y = regression

    def run(with_monitor):
        loader = DataLoader(
            TensorDataset(x, y),
            batch_size=8,
            shuffle=True,
            generator=torch.Generator().manual_seed(3),
        )
        seen = []
        module = Regressor(ih.mlp(1, dropout=0.5), sgd, seen)
        callbacks = []
        if with_monitor:
            callbacks = [
                SharpnessMonitor(
                    mse,
                    loader,  # the training loader itself
                    every_n_steps=1,
                    measures=("loss", "average"),
                    options={"average": {"num_samples": 2}},  # global RNG: no generator
                    module=lambda m: m.net,
                )
            ]
        torch.manual_seed(0)
        fit(module, loader, callbacks, max_steps=6)
        return seen, ih.snapshot(module), torch.get_rng_state()

    seen_a, state_a, rng_a = run(True)
    seen_b, state_b, rng_b = run(False)
    assert seen_a == seen_b
    ih.assert_same_snapshot(state_a, state_b)
    assert torch.equal(rng_a, rng_b)


def test_a_measurement_leaves_model_rng_and_loader_as_they_were(ih, regression):
    x, y = regression
    loader = DataLoader(
        TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    module = Regressor(ih.mlp(2, dropout=0.3, batchnorm=True), sgd)
    module.net[0].weight.requires_grad_(False)
    mse(module(x), y).backward()
    module.net[2].eval()
    monitor = SharpnessMonitor(
        mse, loader, every_n_steps=1, measures=("loss", "trace", "sam"), bn="batch"
    )
    before = ih.snapshot(module)
    states = (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state()[1].copy(),  # noqa: NPY002
        loader.generator.get_state(),
    )
    stub = types.SimpleNamespace(global_step=0, current_epoch=0, loggers=[])
    monitor.on_train_start(stub, module)
    assert len(monitor.tracker.history) == 1
    ih.assert_same_snapshot(before, ih.snapshot(module))
    assert torch.equal(states[0], torch.get_rng_state())
    assert states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])  # noqa: NPY002
    assert torch.equal(states[3], loader.generator.get_state())


def test_epoch_schedule_and_checkpoint_state(ih, regression):
    x, y = regression
    loader = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)  # 2 steps per epoch
    monitor = SharpnessMonitor(mse, (x, y), every_n_epochs=2, measures=("loss",))
    logger = MemoryLogger()
    fit(Regressor(ih.mlp(0), sgd), loader, [monitor], max_steps=-1, max_epochs=4, logger=logger)
    assert [(s, m["epoch"]) for s, m in logger.rows] == [(4, 1.0), (8, 3.0)]
    state = monitor.state_dict()
    resumed = SharpnessMonitor(mse, (x, y), every_n_epochs=2, measures=("loss",))
    resumed.load_state_dict(state)
    stub = types.SimpleNamespace(global_step=10, current_epoch=5, loggers=[])
    resumed.on_train_epoch_end(stub, Regressor(ih.mlp(0), sgd))
    assert [r["step"] for r in resumed.tracker.history] == [4, 8, 10]


def test_monitor_rejects_bad_arguments(ih, regression):
    x, y = regression
    with pytest.raises(ValueError, match="exactly one of every_n_steps and every_n_epochs"):
        SharpnessMonitor(mse, (x, y))
    with pytest.raises(ValueError, match="exactly one"):
        SharpnessMonitor(mse, (x, y), every_n_steps=1, every_n_epochs=1)
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1, got 0"):
        SharpnessMonitor(mse, (x, y), every_n_steps=0)
    with pytest.raises(TypeError, match="every_n_epochs must be an int"):
        SharpnessMonitor(mse, (x, y), every_n_epochs=1.5)
    with pytest.raises(ValueError, match="unknown measure 'curvature'"):
        SharpnessMonitor(mse, (x, y), every_n_steps=1, measures=("curvature",))
    with pytest.raises(TypeError, match="module must be an attribute name"):
        SharpnessMonitor(mse, (x, y), every_n_steps=1, module=3)
    persistent = DataLoader(TensorDataset(x, y), num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match="persistent_workers=True"):
        SharpnessMonitor(mse, persistent, every_n_steps=1)


# -- SAM / GSAM ---------------------------------------------------------------------------------
SAM_KINDS = {
    "sam": lambda net: SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=net),
    "gsam": lambda net: GSAM(
        net.parameters(), torch.optim.SGD, rho_max=0.1, rho_min=0.01, alpha=0.2, lr=0.1,
        lr_min=0.0, model=net,
    ),
}  # fmt: skip


def bare_sam_run(net, make_optimizer, batches, autocast=False):
    opt = make_optimizer(net)
    for xb, yb in batches:

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = mse(net(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    return net


@pytest.mark.parametrize("kind", sorted(SAM_KINDS))
def test_automatic_optimization_with_sam_equals_the_bare_loop(ih, regression, kind):
    x, y = regression
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module = Regressor(ih.mlp(0, batchnorm=True), SAM_KINDS[kind])
    fit(module, loader, max_steps=3)
    bare = bare_sam_run(ih.mlp(0, batchnorm=True), SAM_KINDS[kind], list(loader)[:3])
    ih.assert_same_snapshot(ih.snapshot(module.net), ih.snapshot(bare))


class ManualSAM(Regressor):
    def __init__(self, net, make_optimizer, chunks=1):
        super().__init__(net, make_optimizer)
        self.automatic_optimization = False
        self.chunks = chunks

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()

        def closure():  # one global perturbation over `chunks` accumulated micro-batches
            opt.zero_grad()
            total = 0.0
            for xb, yb in zip(x.chunk(self.chunks), y.chunk(self.chunks), strict=True):
                loss = mse(self(xb), yb) / self.chunks
                self.manual_backward(loss)
                total += loss.detach()
            return total

        return lightning_sam_step(self, closure)


@pytest.mark.parametrize("kind", sorted(SAM_KINDS))
@pytest.mark.parametrize("chunks", [1, 2])
def test_manual_sam_step_equals_the_bare_loop(ih, regression, kind, chunks):
    x, y = regression
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    bn = chunks == 1  # BatchNorm statistics depend on the micro-batch, the update does not
    module = ManualSAM(ih.mlp(0, batchnorm=bn), SAM_KINDS[kind], chunks=chunks)
    trainer = fit(module, loader, max_steps=3)
    assert trainer.global_step == 3  # each SAM step counts once
    bare = ih.mlp(0, batchnorm=bn)
    bare_sam_run(bare, SAM_KINDS[kind], list(loader)[:3])
    tol = {"rtol": 0, "atol": 0} if chunks == 1 else {"rtol": 1e-12, "atol": 1e-14}
    a, b = ih.snapshot(module.net), ih.snapshot(bare)
    for key in a["state"]:
        torch.testing.assert_close(a["state"][key], b["state"][key], **tol)


def float_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def test_bf16_autocast_manual_and_automatic_equal_the_bare_loop(ih, regression):
    x, y = (t.float() for t in regression)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    bare = bare_sam_run(float_mlp(), SAM_KINDS["sam"], list(loader)[:3], autocast=True)
    for module in (
        Regressor(float_mlp(), SAM_KINDS["sam"]),
        ManualSAM(float_mlp(), SAM_KINDS["sam"]),
    ):
        fit(module, loader, max_steps=3, precision="bf16-mixed")
        ih.assert_same_snapshot(ih.snapshot(module.net), ih.snapshot(bare))


def test_manual_sam_step_with_a_gradient_scaler_follows_the_amp_recipe(ih, regression):
    """fp16 autocast + GradScaler (the GPU recipe, run on the CPU): the guide's bare loop."""
    x, y = (t.float() for t in regression)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module = ManualSAM(float_mlp(), SAM_KINDS["sam"])
    scaler_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    fit(module, loader, max_steps=3, plugins=[scaler_plugin])

    net = float_mlp()
    opt = SAM_KINDS["sam"](net)
    scaler = torch.amp.GradScaler("cpu")
    for xb, yb in list(loader)[:3]:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mse(net(xb), yb)
        scaler.scale(loss).backward()
        if opt.first_step(zero_grad=True, grad_scale=scaler.get_scale()):
            with torch.autocast("cpu", dtype=torch.float16), disable_running_stats(net):
                loss2 = mse(net(xb), yb)
            scaler.scale(loss2).backward()
            opt.restore()
        scaler.step(opt)
        scaler.update()
    ih.assert_same_snapshot(ih.snapshot(module.net), ih.snapshot(net))


def test_lightning_sam_step_errors(ih, regression):
    x, y = regression
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        lightning_sam_step(Regressor(ih.mlp(0), sgd), lambda: None)
    with pytest.raises(TypeError, match="needs a SAM-family optimizer"):
        fit(ManualSAM(ih.mlp(0), sgd), loader, max_steps=1)


# -- DDP ------------------------------------------------------------------------------------------
def test_under_ddp_every_rank_measures_the_full_data_value(tmp_path):
    """Two gloo processes, each with half of the held batch: both ranks record the measures
    of the whole batch (the measures all-reduce), at step 0 and after 2 DDP steps."""
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("_ddp_worker", here / "_ddp_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "NODE_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")]),
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(here / "_ddp_worker.py"), str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["history"] == results[1]["history"]
    held = worker.build_data()
    initial, final = worker.build_model(), worker.build_model()
    final.load_state_dict(results[0]["final"])
    for record, net in zip(results[0]["history"], (initial, final), strict=True):
        assert record["trace"] == pytest.approx(hessian_trace(net, mse, held).value, rel=1e-10)
        expected_loss = float(ModelObjective(net, mse, held).loss())
        assert record["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert [r["step"] for r in results[0]["history"]] == [0, 2]


def test_step_schedule_counts_optimizer_steps_and_resumes_without_duplicates(ih, regression):
    """With gradient accumulation global_step repeats over batches: one record per step."""
    x, y = regression
    module = Regressor(ih.mlp(0), sgd)
    monitor = SharpnessMonitor(mse, (x, y), every_n_steps=2, measures=("loss",))
    stub = types.SimpleNamespace(global_step=0, current_epoch=0, loggers=[])
    monitor.on_train_start(stub, module)
    for step in (0, 1, 1, 2, 2, 3, 3, 4, 4):  # accumulate_grad_batches=2
        stub.global_step = step
        monitor.on_train_batch_end(stub, module, None, None, 0)
    assert [r["step"] for r in monitor.tracker.history] == [0, 2, 4]
    resumed = SharpnessMonitor(mse, (x, y), every_n_steps=2, measures=("loss",))
    resumed.load_state_dict(monitor.state_dict())
    resumed.on_train_start(stub, module)  # resumed at step 4, already recorded
    stub.global_step = 6
    resumed.on_train_batch_end(stub, module, None, None, 0)
    assert [r["step"] for r in resumed.tracker.history] == [0, 2, 4, 6]
