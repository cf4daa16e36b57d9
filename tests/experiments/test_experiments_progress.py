"""Progress of `run_experiments`: bars on a terminal, one plain line per phase and run otherwise."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

from sharpgen.experiments import ExperimentSpec, Phase, get_preset, run_experiments
from sharpgen.experiments._progress import Progress, resolve_mode
from sharpgen.experiments._trainer import RunResult

ROOT = Path(__file__).resolve().parents[2]
CURSOR = re.compile(r"\r|\x1b\[")  # carriage returns and ANSI cursor / colour codes
TWO_PHASES = ExperimentSpec(
    "tiny-two-phases", "no_bias", "sam1", (Phase(3, 0.05, 0.05), Phase(2, 0.02, 0.05)),
    d=6, n=24, width=16, batch_size=1, test_size=50, eval_every=5,
)  # fmt: skip
THREE_PHASES_SGD = ExperimentSpec(
    "tiny-three-phases", "bias", "sgd", (Phase(2, 0.05), Phase(1, 0.02), Phase(2, 0.01)),
    d=6, n=24, width=16, batch_size=24, test_size=50, eval_every=5,
)  # fmt: skip


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _strip_times(text: str) -> list[str]:
    return [re.sub(r" \[\d+\.\d s\]$", "", line) for line in text.splitlines()]


def test_resolve_mode():
    assert resolve_mode(True, io.StringIO()) == "lines"
    assert resolve_mode(True, _Terminal()) == "bars"
    assert resolve_mode(False, _Terminal()) == "off"
    assert resolve_mode("lines", _Terminal()) == "lines"
    with pytest.raises(ValueError, match="progress='loud' must be True, False, 'bars'"):
        resolve_mode("loud", io.StringIO())


def test_lines_one_per_phase_and_per_run_whatever_the_chunks():
    stream = io.StringIO()
    shown = Progress([TWO_PHASES, THREE_PHASES_SGD], "lines", stream)
    for k in (1, 1, 2):  # crosses the first phase's end inside a chunk
        shown.update(TWO_PHASES.name, k)
    shown.update(THREE_PHASES_SGD.name, 3)  # two phase ends at once
    shown.update(THREE_PHASES_SGD.name, 2)
    shown.update(TWO_PHASES.name, 1)
    shown.finished(RunResult(TWO_PHASES, (0, 1), (5,), {}, (), 1.0, 10))
    shown.finished(RunResult(THREE_PHASES_SGD, (0,), (), {}, (), 1.0, 0, error="diverged"))
    shown.close()
    text = stream.getvalue()
    assert not CURSOR.search(text)
    assert _strip_times(text) == [
        "tiny-two-phases: phase 1 of 2 done (epoch 3 of 5, lr 0.05, rho 0.05)",
        "tiny-three-phases: phase 1 of 3 done (epoch 2 of 5, lr 0.05)",
        "tiny-three-phases: phase 2 of 3 done (epoch 3 of 5, lr 0.02)",
        "tiny-two-phases: finished, 5 epochs x 2 seed(s)",
        "tiny-three-phases: FAILED (diverged)",
    ]
    assert all(re.search(r" \[\d+\.\d s\]$", line) for line in text.splitlines())


def test_bars_on_a_terminal():
    stream = _Terminal()
    shown = Progress([TWO_PHASES], "bars", stream)
    shown.update(TWO_PHASES.name, 5)
    shown.finished(RunResult(TWO_PHASES, (0,), (5,), {}, (), 1.0, 10))
    shown.close()
    text = stream.getvalue()
    assert "\r" in text and "tiny-two-phases" in text and "5/5" in text
    assert "finished" not in text and "phase 1" not in text


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_experiments_without_a_terminal_prints_plain_lines(capsys, jobs):
    torch.set_num_threads(1)
    results = run_experiments([TWO_PHASES, *get_preset("tiny-bias-sgd")], [0], jobs=jobs)
    assert all(r.error is None for r in results)
    err = capsys.readouterr().err
    assert not CURSOR.search(err)
    lines = _strip_times(err)
    assert sorted(lines) == [
        "tiny-bias-sgd: finished, 20 epochs x 1 seed(s)",
        "tiny-two-phases: finished, 5 epochs x 1 seed(s)",
        "tiny-two-phases: phase 1 of 2 done (epoch 3 of 5, lr 0.05, rho 0.05)",
    ]
    assert lines.index("tiny-two-phases: finished, 5 epochs x 1 seed(s)") > lines.index(
        "tiny-two-phases: phase 1 of 2 done (epoch 3 of 5, lr 0.05, rho 0.05)"
    )


def test_resumed_run_counts_the_checkpointed_epochs(tmp_path, capsys):
    from sharpgen.experiments import train

    train(TWO_PHASES, [0], checkpoint=tmp_path / f"{TWO_PHASES.name}.pt", stop_after_epochs=4)
    run_experiments([TWO_PHASES], [0], checkpoint_dir=tmp_path, resume=True, progress="lines")
    assert _strip_times(capsys.readouterr().err) == [
        "tiny-two-phases: phase 1 of 2 done (epoch 3 of 5, lr 0.05, rho 0.05)",
        "tiny-two-phases: finished, 5 epochs x 1 seed(s)",
    ]


def _cli(tmp_path, stderr):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    args = ["reproduce", "--preset", "tiny-no-bias-sam1", "--seeds", "1", "--jobs", "1"]
    return subprocess.run(
        [sys.executable, "-m", "sharpgen", *args, "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=env,
        timeout=300,
    )


def test_cli_into_a_log_file_and_on_a_terminal(tmp_path):
    log = tmp_path / "log"
    with log.open("w") as f:
        assert _cli(tmp_path, f).returncode == 0
    text = log.read_text()
    assert not CURSOR.search(text), repr(text)
    assert _strip_times(text) == ["tiny-no-bias-sam1: finished, 20 epochs x 1 seed(s)"]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    try:
        assert _cli(tmp_path, slave).returncode == 0
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    shown = b"".join(chunks).decode()
    assert "\r" in shown and "tiny-no-bias-sam1" in shown and "20/20" in shown
    assert "finished, 20 epochs" not in shown
