"""Checkpoint/resume: a run killed with SIGKILL and restarted ends bitwise identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sharpgen.experiments import (
    ExperimentSpec,
    Phase,
    load_checkpoint,
    save_checkpoint,
    train,
)

SPEC = ExperimentSpec(
    "ckpt",
    "bias",
    "sam1",
    (Phase(40, 0.05, 0.05), Phase(40, 0.02, 0.1)),
    d=6,
    n=24,
    width=32,
    test_size=64,
    eval_every=5,
    dtype="float64",
)

_CHILD = """
import sys, torch
torch.set_num_threads(1)
from sharpgen.experiments import ExperimentSpec, train
spec = ExperimentSpec.from_dict(__import__("json").loads(sys.argv[1]))
print("started", flush=True)
train(spec, [0, 1], checkpoint=sys.argv[2], resume=True, checkpoint_every_s=0.0)
print("finished", flush=True)
"""


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _same(a, b):
    assert a.epochs == b.epochs
    # bitwise: repr of a float round-trips exactly (and NaN == NaN here)
    assert json.dumps(a.metrics) == json.dumps(b.metrics)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    reference = train(SPEC, [0, 1])
    ckpt = tmp_path / "run.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(SPEC.to_dict()), str(ckpt)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for some, but not all, epochs to be saved
        if ckpt.exists():
            try:
                epoch = load_checkpoint(ckpt)["epoch"]
            except Exception:  # the file is replaced atomically, so this should not happen
                raise
            if epoch >= 10:
                break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt)["epoch"]
    assert 10 <= killed_at < SPEC.epochs, "the child finished before it could be killed"
    resumed = train(SPEC, [0, 1], checkpoint=ckpt, resume=True)
    _same(resumed, reference)


def test_stop_and_resume_in_process_is_bitwise_identical(tmp_path):
    reference = train(SPEC, [0, 1])
    ckpt = tmp_path / "run.pt"
    first = train(SPEC, [0, 1], checkpoint=ckpt, stop_after_epochs=37)
    assert first.epochs[-1] == 35 and load_checkpoint(ckpt)["epoch"] == 37
    resumed = train(SPEC, [0, 1], checkpoint=ckpt, resume=True)
    _same(resumed, reference)


def test_resume_refuses_a_checkpoint_of_another_experiment(tmp_path):
    ckpt = tmp_path / "run.pt"
    train(SPEC, [0, 1], checkpoint=ckpt, stop_after_epochs=2)
    with pytest.raises(ValueError, match="different experiment"):
        train(SPEC.replace(name="other"), [0, 1], checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match="different experiment or seeds"):
        train(SPEC, [0, 2], checkpoint=ckpt, resume=True)
    # the message names the settings that differ
    changed = SPEC.replace(phases=(Phase(40, 0.05, 0.2), Phase(40, 0.02, 0.1)), width=16)
    with pytest.raises(ValueError, match="settings that differ: phases, width"):
        train(changed, [0, 1], checkpoint=ckpt, resume=True)


def test_resume_ignores_a_changed_note(tmp_path):
    """``notes`` is commentary (a preset's text may be reworded), not part of the experiment."""
    ckpt = tmp_path / "run.pt"
    train(SPEC, [0, 1], checkpoint=ckpt, stop_after_epochs=3)
    resumed = train(
        SPEC.replace(notes="reworded"), [0, 1], checkpoint=ckpt, resume=True, stop_after_epochs=5
    )
    assert resumed.epochs[-1] == 5 and resumed.steps == 5 * SPEC.steps_per_epoch


def test_atomic_save_leaves_no_temp_files_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    save_checkpoint({"x": torch.arange(3)}, path)
    save_checkpoint({"x": torch.arange(4)}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"x": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]


def test_paths_are_accepted_as_str(tmp_path):
    path = str(Path(tmp_path) / "s.pt")
    save_checkpoint({"a": 1}, path)
    assert load_checkpoint(path) == {"a": 1}
