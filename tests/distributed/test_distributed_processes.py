"""Curvature, sharpness measures and SAM on real torch.distributed processes (gloo, CPU).

One job of 3 OS processes is launched like ``torchrun`` (environment variables): the measures
over all 3 processes (``process_group="auto"``), then over a 2-process group (ranks 0 and 1,
also training with the SAM variants), then a rank that stalls and a rank that raises. Every
rank writes its results to a temporary directory; the assertions compare them here with the
single-process values on the full data. (One launch keeps the cost of starting processes and
importing torch to three processes.)
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location(
    "_distributed_worker", HERE / "_distributed_worker.py"
)
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

TOL = 1e-6
LAUNCH_TIMEOUT = 150  # seconds for all processes together; nothing may hang past it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, outdir: Path) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "_distributed_worker.py"), str(outdir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("distributed")
    procs = _launch(3, outdir)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    logs, codes, results = {}, {}, {}
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        logs[rank], codes[rank] = out, p.returncode
    for rank, log in logs.items():
        path = outdir / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote nothing:\n{log[-3000:]}"
        results[rank] = torch.load(path, weights_only=False)
        if rank != 1:  # rank 1 raises on purpose at the very end
            assert "error" not in results[rank], results[rank]["error"]
    return {"results": results, "codes": codes, "logs": logs}


@pytest.fixture(scope="module")
def reference():
    """The single-process values on the full dataset (one batch and uneven batches)."""
    x, y = W.build_data()
    model = W.build_model()
    ref = W.measures(model, (x, y), process_group=None)
    ref_batched = W.measures(model, W.batches(x, y, 4), process_group=None)
    return ref, ref_batched


GROUPS = [("world", 3), ("pair", 2)]


def _ranks(runs, key, world):
    return [runs["results"][r][key] for r in range(world)]


@pytest.mark.parametrize(("key", "world"), GROUPS)
def test_measures_equal_single_process(runs, reference, key, world):
    ref, ref_batched = reference
    per_rank = _ranks(runs, key, world)
    assert sum(m["shard_size"] for m in per_rank) == W.N_SAMPLES
    assert len({m["shard_size"] for m in per_rank}) == 2  # uneven shards
    for name in ("trace_exact", "trace_hutchinson", "lambda_max", "sam_sharpness", "sam_loss",
                 "average_sharpness", "m_sharpness"):  # fmt: skip
        # the single-process value does not depend on the batching (sanity of the reference)
        assert ref[name] == pytest.approx(ref_batched[name], rel=1e-10, abs=1e-12), name
        for rank, m in enumerate(per_rank):
            assert m[name] == pytest.approx(ref[name], rel=TOL, abs=TOL), (name, rank)
            assert m[name] == per_rank[0][name], f"{name} differs between ranks"
    for key in ("ggn_matvec", "slq_nodes"):
        for m in per_rank:
            torch.testing.assert_close(m[key], ref[key], rtol=TOL, atol=TOL)
            assert torch.equal(m[key], per_rank[0][key]), f"{key} differs between ranks"


def test_reduce_partials_counts_exactly_in_every_dtype(runs):
    expected_count = 3 * 3_000_000_000 + 0 + 1 + 2
    for m in _ranks(runs, "world", 3):
        checks = m["reduce_partials"]
        assert checks["float32"] == ([[6.0, 6.0]], [torch.float32], expected_count)
        assert checks["bfloat16"] == ([[6.0, 6.0]], [torch.bfloat16], expected_count)
        assert checks["mixed"] == ([[6.0, 6.0], [6.0, 6.0]], [torch.float32, torch.float64],
                                   expected_count)  # fmt: skip
        for dtype in (torch.float32, torch.bfloat16, torch.float64):  # reduced in place
            assert checks[f"room_{dtype}"] == ([6.0, 6.0], dtype, expected_count, True)


def test_ranks_agree_on_one_memory_plan(runs, reference):
    from sharpgen.sharpness import hessian_trace

    x, y = W.build_data()
    ref = {"lambda_max": reference[0]["lambda_max"]}
    ref["trace_hutchinson"] = hessian_trace(  # one probe a block: the draws of budget 1
        W.build_model(), W.loss_fn, (x, y), method="hutchinson", num_matvecs=8,
        generator=W.gen(1), memory_budget=1, process_group=None,
    ).value  # fmt: skip
    per_rank = [m["plans"] for m in _ranks(runs, "world", 3)]
    for m in per_rank:
        # plan_memory over the group: the smallest budget (rank 0's) and the largest graph
        assert m["plan"] == per_rank[0]["plan"]
        assert m["plan"].budget == 10**6 and m["plan"].graph_bytes == 200
        # rank 0 allowed 1 byte: every rank keeps 2k + 6 basis vectors in a file, one probe
        assert (m["eig_plan"].budget, m["eig_plan"].basis_vectors) == (1, 8)
        assert m["eig_plan"].basis_storage == "disk"
        assert (m["trace_plan"].budget, m["trace_plan"].block_width) == (1, 1)
        # micro_batch_size="auto": one size over the group (rank 0's budget), exact values
        assert (m["auto_plan"].micro_batch_size, m["auto_plan"].micro_batch_auto) == (1, True)
        assert m["trace_auto"] == pytest.approx(reference[0]["trace_exact"], rel=TOL, abs=TOL)
        assert m["trace_auto"] == per_rank[0]["trace_auto"]
        for name in ("lambda_max", "trace_hutchinson"):  # in step: the single-process values
            assert m[name] == pytest.approx(ref[name], rel=TOL, abs=TOL), name
            assert m[name] == per_rank[0][name]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("probe_seed", "disagree on the first block of vectors"),
        ("generator_state", "disagree on the generator"),
        ("parameters", "disagree on the number of selected parameters"),
    ],
)
def test_ranks_that_disagree_all_raise(runs, case, match):
    for rank, m in enumerate(_ranks(runs, "world", 3)):
        message = m["disagreements"][case]
        assert message is not None, f"rank {rank} did not raise for {case}"
        assert match in message, message
        assert "per rank:" in message


@pytest.mark.parametrize(("key", "world"), GROUPS)
def test_ddp_model_and_padding_distributed_sampler(runs, reference, key, world):
    ref, _ = reference
    per_rank = _ranks(runs, key, world)
    # DistributedSampler pads 11 samples to a multiple of the world size (repeats samples) ...
    assert sum(m["padded_local_samples"] for m in per_rank) > W.N_SAMPLES
    # ... and the measure counts every sample once: the single-process value
    for m in per_rank:
        assert m["trace_ddp_sampler"] == pytest.approx(ref["trace_exact"], rel=TOL, abs=TOL)


@pytest.mark.parametrize(("key", "world"), GROUPS)
def test_one_allreduce_per_block_product(runs, key, world):
    for m in _ranks(runs, key, world):
        # one parameter-sized vector per column (k = 4) plus the sample count, float64
        assert m["allreduce_bytes_per_block"] == [(m["numel"] * 4 + 1) * 8]
        assert m["allreduce_in_place"]  # the block product itself, no concatenated copy


def _reference_sam(name: str, steps: int) -> dict:
    """Single-process runs the distributed SAM variants must reproduce."""
    x, y = W.build_data(W.SAM_BATCH)
    half = W.SAM_BATCH // 2
    shards = [(x[:half], y[:half]), (x[half:], y[half:])]
    model = W.build_model()
    opt = W.make_optimizer(name, model.parameters())
    for _ in range(steps):
        if name.endswith("synchronized"):  # SAM / GSAM on the global batch

            def closure():
                opt.zero_grad()
                loss = W.loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:  # m-SAM with m = per-rank batch: the mean of per-shard (G)SAM gradients
            for xs, ys in shards:

                def micro(xs=xs, ys=ys):
                    opt.zero_grad()
                    loss = W.loss_fn(model(xs), ys) / len(shards)
                    loss.backward()
                    return loss

                opt.accumulate(micro)
            opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("name", "steps"),
    [
        ("sam_synchronized", W.SAM_STEPS),
        ("sam_per_rank", 5),
        ("gsam_per_rank", 5),
        ("gsam_synchronized", 5),
    ],
)
def test_ddp_sam_step_equals_single_process(runs, name, steps):
    expected = _reference_sam(name, steps)
    initial = dict(W.build_model().named_parameters())
    ranks = [r[name] for r in _ranks(runs, "sam", 2)]
    for params in ranks:
        for n, p in params.items():
            torch.testing.assert_close(p, expected[n], rtol=TOL, atol=TOL)
            assert torch.equal(p, ranks[0][n]), f"{n} differs between ranks"
            assert not torch.allclose(p, initial[n].detach())  # the runs did move


def test_stalled_rank_times_out_with_a_clear_error(runs):
    out = runs["results"][0]["failures"]
    assert out["timeout_error"] is not None
    assert out["timeout_error"].startswith("TimeoutError: sharpgen: the collective")
    assert out["timeout_seconds"] < 15  # the group's 2 s timeout, not a hang


def test_raising_rank_makes_the_others_fail_fast(runs):
    assert "rank 1 fails on purpose" in runs["results"][1]["error"]
    assert runs["codes"][1] != 0
    out = runs["results"][0]["failures"]
    assert out["crash_error"] is not None
    assert out["crash_error"].startswith("ConnectionError: sharpgen: the collective")
    assert "Another process of the group probably raised" in out["crash_error"]
    assert out["crash_seconds"] < 15
    assert runs["codes"][0] == 0 and runs["codes"][2] == 0
