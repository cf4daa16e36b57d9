"""CLI errors name the flag to change: bad --out paths, and the limits of `sharpgen measure`."""

from __future__ import annotations

import os

import pytest

from sharpgen.cli import main

FAST = "tiny-no-bias-sam1"


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sharpgen {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("out", ["", "   "])
def test_empty_out_is_refused_and_nothing_is_written(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    argv = ["reproduce", "--preset", FAST, "--seeds", "1", "--out", out, "--no-progress"]
    assert main(argv) == 2
    line = _one_line_error(capsys, "reproduce")
    assert f"--out {out!r} is empty" in line and "--out results/quick" in line
    assert list(tmp_path.iterdir()) == []  # not written into the current directory


def test_out_with_a_nul_character_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "a\0b")
    assert main(["reproduce", "--preset", FAST, "--out", out, "--no-progress"]) == 2
    assert "is not a valid path" in _one_line_error(capsys, "reproduce")
    assert list(tmp_path.iterdir()) == []


def test_out_in_an_unwritable_directory(tmp_path, capsys):
    if os.geteuid() == 0:  # root ignores permission bits, but /proc refuses even root
        target = "/proc/sharpgen-out"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "out")
    assert main(["reproduce", "--preset", FAST, "--out", target, "--no-progress"]) == 2
    line = _one_line_error(capsys, "reproduce")
    assert f"--out {target} is not writable" in line and "give a directory" in line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--d", "1"], "--d 1 must be >= 2"),
        (["--d", "-3"], "--d -3 must be >= 2"),
        (["--n", "0"], "--n 0 must be >= 1"),
        (["--d", "3", "--n", "100"], "--n 100 is more than the 8 distinct points"),
        (["--d", "4", "--n", "8"], "the --n 8 training points drawn with --seed 0 miss one of"),
        (["--d", "5", "--n", "1", "--seed", "3"], "drawn with --seed 3 miss one of"),
        (["--test-size", "-1"], "--test-size -1 must be >= 0"),
        (["--seed", str(2**70)], f"--seed {2**70} is out of range; give a seed from 0 to"),
    ],
)
def test_measure_errors_name_the_flag_to_change(capsys, argv, expected):
    assert main(["measure", *argv]) == 2
    line = _one_line_error(capsys, "measure")
    assert expected in line, line
    # library jargon without a flag (keyword arguments the command line does not have)
    for jargon in ("unique=False", "reference set", "must be an int", "n=", "d="):
        assert jargon not in line, line
    assert any(fix in line for fix in ("raise --", "lower --", "must be >=", "give a seed")), line


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("qiuck", "--preset qiuck: unknown preset 'qiuck'; did you mean 'quick'? groups: quick"),
        ("paper-fig99", "--preset paper-fig99: unknown preset 'paper-fig99'; did you mean 'paper-"),
        ("zzz", "--preset zzz: unknown preset 'zzz'; groups: quick, paper"),
    ],
)
def test_unknown_preset_names_the_flag_and_the_closest_names(tmp_path, capsys, preset, expected):
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", "tiny", preset, "--out", str(out)]) == 2
    line = _one_line_error(capsys, "reproduce")
    assert line.startswith(f"sharpgen reproduce: error: {expected}"), line
    assert line.endswith("'sharpgen reproduce --list' shows every experiment with its settings")
    assert not out.exists()


def test_compile_without_a_cpp_compiler_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", FAST, "--compile", "--out", str(out)]) == 2
    line = _one_line_error(capsys, "reproduce")
    assert "--compile needs a C++ compiler for torch.compile on the CPU" in line
    assert "leave out --compile" in line and not out.exists()
