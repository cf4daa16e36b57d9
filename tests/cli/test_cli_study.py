"""`sharpgen study`: --list, one-line usage errors, a train-only run, torchrun spreading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharpgen.cli import main
from sharpgen.study._runner import run_study
from sharpgen.study._spec import StopRule, StudySpec

ROOT = Path(__file__).resolve().parents[2]


def test_list_names_every_preset_with_its_size(capsys):
    assert main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    for line in ("quick            48 models in 4 stacks", "digits-large     288 models",
                 "paper-two-layer  72 models"):  # fmt: skip
        assert line in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'; the presets are quick, digits-large"),
        (["--seed", "-1"], "--seed -1 must be >= 0"),
        (["--out", "FILE"], "is an existing file, not a directory"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    try:
        status = main(["study", *args])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not (tmp_path / "results").exists()


def test_a_checkpoint_of_another_study_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from sharpgen.study import _presets

    tiny = StudySpec("quick", "xor", d=4, seeds=(0,), test_size=16,
                     axes={"train_size": (8,), "batch_size": (4,), "width": (4,)},
                     stop=StopRule("loss", 0.0, max_steps=2))  # fmt: skip
    monkeypatch.setitem(_presets.STUDY_PRESETS, "quick", tiny)
    out = tmp_path / "o"
    assert main(["study", "--out", str(out), "--train-only", "--no-progress"]) == 0
    assert "1 models, 0 analysed, 1 left out" in capsys.readouterr().out
    other = StudySpec(**{**tiny.__dict__, "stop": StopRule("loss", 0.0, max_steps=3)})
    monkeypatch.setitem(_presets.STUDY_PRESETS, "quick", other)
    args = ["study", "--out", str(out), "--train-only", "--no-progress", "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "belongs to another study (differs in stop)" in err and len(err.splitlines()) == 1


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from sharpgen.study._runner import run_study
from sharpgen.study._spec import StopRule, StudySpec
res = run_study(StudySpec(**{kw}), sys.argv[1], progress=False, measure=False)
print("RESULT", None if res is None else sorted(res.trained))
"""

SPEC = dict(
    name="spread", data="xor", d=5, seeds=(0, 1), test_size=50,
    axes={"width": (4, 8, 12), "optimizer": ("sgd", "sam"), "rho": (0.05,),
          "train_size": (16,), "batch_size": (4,)},
    stop=StopRule("loss", 0.01, max_steps=200),
)  # fmt: skip


def test_torchrun_spreads_the_stacks_and_equals_one_process_bitwise(tmp_path):
    torch.set_num_threads(1)
    single = run_study(StudySpec(**SPEC), tmp_path / "single", progress=False, measure=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(kw=repr(SPEC)))
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path / "spread")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert sorted(results) == ["RESULT None", f"RESULT {sorted(single.trained)}"]
    a = sorted((tmp_path / "single" / "checkpoints").glob("*.pt"))
    b = sorted((tmp_path / "spread" / "checkpoints").glob("*.pt"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 6
    for x, y in zip(a, b, strict=True):
        sx, sy = torch.load(x, weights_only=True), torch.load(y, weights_only=True)
        for k in sx["params"]:
            assert torch.equal(sx["params"][k], sy["params"][k])
        assert torch.equal(sx["stop_step"], sy["stop_step"])
    assert (tmp_path / "spread" / "training.csv").read_text() == (
        tmp_path / "single" / "training.csv"
    ).read_text()
