"""Every user error of `sharpgen reproduce` / `sharpgen measure`: exit 2, one line, no traceback."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from sharpgen.cli import main
from sharpgen.experiments import (
    ExperimentSpec,
    Phase,
    RunResult,
    get_preset,
    load_results,
    run_experiments,
    save_checkpoint,
    save_results,
    train,
)

FAST = "tiny-no-bias-sam1"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sharpgen {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _reproduce(out, *extra):
    return main(
        ["reproduce", "--preset", FAST, "--seeds", "1", "--out", str(out), "--no-progress", *extra]
    )


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_jobs_below_one(tmp_path, capsys, jobs):
    assert _reproduce(tmp_path / "out", "--jobs", jobs) == 2
    line = _one_line_error(capsys, "reproduce")
    assert f"--jobs {jobs} must be >= 1" in line
    assert not (tmp_path / "out").exists()  # refused before any work


def test_out_is_an_existing_file(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert _reproduce(target) == 2
    line = _one_line_error(capsys, "reproduce")
    assert "is an existing file" in line and str(target) in line
    assert target.read_text() == "keep me"


def test_out_lies_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _reproduce(blocker / "a" / "b") == 2
    line = _one_line_error(capsys, "reproduce")
    assert f"lies under the file {blocker}" in line


def test_out_not_writable(tmp_path, capsys, monkeypatch):
    # root ignores permission bits, so simulate the refusal the OS gives a normal user
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert _reproduce(tmp_path / "ro") == 2
    line = _one_line_error(capsys, "reproduce")
    assert "is not writable (Permission denied)" in line


def _broken_checkpoints(tmp_path):
    spec = get_preset(FAST)[0]
    good = tmp_path / "good.pt"
    train(spec.replace(name="other-experiment"), [0], checkpoint=good, stop_after_epochs=1)
    data = good.read_bytes()
    rng = torch.Generator().manual_seed(0)
    return {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random bytes": bytes(torch.randint(0, 256, (4096,), generator=rng).tolist()),
        "other experiment": data,
    }


def test_resume_with_a_bad_checkpoint_names_the_file_and_stops(tmp_path, capsys):
    expected = {
        "empty": "is empty",
        "truncated": "is unreadable",
        "random bytes": "is unreadable",
        "other experiment": "belongs to a different experiment",
    }
    for kind, content in _broken_checkpoints(tmp_path).items():
        out = tmp_path / kind.replace(" ", "-")
        ckpt = out / "checkpoints" / f"{FAST}.pt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(content)
        assert _reproduce(out, "--jobs", "1", "--resume") == 2, kind
        line = _one_line_error(capsys, "reproduce")
        assert expected[kind] in line and str(ckpt) in line, line
        assert "nothing was trained" in line and "delete" in line and "without --resume" in line
        assert ckpt.read_bytes() == content  # left for the user to inspect
        assert not (out / "results.json").exists()


def test_not_a_trainer_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / f"{FAST}.pt"
    save_checkpoint({"x": torch.zeros(2)}, ckpt)
    assert _reproduce(out, "--jobs", "1", "--resume") == 2
    assert "is not a sharpgen trainer checkpoint" in _one_line_error(capsys, "reproduce")


def test_bad_checkpoint_is_refused_before_training_the_others(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "tiny-bias-sam1.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x00garbage")
    trained = []
    import sharpgen.experiments._runner as runner

    monkeypatch.setattr(runner, "train", lambda spec, *a, **k: trained.append(spec.name))
    args = ["reproduce", "--preset", FAST, "tiny-bias-sam1", "--out", str(out), "--resume"]
    assert main([*args, "--no-progress", "--jobs", "1"]) == 2
    assert trained == []
    _one_line_error(capsys, "reproduce")


def test_ctrl_c_prints_one_line_with_how_to_resume(tmp_path, capsys, monkeypatch):
    import sharpgen.experiments as ex

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "run_experiments", interrupted)
    assert _reproduce(tmp_path / "out") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("sharpgen reproduce: interrupted;") and "--resume" in err[0]


def _group_processes(pgid: int) -> str:
    ps = subprocess.run(["ps", "-o", "pid,stat,args", "-g", str(pgid)], capture_output=True)
    return ps.stdout.decode()


def _group_gone(pgid: int, timeout: float = 15.0) -> bool:
    """Whether every process of the group has exited (zombies count as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _group_processes(pgid).splitlines()[1:]
        if all(line.split()[1].startswith("Z") for line in lines):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("target", ["group", "parent"])
def test_ctrl_c_on_a_real_run_then_resume(tmp_path, capsys, target):
    """SIGINT during a real two-process run: one line, status 130, no hang; --resume continues.

    ``group`` is Ctrl-C in a shell (the whole foreground process group gets SIGINT);
    ``parent`` is ``kill -INT <pid>`` (only the main process gets it: it must stop its workers
    itself and must not wait for them at exit).
    """
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    presets = ["--preset", FAST, "paper-fig1b"]  # a few-second run and a run of hours
    cmd = [sys.executable, "-m", "sharpgen", "reproduce", *presets, "--seeds", "1"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--no-progress", "--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        start_new_session=True,  # its own process group, like a shell job
    )
    deadline = time.monotonic() + 240
    while not (out / "results.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the short run is done and saved; the long one is training
    assert (out / "results.json").exists(), "the short run did not finish in time"
    time.sleep(1.0)
    if target == "group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("sharpgen reproduce: interrupted;") and "--resume" in lines[0]
    assert _group_gone(proc.pid), _group_processes(proc.pid)  # nothing left behind
    # the finished experiment resumes from its checkpoint without training again
    first = json.loads((out / "results.json").read_text())[0]
    assert (
        main(
            [
                "reproduce",
                *presets[:2],
                "--seeds",
                "1",
                "--out",
                str(out),
                "--resume",
                "--no-progress",
                "--jobs",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    again = json.loads((out / "results.json").read_text())[0]
    assert again["wall_time_s"] == first["wall_time_s"]
    assert json.dumps(again["metrics"]) == json.dumps(first["metrics"])


def test_measure_test_size_zero_draws_no_conclusion(capsys):
    assert main(["measure", "--d", "8", "--n", "20", "--test-size", "0"]) == 0
    out = capsys.readouterr().out
    assert "opposite test errors" not in out
    assert "not measured" in out
    assert main(["measure", "--d", "8", "--n", "20", "--test-size", "50"]) == 0
    assert "opposite test errors" in capsys.readouterr().out


def test_measure_negative_test_size(capsys):
    assert main(["measure", "--test-size", "-3"]) == 2
    assert "--test-size -3 must be >= 0" in _one_line_error(capsys, "measure")


def test_results_and_report_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (full disk) leaves the previous file intact."""
    result = train(get_preset(FAST)[0], [0], stop_after_epochs=1)
    path = tmp_path / "results.json"
    save_results([result], path)
    before = path.read_text()
    real_open = io.open

    class HalfWriter(io.RawIOBase):
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(
                bytes(data)[:10] if isinstance(data, bytes | bytearray | memoryview) else data[:10]
            )
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def failing_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return HalfWriter(handle) if "w" in mode else handle

    monkeypatch.setattr(io, "open", failing_open)
    with pytest.raises(OSError, match="No space"):
        save_results([result], path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert json.loads(before)[0]["spec"]["name"] == FAST
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["reproduce", "--seeds", "x"], "sharpgen reproduce: error: argument --seeds: invalid int"),
        (["reproduce", "--device", "tpu"], "sharpgen reproduce: error: argument --device"),
        (["reproduce", "--jobs", "1.5"], "sharpgen reproduce: error: argument --jobs"),
        (["reproduce", "--preset"], "sharpgen reproduce: error: argument --preset: expected"),
        (["reproduce", "--bogus"], "sharpgen: error: unrecognized arguments: --bogus"),
        (["frobnicate"], "sharpgen: error: argument COMMAND: invalid choice: 'frobnicate'"),
        (["measure", "--d", "three"], "sharpgen measure: error: argument --d: invalid int"),
    ],
)
def test_malformed_arguments_are_one_line_usage_errors(capsys, argv, expected):
    """argparse's own errors: exit 2, one line that points to --help, no usage block."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(expected) and lines[0].endswith("--help'"), lines[0]
    assert "Traceback" not in err and "usage:" not in err


# -- one diverging experiment does not stop the others -------------------------------------------
DIVERGES = ExperimentSpec(  # full-batch GD at lr 50: non-finite weights by the first evaluation
    "tiny-diverges", "no_bias", "sgd", (Phase(20, 50.0),), d=6, n=24, width=32, batch_size=24,
    test_size=50, eval_every=5,
)  # fmt: skip


@pytest.fixture
def diverging_preset(monkeypatch):
    import sharpgen.experiments._presets as presets

    monkeypatch.setitem(presets.PRESETS, DIVERGES.name, DIVERGES)
    return DIVERGES.name


def test_one_diverged_experiment_is_reported_the_others_finish(tmp_path, capsys, diverging_preset):
    out = tmp_path / "out"
    names = [FAST, diverging_preset, "tiny-bias-sgd"]
    args = ["reproduce", "--preset", *names, "--seeds", "2", "--out", str(out), "--no-progress"]
    assert main([*args, "--jobs", "1"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0] == (
        f"sharpgen reproduce: 1 of 3 experiments failed (diverged): {diverging_preset}; "
        f"the others finished; see {out / 'report.md'}"
    )
    results = load_results(out / "results.json")
    assert [r.spec.name for r in results] == names
    failed = results[1]
    assert failed.error is not None and "non-finite by epoch 5" in failed.error
    assert failed.metrics == {} and failed.seeds == (0, 1)
    for res in (results[0], results[2]):  # trained to the end
        assert res.error is None and res.epochs[-1] == res.spec.epochs
    report = (out / "report.md").read_text()
    assert report in captured.out
    assert "## Failed experiments" in report
    assert f"- **FAILED** `{diverging_preset}` (seeds 0, 1): {failed.error}" in report
    row = next(line for line in report.splitlines() if line.startswith(f"| {diverging_preset} "))
    assert "**FAILED**" in row
    assert "| 2-layer, no bias |" in report  # Table 1 from the runs that finished
    assert (out / "table1.png").stat().st_size > 10_000


def test_every_experiment_diverged(tmp_path, capsys, diverging_preset):
    out = tmp_path / "out"
    args = ["reproduce", "--preset", diverging_preset, "--out", str(out), "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 1 experiments failed (diverged): tiny-diverges" in err[0]
    assert load_results(out / "results.json")[0].error is not None
    assert "**FAILED: 1 of 1 experiments**" in (out / "report.md").read_text()
    assert not (out / "table1.png").exists()  # nothing to plot


def test_keep_going_in_worker_processes_and_the_default_raises():
    specs = [DIVERGES, *get_preset(FAST)]
    with pytest.raises(FloatingPointError, match="tiny-diverges: parameters became non-finite"):
        run_experiments(specs, [0], jobs=1, progress=False)
    results = run_experiments(specs, [0], jobs=2, progress=False, keep_going=True)
    assert [r.spec.name for r in results] == [DIVERGES.name, FAST]
    assert "non-finite" in results[0].error and results[1].error is None
    assert results[1].epochs[-1] == results[1].spec.epochs
    again = RunResult.from_dict(json.loads(json.dumps(results[0].to_dict())))
    assert again == results[0]  # the failure survives results.json
    assert "error" not in results[1].to_dict()  # finished runs are written as before


# -- Ctrl-C while PyTorch is still importing ---------------------------------------------------
# A sitecustomize on PYTHONPATH holds the import of torch (first touched when a command starts)
# in a sleep and says so in a file: the SIGINT then arrives mid-import, however loaded the
# machine is.
SLOW_TORCH = """
import importlib.abc, os, pathlib, sys, time

class _SlowTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            pathlib.Path(os.environ["SLOW_TORCH_MARK"]).write_text("importing torch")
            time.sleep(120)
        return None

sys.meta_path.insert(0, _SlowTorch())
"""
# what pip writes as the `sharpgen` console script (project.scripts: sharpgen.cli:main)
CONSOLE_SCRIPT = """import sys
from sharpgen.cli import main
if __name__ == "__main__":
    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    sys.exit(main())
"""


def _interrupt_while_importing(tmp_path, argv):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_TORCH)
    mark = tmp_path / "mark"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]),
        "SLOW_TORCH_MARK": str(mark),
    }
    env.pop("RANK", None)
    pipe = subprocess.PIPE
    proc = subprocess.Popen(argv, stdout=pipe, stderr=pipe, env=env, text=True)
    try:
        deadline = time.monotonic() + 120
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.exists(), proc.communicate(timeout=10)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


@pytest.mark.parametrize("entry", ["python -m sharpgen", "console script"])
def test_ctrl_c_while_torch_imports_is_one_line_and_status_130(tmp_path, entry):
    if entry == "console script":
        script = tmp_path / "bin" / "sharpgen"
        script.parent.mkdir()
        script.write_text(CONSOLE_SCRIPT)
        argv = [sys.executable, str(script)]
    else:
        argv = [sys.executable, "-m", "sharpgen"]
    code, out, err = _interrupt_while_importing(tmp_path, [*argv, "reproduce", "--list"])
    assert code == 130, err
    assert err == "sharpgen: interrupted while starting (importing PyTorch); nothing was written\n"
    assert out == ""


def test_ctrl_c_while_a_library_user_imports_sharpgen_is_still_keyboard_interrupt(tmp_path):
    argv = [sys.executable, "-c", "import sharpgen; sharpgen.hessian_trace"]  # lazy: on use
    code, _, err = _interrupt_while_importing(tmp_path, argv)
    assert code != 130 and err.rstrip().endswith("KeyboardInterrupt"), err


@pytest.mark.parametrize(
    ("argv", "orig", "cli"),
    [
        (["/usr/local/bin/sharpgen", "reproduce"], ["python", "/usr/local/bin/sharpgen"], True),
        (["C:\\env\\Scripts\\sharpgen.exe"], [], True),
        (["-m", "reproduce"], ["python", "-m", "sharpgen", "reproduce"], True),
        (["-m"], ["python", "-u", "-W", "ignore", "-X", "dev", "-m", "sharpgen"], True),
        (["-m"], ["python", "-msharpgen"], True),
        (["-m"], ["python", "-m", "sharpgen.cli"], False),
        (["-m"], ["python", "-m", "pytest", "-m", "sharpgen"], False),
        (["-c"], ["python", "-c", "import sharpgen", "-m", "sharpgen"], False),
        (["train.py"], ["python", "train.py", "-m", "sharpgen"], False),
        (["/home/me/sharpgen_runs.py"], ["python", "/home/me/sharpgen_runs.py"], False),
    ],
)
def test_started_as_cli(argv, orig, cli):
    from sharpgen._startup import started_as_cli

    assert started_as_cli(argv, orig) is cli
