"""The `sharpgen` command line on the few-second `tiny` presets."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch

from sharpgen.cli import main
from sharpgen.experiments import (
    PRESETS,
    get_preset,
    load_results,
    preset_names,
    run_experiments,
)

FAST = ["tiny-no-bias-sam1", "tiny-bias-sam1", "tiny-bias-sgd"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def test_reproduce_writes_results_plots_and_a_report_that_matches_them(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["reproduce", "--preset", *FAST, "--seeds", "2", "--out", str(out), "--no-progress"]
    assert main([*args, "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    results = load_results(out / "results.json")
    assert [r.spec.name for r in results] == FAST
    assert all(r.seeds == (0, 1) for r in results)
    assert (out / "table1.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert report in printed
    # the Table 1 cell of the no-bias net is the mean over seeds of the final accuracy
    nb = results[0]
    mean = statistics.fmean(nb.final("test_accuracy"))
    row = next(line for line in report.splitlines() if line.startswith("| 2-layer, no bias"))
    assert f"{mean:.3f} ±" in row
    # bias row compares with the no-bias run and with the GD + wd baseline trace
    bias_row = next(line for line in report.splitlines() if line.startswith("| 2-layer, bias"))
    assert "below the no-bias net" in bias_row and "GD + wd baseline" in bias_row
    # --resume from the finished checkpoints reproduces the results exactly, without training
    before = json.loads((out / "results.json").read_text())
    assert main([*args, "--jobs", "1", "--resume"]) == 0
    after = json.loads((out / "results.json").read_text())
    for a, b in zip(before, after, strict=True):
        assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])
        assert b["wall_time_s"] == a["wall_time_s"]  # nothing was trained again


@pytest.mark.parametrize("flag", [[], ["--compile"]])
def test_compile_flag_is_train_compile(tmp_path, capsys, monkeypatch, flag):
    import sharpgen.experiments._runner as runner

    real, seen = runner.train, []

    def recording(spec, seeds, **kwargs):
        seen.append((spec.name, kwargs["compile"]))
        return real(spec, seeds, **{**kwargs, "compile": False})  # the mapping, not the compile

    monkeypatch.setattr(runner, "train", recording)
    names = ["tiny-no-bias-sam1", "tiny-simplified-bn-sam1"]
    args = ["reproduce", "--preset", *names, "--seeds", "1", "--out", str(tmp_path / "out")]
    assert main([*args, "--no-progress", "--jobs", "1", *flag]) == 0
    capsys.readouterr()
    assert seen == [(name, bool(flag)) for name in names]


def test_unknown_preset_names_the_groups_and_where_the_rest_are(tmp_path, capsys):
    assert main(["reproduce", "--preset", "paper-fig99", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'paper-fig99'" in err
    for name in ("quick", "paper", "medium", "sweep-n", "'sharpgen reproduce --list'"):
        assert name in err


def test_bad_seeds_and_missing_cuda_are_usage_errors(tmp_path, capsys):
    assert main(["reproduce", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["reproduce", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "--device cpu" in capsys.readouterr().err


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--preset", "--seeds", "--device", "--out", "--resume", "quick", "Table 1"):
        assert phrase in text
    compile_help = " ".join(text.split("--compile  ")[1].split("--list")[0].split())
    assert "torch.compile" in compile_help and "simplified-BatchNorm step is not" in compile_help
    for group in ("quick", "medium", "sweep-n", "paper", "paper-logistic"):
        assert f"\n  {group} " in text  # every group is introduced, with its expected time
    assert "130" in text and "--resume" in text  # what Ctrl-C does
    assert main([]) == 0
    top = capsys.readouterr().out
    assert "reproduce" in top and "measure" in top and "examples:" in top


def test_list_shows_every_preset(capsys):
    assert main(["reproduce", "--list"]) == 0
    text = capsys.readouterr().out
    for name in preset_names():
        assert name in text
    experiments = text.split("experiments (")[1].splitlines()[1:]
    lines = {line.split()[0]: line for line in experiments}
    assert set(lines) == set(PRESETS)
    # the settings that tell the experiments apart are on their line
    assert (
        "logistic p=0.2" in lines["paper-fig8a"] and "sgd batch=10 wd=0.01" in lines["paper-fig8a"]
    )
    assert "1000 ep lr 1 rho 0.5 + 100000 ep lr 1 rho 1" in lines["paper-fig10b"]
    assert (
        "uniform_ball" in lines["medium-ball-bias-sam"] and "d=10" in lines["medium-ball-bias-sam"]
    )
    assert "sgd batch=100 wd=0.05" in lines["paper-fig4a"] and "rho" not in lines["paper-fig4a"]
    # experiment columns line up
    starts = {line.index("Fig. ") for name, line in lines.items() if name.startswith("paper-")}
    assert len(starts) == 1


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "sharpgen", "reproduce", "--list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "paper-fig1b" in proc.stdout


def test_parallel_jobs_give_the_same_results_as_one_process():
    specs = get_preset("tiny-bias-sam1", "tiny-no-bias-sam1")
    serial = run_experiments(specs, [0], jobs=1, progress=False)
    parallel = run_experiments(specs, [0], jobs=2, progress=False)
    for a, b in zip(serial, parallel, strict=True):
        assert a.spec == b.spec
        assert json.dumps(a.metrics) == json.dumps(b.metrics)


def test_measure_prints_the_constructions_at_their_lower_bounds(capsys):
    assert main(["measure", "--d", "8", "--n", "20", "--test-size", "300"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 7  # header + six constructions
    by_kind = {tuple(c.strip() for c in r.split("|")[1:3]): r.split("|") for r in rows[1:]}
    # bias: memorizer and generalizer both attain 4 sqrt(d + 1), with opposite test errors
    for kind in ("memorizer", "generalizer"):
        cells = by_kind[("bias", kind)]
        assert float(cells[3]) == pytest.approx(4 * 9**0.5, rel=1e-12)
        assert float(cells[5]) == pytest.approx(1.0, abs=1e-12)
    assert float(by_kind[("bias", "memorizer")][7]) > 0.8  # unseen points: output 0
    assert float(by_kind[("bias", "generalizer")][7]) == 0.0
    assert float(by_kind[("simplified_ln", "memorizer")][3]) == pytest.approx(2.0, abs=1e-12)


def test_measure_bad_input_is_a_usage_error(capsys):
    assert main(["measure", "--n", "0"]) == 2
    assert "n" in capsys.readouterr().err
