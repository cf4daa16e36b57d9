"""`torchrun --nproc-per-node 2 -m sharpgen reproduce`: experiments spread over 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharpgen.cli import main
from sharpgen.experiments import get_preset, load_results
from sharpgen.experiments._spread import assign

FAST = ["tiny-no-bias-sam1", "tiny-bias-sam1", "tiny-bias-sgd", "tiny-simplified-ln-sam1"]
ROOT = Path(__file__).resolve().parents[2]


def test_assignment_balances_and_covers_every_experiment():
    specs = get_preset("tiny", "quick")
    for world in (1, 2, 3, 16):
        parts = assign(specs, world)
        assert sorted(i for part in parts for i in part) == list(range(len(specs)))
        assert len(parts) == world
    # two experiments of equal cost go to different ranks
    two = get_preset("tiny-bias-sam1", "tiny-no-bias-sam1")
    assert sorted(assign(two, 2)) == [[0], [1]]


def test_torchrun_two_processes_equals_one_process_bitwise(tmp_path, capsys):
    torch.set_num_threads(1)
    single, spread = tmp_path / "single", tmp_path / "spread"
    args = ["--preset", *FAST, "--seeds", "2", "--no-progress"]
    assert main(["reproduce", *args, "--out", str(single), "--jobs", "1"]) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--standalone", "-m", "sharpgen", "reproduce", *args, "--out", str(spread)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Total wall time") == 1  # one report, from rank 0
    assert "2 torchrun processes" in (spread / "report.md").read_text()
    a = json.loads((single / "results.json").read_text())
    b = json.loads((spread / "results.json").read_text())
    assert [r["spec"]["name"] for r in b] == FAST
    for x, y in zip(a, b, strict=True):
        assert json.dumps(x["metrics"]) == json.dumps(y["metrics"])  # bitwise
        assert x["spec"] == y["spec"] and x["seeds"] == y["seeds"]
    # every experiment has its own checkpoint: a resumed run trains nothing and agrees
    assert sorted(p.name for p in (spread / "checkpoints").iterdir()) == sorted(
        f"{name}.pt" for name in FAST
    )
    assert main(["reproduce", *args, "--out", str(spread), "--jobs", "1", "--resume"]) == 0
    resumed = load_results(spread / "results.json")
    for x, y in zip(b, resumed, strict=True):
        assert json.dumps(x["metrics"]) == json.dumps(y.metrics)
        assert y.wall_time_s == x["wall_time_s"]


def test_spread_keeps_going_past_a_diverged_experiment(tmp_path):
    """The gather of a failed result (one-process gloo group); without keep_going it raises."""
    import torch.distributed as dist

    from sharpgen.experiments import ExperimentSpec, Phase
    from sharpgen.experiments._spread import run_spread

    diverges = ExperimentSpec(  # full-batch GD at lr 50: non-finite by the first evaluation
        "tiny-diverges", "no_bias", "sgd", (Phase(10, 50.0),), d=6, n=24, width=32,
        batch_size=24, test_size=50, eval_every=5,
    )  # fmt: skip
    specs = [*get_preset("tiny-bias-sgd"), diverges]
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        results = run_spread(specs, [0, 1], progress=False, keep_going=True)
        assert results is not None and [r.spec.name for r in results] == [s.name for s in specs]
        assert results[0].error is None and results[0].epochs[-1] == specs[0].epochs
        assert "tiny-diverges: parameters became non-finite" in results[1].error
        with pytest.raises(FloatingPointError, match="tiny-diverges: parameters became"):
            run_spread(specs, [0, 1], progress=False)
    finally:
        dist.destroy_process_group()
