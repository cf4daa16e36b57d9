"""Tables and logs: DataFrame / CSV / TensorBoard exports of a tracker, results.json as a
DataFrame, and the lazy imports (``import sharpgen`` needs no optional framework)."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import sharpgen.integrations as integrations
from sharpgen import SharpnessTracker
from sharpgen.experiments import ExperimentSpec, Phase, RunResult, save_results
from sharpgen.integrations import (
    history_to_csv,
    history_to_dataframe,
    log_history,
    results_to_dataframe,
)

ROOT = Path(__file__).resolve().parents[2]
mse = nn.functional.mse_loss


@pytest.fixture
def tracker(ih, regression):
    x, y = regression
    model = ih.mlp(0)
    tracker = SharpnessTracker(
        model, mse, (x, y), every=2, measures=("loss", "trace", "top_eigenvalue"),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        tracker.step(step)
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return tracker


def test_dataframe_holds_the_history_indexed_by_step(tracker):
    df = tracker.to_dataframe()
    columns = tracker.to_dict()
    assert df.index.name == "step" and df.index.tolist() == columns.pop("step")
    assert list(df.columns) == list(columns)
    for key, values in columns.items():
        assert df[key].tolist() == values, key
    assert history_to_dataframe(tracker.history).equals(df)
    assert history_to_dataframe(tracker.to_dict()).equals(df)


def test_csv_round_trips_exactly(tracker, tmp_path):
    path = tracker.to_csv(tmp_path / "sub" / "sharpness.csv")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row, record in zip(rows, tracker.history, strict=True):
        assert int(row["step"]) == record["step"]
        assert float(row["trace"]) == record["trace"]  # repr of a float reads back exactly
        assert row["top_eigenvalue_converged"] == str(record["top_eigenvalue_converged"])
    df = pd.read_csv(path, index_col="step")
    assert df["loss"].tolist() == tracker.to_dict()["loss"]
    # records with different keys: missing cells stay empty
    out = history_to_csv([{"step": 0, "a": 1.5}, {"step": 1, "b": None}], tmp_path / "x.csv")
    assert out.read_text().splitlines() == ["step,a,b", "0,1.5,", "1,,"]


def test_tensorboard_event_file_holds_every_number(tracker, tmp_path):
    with SummaryWriter(tmp_path / "tb") as writer:
        written = tracker.log_to(writer)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    keys = [k for k in tracker.to_dict() if k != "step"]
    assert sorted(tags) == sorted(f"sharpness/{k}" for k in keys)
    assert written == len(keys) * len(tracker.history)
    for key in ("trace", "loss", "top_eigenvalue_converged", "matvecs"):
        scalars = events.Scalars(f"sharpness/{key}")
        assert [s.step for s in scalars] == [r["step"] for r in tracker.history]
        for s, r in zip(scalars, tracker.history, strict=True):
            assert s.value == pytest.approx(float(r[key]), rel=1e-6)  # stored as float32


def test_log_history_last_only_and_errors(tracker):
    calls = []

    class Writer:
        def add_scalar(self, tag, value, global_step):
            calls.append((tag, value, global_step))

    n = log_history(Writer(), tracker, prefix="", last=True)
    assert n == len(calls) and {step for _, _, step in calls} == {4}
    assert ("trace", tracker.history[-1]["trace"], 4) in calls
    with pytest.raises(TypeError, match="add_scalar"):
        log_history(object(), tracker)
    with pytest.raises(TypeError, match="history must be a SharpnessTracker"):
        history_to_dataframe(3)
    with pytest.raises(ValueError, match="different lengths"):
        history_to_dataframe({"step": [0, 1], "trace": [1.0]})


def _run(name: str, trace: list[list[float]]) -> RunResult:
    spec = ExperimentSpec(
        name=name, arch="bias", method="sgd", phases=(Phase(epochs=3, lr=0.1), Phase(2, 0.01))
    )
    return RunResult(
        spec=spec,
        seeds=(0, 1),
        epochs=(0, 5),
        metrics={"trace": trace, "test_accuracy": [[0.5, 0.9], [0.5, math.nan]]},
        lower_bound=(1.0, 2.0),
        wall_time_s=1.5,
        steps=50,
    )


def test_results_json_loads_into_one_tidy_dataframe(tmp_path):
    runs = [_run("a", [[4.0, 3.0], [5.0, 2.0]]), _run("b", [[1.0, 0.5], [2.0, 0.25]])]
    save_results(runs, tmp_path / "results.json")
    df = results_to_dataframe(tmp_path)  # the --out folder, or the file itself
    assert df.equals(results_to_dataframe(tmp_path / "results.json"))
    assert df.equals(results_to_dataframe(runs))
    assert len(df) == 2 * 2 * 2  # runs x seeds x epochs
    row = df[(df.name == "b") & (df.seed == 1) & (df.epoch == 5)].iloc[0]
    assert row.trace == 0.25 and row.lower_bound == 2.0 and row.total_epochs == 5
    assert row.width == runs[1].spec.width and row.steps == 50
    assert math.isnan(df[(df.name == "a") & (df.seed == 1) & (df.epoch == 5)].test_accuracy.item())
    with pytest.raises(FileNotFoundError, match="no results file"):
        results_to_dataframe(tmp_path / "missing")
    with pytest.raises(TypeError, match="results must be a path"):
        results_to_dataframe(3.0)


def test_import_sharpgen_needs_no_optional_framework():
    code = (
        "import sys, sharpgen, sharpgen.integrations\n"
        "t = sharpgen.SharpnessTracker\n"
        "heavy = ['lightning', 'pytorch_lightning', 'transformers', 'tensorboard', 'pandas',"
        " 'accelerate', 'torch.utils.tensorboard']\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_framework_gives_an_install_hint():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "sys.modules['lightning.pytorch'] = sys.modules['pytorch_lightning'] = None\n"
        "import sharpgen.integrations as i\n"
        "for name in ('SAMTrainer', 'SharpnessMonitor'):\n"
        "    try:\n"
        "        getattr(i, name)\n"
        "    except ImportError as e:\n"
        "        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'sharpgen[hf]'" in out.stdout
    assert "pip install 'sharpgen[lightning]'" in out.stdout
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        integrations.nope  # noqa: B018


def test_every_integration_name_is_on_the_api_page():
    page = (ROOT / "docs" / "api" / "integrations.md").read_text()
    documented = {m.rsplit(".", 1)[-1] for m in re.findall(r"^:::\s+([\w.]+)", page, flags=re.M)}
    assert documented == set(integrations.__all__)
    assert set(dir(integrations)) >= set(integrations.__all__)
