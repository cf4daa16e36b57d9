"""The example script examples/sharpness_in_your_loop.py runs and its records are right."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from sharpgen.sharpness import hessian_trace

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sharpness_in_your_loop.py"


def test_example_runs_and_records_the_trained_model(tmp_path, capsys):
    module = runpy.run_path(str(EXAMPLE))
    plot = tmp_path / "sharpness.png"
    tracker = module["main"](steps=20, every=10, plot=str(plot))
    assert [r["step"] for r in tracker.history] == [0, 10, 20]
    assert plot.stat().st_size > 0
    out = capsys.readouterr().out
    assert "total cost" in out and "TraceEstimate" in out and "SharpnessResult" in out
    # the step-0 record is the sharpness of the untrained model (same seed, same batch)
    model, (x, y) = module["make_problem"](0)
    est = hessian_trace(
        model, torch.nn.functional.mse_loss, (x[:32], y[:32]), num_matvecs=40,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert tracker.history[0]["trace"] == pytest.approx(est.value, rel=1e-6)
