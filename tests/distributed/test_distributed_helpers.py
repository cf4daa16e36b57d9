"""Single-process tests of the torch.distributed helpers (no process group is initialized)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from sharpgen import ddp_sam_step, shard_indices, without_sampler_padding
from sharpgen._distributed import (
    _count_parts,
    _join_count,
    resolve_process_group,
    unwrap_model,
)
from sharpgen.curvature._sharding import UnpaddedLoader
from sharpgen.optim import GSAM, SAM, WSAM, LookSAM
from sharpgen.sharpness import hessian_trace


# -- shards and DistributedSampler padding --
@pytest.mark.parametrize(("n", "world"), [(0, 1), (10, 3), (11, 2), (2, 5), (7, 7)])
def test_shard_indices_partition_the_dataset(n, world):
    shards = [list(shard_indices(n, r, world)) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))  # contiguous, in order, no repeats
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_indices_without_a_group_is_everything():
    assert shard_indices(5) == range(5)  # no process group: rank 0 of 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": -1}, "n must be an int >= 0"),
        ({"n": 4, "rank": 0, "world_size": 0}, "world_size must be an int >= 1"),
        ({"n": 4, "rank": 3, "world_size": 3}, r"rank must be an int in \[0, 3\)"),
    ],
)
def test_shard_indices_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shard_indices(**kwargs)


@pytest.mark.parametrize(("n", "world"), [(11, 3), (10, 4), (5, 2), (9, 3)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_without_sampler_padding_counts_every_sample_once(n, world, shuffle):
    ds = TensorDataset(torch.arange(n, dtype=torch.float64), torch.arange(n) * 10)
    seen, padded = [], 0
    for rank in range(world):
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=3)
        loader = DataLoader(ds, batch_size=2, sampler=sampler)
        padded += sum(x.numel() for x, _ in loader)
        wrapped = without_sampler_padding(loader)
        for x, y in wrapped:
            assert torch.equal(y, x.long() * 10)  # inputs and targets cut together
            seen += x.long().tolist()
        assert list(wrapped) and len(wrapped) >= 1  # re-iterable
    assert sorted(seen) == list(range(n))
    assert padded == -(-n // world) * world


def test_without_sampler_padding_leaves_other_data_alone():
    ds = TensorDataset(torch.zeros(6), torch.zeros(6))
    even = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=3, rank=0))
    plain = DataLoader(ds, batch_size=4)
    batch = (torch.zeros(3, 2), torch.zeros(3))
    for data in (even, plain, batch, [batch]):
        assert without_sampler_padding(data) is data
    dropped = DistributedSampler(ds, num_replicas=4, rank=0, drop_last=True)
    assert without_sampler_padding(DataLoader(ds, sampler=dropped)).__class__ is DataLoader
    padded = DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=4, rank=3))
    assert isinstance(without_sampler_padding(padded), UnpaddedLoader)


def test_padding_dropped_inside_the_measures():
    """Per-rank exact traces of the de-duplicated shards add up to the full-data trace."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 2, generator=g, dtype=torch.float64), torch.zeros(7, 1).double()
    model = nn.Linear(2, 1).double()
    full = hessian_trace(model, nn.functional.mse_loss, (x, y), method="exact").value
    total = 0.0
    for rank in range(3):
        sampler = DistributedSampler(TensorDataset(x, y), num_replicas=3, rank=rank)
        loader = DataLoader(TensorDataset(x, y), batch_size=2, sampler=sampler)
        local = hessian_trace(model, nn.functional.mse_loss, loader, method="exact",
                              process_group=None).value  # fmt: skip
        total += local * len(range(rank, 7, 3))  # sample-weighted: the mean over all 7
    assert total / 7 == pytest.approx(full, rel=1e-12)


