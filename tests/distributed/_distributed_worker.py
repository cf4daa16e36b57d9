"""Worker processes of the distributed tests (launched like torchrun: RANK, WORLD_SIZE, ...).

``python _distributed_worker.py OUTDIR`` with the environment variables ``RANK``,
``WORLD_SIZE=3``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. All ranks run the measures over the
default group (3 processes, ``process_group="auto"``); ranks 0 and 1 then run them again over a
2-process group, train with the SAM variants over it, and finally act out the failure
scenarios. Each rank writes its results to ``OUTDIR/rank{RANK}.pt``; the test process compares
them with single-process values. The problem builders are shared with the tests.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

N_SAMPLES = 11  # not divisible by 2 or 3: uneven shards and DistributedSampler padding
SAM_BATCH = 8  # global batch of the SAM runs (4 per rank on 2 ranks)
SAM_STEPS = 20


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def build_data(n: int = N_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum(dim=1).mean()


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 3) -> list:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def measures(model: nn.Module, data, **kw) -> dict:
    """The measures compared between the distributed and the single-process runs."""
    import sharpgen.sharpness as S
    from sharpgen.curvature import GGNOperator

    out = {}
    out["trace_exact"] = S.hessian_trace(model, loss_fn, data, method="exact", **kw).value
    out["trace_hutchinson"] = S.hessian_trace(
        model, loss_fn, data, method="hutchinson", num_matvecs=8, generator=gen(1), **kw
    ).value
    eig = S.top_eigenvalues(model, loss_fn, data, k=1, tol=1e-10, generator=gen(2), **kw)
    out["lambda_max"] = float(eig.eigenvalues[0])
    sam = S.sam_sharpness(model, loss_fn, data, rho=0.05, steps=3, **kw)
    out["sam_sharpness"], out["sam_loss"] = sam.value, sam.loss
    out["average_sharpness"] = S.average_sharpness(
        model, loss_fn, data, rho=0.01, num_samples=4, generator=gen(3), **kw
    ).value
    out["m_sharpness"] = S.sam_sharpness(model, loss_fn, data, rho=0.05, m=1, **kw).value
    slq = S.spectral_density(
        model, loss_fn, data, num_probes=2, num_steps=6, generator=gen(4), **kw
    )
    out["slq_nodes"] = slq.nodes
    G = GGNOperator(model, loss_fn, data, **kw)
    out["ggn_matvec"] = G.matvec(torch.ones(G.shape[0], dtype=torch.float64))
    return out


def disagreements(rank: int, model: nn.Module, data) -> dict:
    """Ranks that pass different seeds or parameter selections: a ValueError on every rank."""
    from sharpgen.sharpness import average_sharpness, hessian_trace

    cases = {
        "probe_seed": lambda: hessian_trace(
            model, loss_fn, data, method="hutchinson", num_matvecs=2, generator=gen(10 + rank)
        ),
        "generator_state": lambda: average_sharpness(
            model, loss_fn, data, rho=0.01, num_samples=2, generator=gen(10 + rank)
        ),
        "parameters": lambda: hessian_trace(
            model, loss_fn, data, method="exact", params=["0.weight"] if rank == 0 else None
        ),
    }
    out = {}
    for name, call in cases.items():
        try:
            call()
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


# -- jobs ------------------------------------------------------------------------------------------
def job_measures(rank: int, world: int, group) -> dict:
    """The measures on this rank's shard, over ``group`` (None: the default group, "auto")."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from sharpgen import shard_indices
    from sharpgen.curvature import HessianOperator
    from sharpgen.sharpness import hessian_trace

    x, y = build_data()
    idx = list(shard_indices(N_SAMPLES, rank, world))
    local = batches(x[idx], y[idx])
    model = build_model()
    kw = {} if group is None else {"process_group": group}
    res = {"shard_size": len(idx)}
    res.update(measures(model, local, **kw))
    # DistributedDataParallel model ("auto" takes its group) and a padding DistributedSampler
    ddp = DistributedDataParallel(build_model(), process_group=group)
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=5)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler)
    res["padded_local_samples"] = len(sampler)
    res["trace_ddp_sampler"] = hessian_trace(ddp, loss_fn, loader, method="exact").value
    # communication per block product: wrap dist.all_reduce
    H = HessianOperator(
        model, loss_fn, local, process_group=group if group is not None else dist.group.WORLD
    )
    H.matvec(torch.ones(H.shape[0], dtype=torch.float64))  # the first product checks the probes
    calls, pointers = [], []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel() * tensor.element_size())
        pointers.append(tensor.data_ptr())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        product = H.matmat(torch.ones(H.shape[0], 4, dtype=torch.float64))
    finally:
        dist.all_reduce = original
    res["allreduce_bytes_per_block"] = calls
    # reduced in place: the block buffer with room for 3 count limbs, not a (pk + 1) copy
    size = product.untyped_storage().nbytes()
    res["allreduce_in_place"] = (
        pointers == [product.data_ptr()] and size == (4 * H.shape[0] + 3) * 8
    )
    res["numel"] = H.shape[0]
    if group is None:
        res["disagreements"] = disagreements(rank, model, local)
        res["reduce_partials"] = reduce_checks(rank)
        res["plans"] = plan_checks(rank, model, local)
    return res


