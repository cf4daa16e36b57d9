"""run_study's training part: stack checkpoints, resume after a kill, the records it builds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sharpgen.experiments._checkpoint import CheckpointError
from sharpgen.study._record import evaluate
from sharpgen.study._runner import run_study
from sharpgen.study._spec import StopRule, StudySpec

ROOT = Path(__file__).resolve().parents[2]

SLOW = dict(  # three stacks that run to their step cap (loss 0 is never reached)
    name="slow", data="xor", d=6, seeds=(0, 1), test_size=64,
    axes={"width": (8, 16, 24), "lr": (0.05, 0.1), "train_size": (32,), "batch_size": (8,)},
    stop=StopRule("loss", 0.0, max_steps=1500),
)  # fmt: skip

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from sharpgen.study._runner import run_study
from sharpgen.study._spec import StopRule, StudySpec
spec = StudySpec(**{kw})
run_study(spec, sys.argv[1], progress=False, measure=False)
"""


def _states(out: Path) -> dict[str, dict]:
    return {p.stem: torch.load(p, weights_only=True) for p in (out / "checkpoints").glob("*.pt")}


def test_killed_run_resumes_at_the_first_unfinished_stack_and_equals_an_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    spec = StudySpec(**SLOW)
    full = run_study(spec, tmp_path / "full", progress=False, measure=False)
    assert len(full.trained) == 3 and full.models == () and len(full.excluded) == 12
    assert "did not reach training loss <= 0 within 1500 steps" in full.excluded[0]["reason"]

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = SCRIPT.format(kw=repr(SLOW))  # the StopRule's repr is its constructor call
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env)
    deadline = time.monotonic() + 240
    while not list((out / "checkpoints").glob("*.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the study ended before its first checkpoint was seen"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = set(_states(out))
    assert 1 <= len(done) < 3, done  # killed between stacks
    resumed = run_study(spec, out, progress=False, measure=False)
    assert set(resumed.trained) == {"w8-d1-bias-b8-n32-sgd", "w16-d1-bias-b8-n32-sgd",
                                    "w24-d1-bias-b8-n32-sgd"} - done  # fmt: skip
    a, b = _states(tmp_path / "full"), _states(out)
    assert set(a) == set(b)
    for key in a:
        for name in ("params", "init"):
            for k in a[key][name]:
                assert torch.equal(a[key][name][k], b[key][name][k]), (key, name, k)
        assert torch.equal(a[key]["stop_step"], b[key]["stop_step"])
    again = run_study(spec, out, progress=False, measure=False)
    assert again.trained == ()  # everything from checkpoints


def test_records_carry_their_training_set_metrics_and_init(tmp_path):
    torch.set_num_threads(1)
    spec = StudySpec(
        "rec", "xor", model="two_layer", d=5, seeds=(0, 1), test_size=200, dtype="float64",
        axes={"bias": (False, True), "lr": (0.05, 0.1), "label_noise": (0.0, 0.25),
              "train_size": (24,), "batch_size": (4,), "width": (32,)},
        stop=StopRule("loss", 0.02, max_steps=4000),
    )  # fmt: skip
    res = run_study(spec, tmp_path, progress=False, measure=False)
    assert len(res.models) + len(res.excluded) == 16
    assert len(res.models) >= 8
    for rec in res.models:
        assert set(rec.hparams) == {"bias", "lr", "label_noise", "seed"}
        assert type(rec.model).__name__ == "TwoLayerNet"
        X, y = rec.train_data
        assert X.shape == (24, 5)
        loss, err = evaluate(rec.model, rec.loss_fn, rec.train_data)
        assert loss <= 0.02 and rec.metrics["train_loss"] == pytest.approx(loss, rel=1e-10)
        assert rec.metrics["train_error"] == pytest.approx(err)
        test_loss, test_err = evaluate(rec.model, rec.loss_fn, rec.test_data)
        assert rec.metrics["test_error"] == pytest.approx(test_err)
        assert rec.metrics["test_loss"] == pytest.approx(test_loss, rel=1e-10)
        if rec.hparams["label_noise"] > 0:  # 6 of 24 labels flipped, and memorized
            assert int((torch.sign(rec.model(X)) != y).sum()) == 0
    # same seed and architecture: same initialization, whatever the other hyperparameters
    by = {(r.hparams["bias"], r.name): r for r in res.models}
    inits = [r.init_params["W1"] for (bias, _), r in by.items() if not bias]
    assert any(torch.equal(inits[0], w) for w in inits[1:])
    rows = (tmp_path / "training.csv").read_text().splitlines()
    assert len(rows) == 17 and rows[0].startswith("name,stack,seed,")


def test_a_checkpoint_of_another_study_is_refused_before_training(tmp_path):
    spec = StudySpec(**{**SLOW, "stop": StopRule("loss", 0.0, max_steps=3)})
    run_study(spec, tmp_path, progress=False, measure=False)
    other = StudySpec(**{**SLOW, "stop": StopRule("loss", 0.0, max_steps=4)})
    with pytest.raises(CheckpointError, match="belongs to another study \\(differs in stop\\)"):
        run_study(other, tmp_path, progress=False, measure=False)
    with pytest.raises(CheckpointError, match="differs in seed or models"):
        run_study(spec, tmp_path, progress=False, measure=False, seed=1)
    assert run_study(other, tmp_path, progress=False, measure=False, resume=False).trained


def test_measures_and_analysis_cover_the_converged_models_only(tmp_path):
    torch.set_num_threads(1)
    spec = StudySpec(
        "meas", "xor", d=4, seeds=(0, 1), test_size=100, dtype="float64",
        axes={"lr": (1e-4, 0.05, 0.1), "width": (16,), "train_size": (16,), "batch_size": (4,)},
        stop=StopRule("error", 0.0, max_steps=400),
    )  # fmt: skip
    res = run_study(spec, tmp_path, progress=False, measures=["param_norm", "num_params"])
    # lr 1e-4 cannot fit the data in 400 steps
    assert [e["name"] for e in res.excluded] == ["m000", "m001"]
    assert [m.name for m in res.models] == ["m002", "m003", "m004", "m005"]
    assert res.table.measures == ("param_norm", "num_params") and len(res.table) == 4
    net = res.models[0].model
    norm = sum(float(p.detach().square().sum()) for n, p in net.named_parameters() if "weight" in n)
    assert res.table.column("param_norm")[0] == pytest.approx(norm, rel=1e-10)
    assert [s.name for s in res.analysis.stats] == ["param_norm", "num_params"]
    assert (tmp_path / "table.csv").read_text().count("\n") == 5
    assert (tmp_path / "analysis.csv").exists()
    report = (tmp_path / "report.md").read_text()
    assert "param_norm" in report and "## Training" in report
    assert "2 models are left out of the analysis" in report
    assert "`m000` {'lr': 0.0001, 'seed': 0}: did not reach training error <= 0" in report


@pytest.mark.parametrize("terminal", [False, True])
def test_training_progress_is_plain_lines_without_a_terminal(tmp_path, monkeypatch, terminal):
    """Without a terminal (a log file, CI) training prints one plain line per finished stack and
    no bar (no carriage returns); on a terminal it shows the tqdm bar and no such lines."""
    import io

    class Stream(io.StringIO):
        def isatty(self):
            return terminal

    err = Stream()
    monkeypatch.setattr(sys, "stderr", err)
    spec = StudySpec(**{**SLOW, "stop": StopRule("loss", 0.0, max_steps=3)})
    run_study(spec, tmp_path, progress=True, measure=False)
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.startswith("training: stack")]
    if terminal:
        assert "\r" in text and not lines
    else:
        assert "\r" not in text and "\x1b" not in text
        assert len(lines) == 3 and lines[-1].startswith("training: stack 3/3")
