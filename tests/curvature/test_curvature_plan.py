"""The memory plan: its formula, its choices within a budget, and the measures that follow it."""

from __future__ import annotations

import tempfile

import pytest
import torch

from sharpgen.curvature import MemoryPlan, plan_memory
from sharpgen.curvature._plan import BASIS_SHARE, MARGIN, available_bytes, check_memory_budget
from sharpgen.linalg import hutchinson_trace
from sharpgen.sharpness import hessian_trace, top_eigenvalues

CPU = torch.device("cpu")
F32 = torch.float32


def test_the_planned_bytes_are_the_formula():
    plan = plan_memory("m", numel=1000, dtype=torch.float64, device=CPU, memory_budget=10**9,
                       graph_bytes=123, work_vectors=4, block_width=3, k=2)  # fmt: skip
    v = 8000
    assert plan.vector_bytes == v and plan.block_width == 3
    assert plan.basis_vectors == 40 and plan.basis_storage == "device"  # max(2k + 20, 40)
    assert plan.planned_bytes == 123 + (4 + 2 * 3 + 40) * v
    assert isinstance(plan, MemoryPlan) and "basis 40 on device" in repr(plan)


def test_the_basis_takes_its_share_of_the_budget_and_at_least_k_plus_3():
    v = 10**6 * 4
    budget = 200 * v
    plan = plan_memory("m", numel=10**6, dtype=F32, device=CPU, memory_budget=budget,
                       graph_bytes=50 * v, work_vectors=10, k=1)  # fmt: skip
    assert plan.basis_vectors == int(BASIS_SHARE * (budget - 60 * v) // v) == 14
    assert plan.basis_storage == "device"
    # k = 5: where fewer than 2k + 6 fit, 2k + 6 go to a file (never below k + 3) ...
    tight = plan_memory("m", numel=10**6, dtype=F32, device=CPU, memory_budget=30 * v, k=5)
    assert tight.basis_vectors == 16 and tight.basis_storage == "disk"
    assert tight.planned_bytes == 0  # ... not in memory
    # on CUDA the basis goes to host memory only where k + 3 do not fit, with k + 3 vectors
    cuda = plan_memory("m", numel=10**6, dtype=F32, device=torch.device("cuda"),
                       memory_budget=30 * v, k=5)  # fmt: skip
    assert cuda.basis_vectors == 8 and cuda.basis_storage == "host"
    # a float16 basis counts two bytes a number
    half = plan_memory("m", numel=10**6, dtype=F32, device=CPU, memory_budget=200 * v, k=1,
                       basis_dtype=torch.float16)  # fmt: skip
    assert half.basis_vectors == 40 and half.planned_bytes == 40 * v // 2


def test_no_budget_and_fixed_choices_are_reported_as_given():
    plan = plan_memory("m", numel=500, dtype=F32, device=CPU, memory_budget=None, k=3)
    assert plan.budget is None and plan.basis_vectors == 40
    plan = plan_memory("m", numel=10**6, dtype=F32, device=CPU, memory_budget=10, k=1,
                       max_basis=12, basis_storage="host")  # fmt: skip
    assert plan.basis_vectors == 12 and plan.basis_storage == "host"
    assert plan.planned_bytes == 12 * 4 * 10**6  # host memory is the CPU's own memory


def test_the_probe_block_narrows_to_what_fits():
    v = 4000
    plan = plan_memory("m", numel=1000, dtype=F32, device=CPU, memory_budget=9 * v,
                       work_vectors=1, block_width=32)  # fmt: skip
    assert plan.block_width == 4  # 1 + 2 * 4 <= 9
    plan = plan_memory("m", numel=1000, dtype=F32, device=CPU, memory_budget=1,
                       block_width=32)  # fmt: skip
    assert plan.block_width == 1


def test_auto_budget_reads_the_free_memory():
    free = available_bytes(CPU)
    assert free is not None and free > 0
    plan = plan_memory("m", numel=10, dtype=F32, device=CPU)
    assert plan.budget is not None and 0 < plan.budget <= MARGIN * 2 * free


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("lots", ValueError, "memory_budget must be 'auto', None or a number of bytes, got 'lots'"),
        (-5, TypeError, "memory_budget must be 'auto', None or a positive int of bytes, got -5"),
        (1.5, TypeError, "positive int of bytes, got 1.5"),
    ],
)
def test_bad_budgets_are_refused(value, error, match):
    with pytest.raises(error, match=match):
        check_memory_budget(value)


