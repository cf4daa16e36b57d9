"""Sharpness measures and SAM training under DistributedDataParallel, launcher-agnostic.

Run it any of these ways (CPU, gloo; on GPUs pass --backend nccl):

    torchrun --nproc_per_node=2 examples/ddp_sharpness.py     # torchrun starts the processes
    python examples/ddp_sharpness.py --nproc 2                 # this script spawns 2 processes
    python examples/ddp_sharpness.py                           # one process, no torch.distributed

Every process trains a DDP-wrapped MLP with SAM (`ddp_sam_step`) on its shard of a synthetic
regression dataset, then measures the Hessian trace, the top Hessian eigenvalue and the SAM
sharpness of the *whole* dataset: each process multiplies on its shard and the products are
summed with one all-reduce per block product, so every process prints the same numbers, equal
to what a single process computes on all the data (the last line checks it on rank 0).
"""

from __future__ import annotations

import argparse
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from sharpgen.optim import SAM, ddp_sam_step
from sharpgen.sharpness import hessian_trace, sam_sharpness, top_eigenvalues

N_SAMPLES = 203  # not divisible by 2 or 3: DistributedSampler pads, sharpgen drops the padding


def make_problem(device: torch.device) -> tuple[nn.Module, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 8, generator=g, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(8, 1, generator=g, dtype=torch.float64))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    return model.to(device), TensorDataset(x.to(device), y.to(device))


def run(args: argparse.Namespace) -> None:
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    cuda = args.backend == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model, dataset = make_problem(device)
    loss_fn = nn.functional.mse_loss
    net = DistributedDataParallel(model) if distributed else model
    sampler = DistributedSampler(dataset, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, shuffle=sampler is None)

    # SAM training: one synchronized perturbation per step (single-process SAM on the global
    # batch); perturbation="per_rank" would be m-SAM with m = the per-process batch.
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                return loss

            ddp_sam_step(net, opt, closure, perturbation="synchronized")

    # Measures over the whole dataset. process_group="auto" (the default) picks the DDP
    # group; the DataLoader's DistributedSampler padding is dropped, the model unwrapped.
    eval_sampler = DistributedSampler(dataset, shuffle=False) if distributed else None
    eval_loader = DataLoader(dataset, batch_size=64, sampler=eval_sampler)
    gen = torch.Generator().manual_seed(1)  # the same seed on every process
    trace = hessian_trace(net, loss_fn, eval_loader, method="hutchpp", num_matvecs=60,
                          generator=gen)  # fmt: skip
    eig = top_eigenvalues(net, loss_fn, eval_loader, k=1, tol=1e-6,
                          generator=torch.Generator().manual_seed(2))  # fmt: skip
    sam = sam_sharpness(net, loss_fn, eval_loader, rho=0.05, steps=3)
    print(
        f"[rank {rank}/{world}] loss={sam.loss:.6f} trace~{trace.value:.6f} "
        f"(+-{trace.stderr:.2g}) lambda_max={float(eig.eigenvalues[0]):.6f} "
        f"sam_sharpness={sam.value:.6f}",
        flush=True,
    )
    if rank == 0 and distributed:
        # the same measure on one process over all the data, without communication
        full = (dataset.tensors[0], dataset.tensors[1])
        single = top_eigenvalues(net.module, loss_fn, full, k=1, tol=1e-6, process_group=None,
                                 generator=torch.Generator().manual_seed(2))  # fmt: skip
        print(f"[rank 0] single-process lambda_max={float(single.eigenvalues[0]):.6f}")


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    _main_distributed(args)


def _main_distributed(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(args.backend, timeout=timedelta(seconds=args.timeout))
    try:
        if args.backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        run(args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=1, help="processes to spawn (no torchrun)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout (s)")
    args = parser.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        _main_distributed(args)
    elif args.nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args.nproc, port, args), nprocs=args.nproc, join=True)
    else:
        run(args)


if __name__ == "__main__":
    main()