# -- the count travels with the partial sums --
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_count_parts_sum_exactly(dtype):
    counts = [5_000_000_001, 16_777_217, 3, 0, 2047, 2048 * 2048 + 5]
    summed = torch.stack([torch.tensor(_count_parts(c, dtype), dtype=dtype) for c in counts])
    assert _join_count(summed.sum(0)) == sum(counts)
    assert _count_parts(1, torch.float16) is None  # half precision: a separate count


# -- process group policy and model unwrapping --
def test_resolve_process_group_without_torch_distributed():
    assert resolve_process_group("auto") is None  # not initialized: no communication
    assert resolve_process_group(None) is None
    with pytest.raises(ValueError, match="process_group must be 'auto', None"):
        resolve_process_group("world")
    with pytest.raises(TypeError, match="torch.distributed.ProcessGroup"):
        resolve_process_group(3)


def test_unwrap_model():
    model = nn.Linear(2, 1)
    assert unwrap_model(nn.DataParallel(nn.DataParallel(model))) is model
    assert unwrap_model(model) is model


def test_measures_accept_a_data_parallel_wrapper():
    model = nn.Linear(3, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = (x, torch.zeros(5, 1, dtype=torch.float64))
    ref = hessian_trace(model, nn.functional.mse_loss, data, method="exact").value
    wrapped = hessian_trace(nn.DataParallel(model), nn.functional.mse_loss, data, method="exact")
    assert wrapped.value == ref


# -- ddp_sam_step on one process --
def _setup(cls, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model, **kw)
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return model, opt, closure


@pytest.mark.parametrize(
    ("cls", "kw"), [(SAM, {"rho": 0.1}), (GSAM, {"rho_max": 0.1, "alpha": 0.2})]
)
@pytest.mark.parametrize("perturbation", ["per_rank", "synchronized"])
def test_ddp_sam_step_single_process_is_the_optimizer_step(cls, kw, perturbation):
    m1, o1, c1 = _setup(cls, **kw)
    m2, o2, c2 = _setup(cls, **kw)
    for _ in range(3):
        l1 = o1.step(c1)
        l2 = ddp_sam_step(m2, o2, c2, perturbation=perturbation)
        assert torch.equal(l1, l2)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n  # parameters and BatchNorm buffers (updated once per step)
    assert o2.last_step_info.perturbed and o2.last_step_info.stepped


def test_ddp_sam_step_restores_the_weights_when_the_second_pass_raises():
    model, opt, closure = _setup(SAM, rho=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("second pass")
        return closure()

    with pytest.raises(KeyError, match="second pass"):
        ddp_sam_step(model, opt, failing)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert not opt.perturbed
    ddp_sam_step(model, opt, closure)  # usable afterwards


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("model", "opt", "closure"), {"perturbation": "global"}, ValueError,
         "perturbation must be one of"),
        (("model", "sgd", "closure"), {}, TypeError, "optimizer must be a sharpgen.optim.SAM"),
        (("model", "opt", "nope"), {}, TypeError, "closure must be callable"),
        (("nope", "opt", "closure"), {}, TypeError, "model must be a torch.nn.Module"),
        (("model", "opt", "closure"), {"process_group": 7}, TypeError, "ProcessGroup"),
    ],
)  # fmt: skip
def test_ddp_sam_step_bad_input(args, kwargs, error, match):
    model, opt, closure = _setup(SAM, rho=0.1)
    objects = {"model": model, "opt": opt, "closure": closure, "nope": 3,
               "sgd": torch.optim.SGD(model.parameters(), lr=0.1)}  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        ddp_sam_step(*(objects[a] for a in args), **kwargs)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


@pytest.mark.parametrize(
    ("cls", "kw"),
    [(SAM, {"rho": 0.1, "interval": 2}), (LookSAM, {"rho": 0.1}), (WSAM, {"rho": 0.1})],
)
def test_ddp_sam_step_refuses_the_other_variants_with_the_recipe(cls, kw):
    model, opt, closure = _setup(cls, **kw)
    with pytest.raises(TypeError, match=r"DistributedDataParallel and call optimizer.step"):
        ddp_sam_step(model, opt, closure)