def test_top_eigenvalues_within_a_small_budget_is_certified(h, monkeypatch, tmp_path):
    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    H = h.dense_hessian(model, h.mse, x, y)
    truth = torch.linalg.eigvalsh(H).flip(0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for k in (1, 3):
        res = top_eigenvalues(model, h.mse, (x, y), k=k, tol=1e-8, memory_budget=1,
                              generator=h.g(k))  # fmt: skip
        assert res.memory.basis_vectors == 2 * k + 6 and res.memory.basis_storage == "disk"
        assert res.converged and res.num_restarts > 0
        torch.testing.assert_close(res.eigenvalues, truth[:k], rtol=1e-8, atol=0)
        free = top_eigenvalues(model, h.mse, (x, y), k=k, tol=1e-8, memory_budget=None,
                               generator=h.g(k))  # fmt: skip
        assert free.memory.basis_vectors == min(40, H.shape[0]) and free.num_restarts == 0
        torch.testing.assert_close(res.eigenvalues, free.eigenvalues, rtol=1e-8, atol=0)
    assert list(tmp_path.iterdir()) == []


def test_top_eigenvalues_checks_its_memory_arguments(h):
    model = h.make_mlp(0)
    data = h.regression_data(12)
    with pytest.raises(ValueError, match="memory_budget must be"):
        top_eigenvalues(model, h.mse, data, memory_budget="all")
    with pytest.raises(ValueError, match="basis_storage"):
        top_eigenvalues(model, h.mse, data, basis_storage="cloud")
    with pytest.raises(ValueError, match="max_basis must be an int >= 3"):
        top_eigenvalues(model, h.mse, data, max_basis=2)


def test_hessian_trace_within_a_small_budget(h):
    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    H = h.dense_hessian(model, h.mse, x, y)
    est = hessian_trace(model, h.mse, (x, y), method="exact", memory_budget=1)
    assert est.memory.block_width == 1
    assert est.value == pytest.approx(float(H.trace()), rel=1e-12)
    # Hutchinson's probes one at a time: the estimate of a one-probe block
    est = hessian_trace(model, h.mse, (x, y), method="hutchinson", num_matvecs=3,
                        memory_budget=1, generator=h.g(0))  # fmt: skip
    ref = hutchinson_trace(H, num_matvecs=3, block_size=1, generator=h.g(0))
    assert est.memory.block_width == 1
    assert est.value == pytest.approx(ref.value, rel=1e-10)
    wide = hessian_trace(model, h.mse, (x, y), method="hutchinson", num_matvecs=3,
                         memory_budget=None, generator=h.g(0))  # fmt: skip
    assert wide.memory.block_width == 3


def test_a_cpu_basis_stays_within_its_cap():
    from sharpgen.curvature._plan import BASIS_CPU_BYTES

    v = 16 * 2**20 * 4  # 16M float32 parameters: 64 MiB a vector
    plan = plan_memory("m", numel=4 * 2**20, dtype=F32, device=CPU, memory_budget=2**40, k=1)
    assert plan.basis_vectors == BASIS_CPU_BYTES // (v // 4) == 16
    assert plan.basis_storage == "device"
    # fewer than 2k + 6 = 8 vectors in the cap: 8 in a file (no resident memory) ...
    plan = plan_memory("m", numel=16 * 2**20, dtype=F32, device=CPU, memory_budget=2**40, k=1)
    assert BASIS_CPU_BYTES // v == 4 and (plan.basis_vectors, plan.basis_storage) == (8, "disk")
    plan = plan_memory("m", numel=64 * 2**20, dtype=F32, device=CPU, memory_budget=2**40, k=1)
    assert plan.basis_vectors == 8 and plan.basis_storage == "disk"


def test_auto_shares_the_free_memory_between_the_processes_of_a_host(monkeypatch):
    import sharpgen.curvature._plan as P

    monkeypatch.setattr(P, "available_bytes", lambda device: 10 * 2**30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = plan_memory("m", numel=10, dtype=F32, device=CPU)
    assert alone.budget == int(MARGIN * 10 * 2**30) and P.local_processes(CPU) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node=2: one host
    assert plan_memory("m", numel=10, dtype=F32, device=CPU).budget == alone.budget // 2
    assert plan_memory("m", numel=10, dtype=F32, device=CPU, memory_budget=7).budget == 7
    # CUDA: the host's processes spread over its devices (4 ranks on 2 GPUs: 2 per GPU)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert P.local_processes(torch.device("cuda", 0)) == 2 and P.local_processes(CPU) == 4
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert P.local_processes(torch.device("cuda", 0)) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert P.local_processes(CPU) == 1