def plan_checks(rank: int, model: nn.Module, data) -> dict:
    """Ranks with different budgets and graphs make one plan (the smallest budget, largest graph).

    Rank 0 allows 1 byte, the others 1 GB: without agreement rank 0 would keep a basis of
    2k + 6 vectors in a file and narrow the probe block to 1, the others not, and their
    products would fall out of step.
    """
    import torch.distributed as dist

    from sharpgen.curvature import plan_memory
    from sharpgen.sharpness import hessian_trace, top_eigenvalues

    budget = 1 if rank == 0 else 10**9
    plan = plan_memory("m", numel=1000, dtype=torch.float32, device=torch.device("cpu"),
                       memory_budget=(rank + 1) * 10**6, graph_bytes=100 * rank, k=1,
                       block_width=8, process_group=dist.group.WORLD)  # fmt: skip
    eig = top_eigenvalues(model, loss_fn, data, k=1, tol=1e-10, generator=gen(2),
                          memory_budget=budget)  # fmt: skip
    tr = hessian_trace(model, loss_fn, data, method="hutchinson", num_matvecs=8,
                       generator=gen(1), memory_budget=budget)  # fmt: skip
    # micro_batch_size="auto": rank 0's 1 byte fits no graph; alone, the others would
    # take whole batches, agreed every rank takes one sample at a time
    auto = hessian_trace(model, loss_fn, data, method="exact", micro_batch_size="auto",
                         memory_budget=budget)  # fmt: skip
    return {"plan": plan, "lambda_max": float(eig.eigenvalues[0]), "eig_plan": eig.memory,
            "trace_hutchinson": tr.value, "trace_plan": tr.memory,
            "trace_auto": auto.value, "auto_plan": auto.memory}  # fmt: skip


def reduce_checks(rank: int) -> dict:
    """reduce_partials in float32 (count in limbs), bfloat16 (separate count), mixed dtypes."""
    import torch.distributed as dist

    from sharpgen._distributed import empty_with_count_room, reduce_partials

    group = dist.group.WORLD
    count = 3_000_000_000 + rank  # beyond float32's exact integers
    out = {}
    for name, dtypes in (
        ("float32", [torch.float32]),
        ("bfloat16", [torch.bfloat16]),
        ("mixed", [torch.float32, torch.float64]),
    ):
        parts = [torch.full((2,), float(rank + 1), dtype=d) for d in dtypes]
        sums, total = reduce_partials(parts, count, group)
        out[name] = ([s.tolist() for s in sums], [s.dtype for s in sums], total)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):  # room for the count: in place
        part = empty_with_count_room((2,), dtype, torch.device("cpu")).fill_(rank + 1)
        (s,), total = reduce_partials([part], count, group)
        out[f"room_{dtype}"] = (s.tolist(), s.dtype, total, s.data_ptr() == part.data_ptr())
    return out


def run_sam(rank: int, pair) -> dict:
    """The SAM variants on the 2-rank group (DDP over it; "auto" takes the DDP group)."""
    from torch.nn.parallel import DistributedDataParallel

    from sharpgen import shard_indices
    from sharpgen.optim import ddp_sam_step

    x, y = build_data(SAM_BATCH)
    idx = list(shard_indices(SAM_BATCH, rank, 2))
    xr, yr = x[idx], y[idx]
    out = {}
    for name, steps in (
        ("sam_synchronized", SAM_STEPS),
        ("sam_per_rank", 5),
        ("gsam_per_rank", 5),
        ("gsam_synchronized", 5),
    ):
        ddp = DistributedDataParallel(build_model(), process_group=pair)
        opt = make_optimizer(name, ddp.parameters())

        def closure(ddp=ddp, opt=opt):
            opt.zero_grad()
            loss = loss_fn(ddp(xr), yr)
            loss.backward()
            return loss

        kind = "synchronized" if name.endswith("synchronized") else "per_rank"
        for _ in range(steps):
            ddp_sam_step(ddp, opt, closure, perturbation=kind, check=True)
        out[name] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    return out


def make_optimizer(name: str, params):
    from sharpgen.optim import GSAM, SAM

    if name.startswith("gsam"):
        return GSAM(params, torch.optim.SGD, rho_max=0.1, alpha=0.3, lr=0.1, momentum=0.9)
    return SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)


def run_failures(rank: int, pair) -> dict:
    """Rank 1 first does not call (rank 0 times out), then raises (rank 0 fails fast)."""
    import torch.distributed as dist

    from sharpgen.sharpness import hessian_trace

    x, y = build_data()
    model = build_model()
    out = {}
    short = dist.new_group([0, 1], backend="gloo", timeout=timedelta(seconds=2))
    if rank == 0:  # rank 1 is alive (waiting in the barrier below) but does not call
        t0 = time.perf_counter()
        try:
            hessian_trace(model, loss_fn, (x, y), method="exact", process_group=short)
            out["timeout_error"] = None
        except OSError as exc:
            out["timeout_error"] = f"{type(exc).__name__}: {exc}"
        out["timeout_seconds"] = time.perf_counter() - t0
    dist.barrier()
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    if rank == 0:
        t0 = time.perf_counter()
        try:
            hessian_trace(model, loss_fn, (x, y), method="exact", process_group=pair)
            out["crash_error"] = None
        except OSError as exc:
            out["crash_error"] = f"{type(exc).__name__}: {exc}"
        out["crash_seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    outdir = Path(sys.argv[1])
    torch.set_num_threads(1)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    path = outdir / f"rank{rank}.pt"
    result: dict = {}
    try:
        result["world"] = job_measures(rank, world, None)  # all ranks, process_group="auto"
        pair = dist.new_group([0, 1])  # a 2-process group (rank 2 waits)
        if rank < 2:
            result["pair"] = job_measures(rank, 2, pair)
            result["sam"] = run_sam(rank, pair)
        dist.barrier()
        torch.save(result, path)  # before the failure scenarios, which break the group
        result["failures"] = run_failures(rank, pair)
    except BaseException:
        result["error"] = traceback.format_exc()
        torch.save(result, path)
        raise
    torch.save(result, path)


if __name__ == "__main__":
    main()
