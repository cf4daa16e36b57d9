"""Per-process peak memory of a measure on data-parallel shards: 2 processes against 1.

For every call, one process on the whole batch, one process on one shard alone (rank 0's:
what a rank would hold without any communication) and ``torchrun --nproc_per_node=2``
(gloo, CPU) with each process holding its contiguous shard of the same batch
(`sharpgen.shard_indices`) run in fresh processes, interleaved call by call. Each process
reads its own peak resident set (``VmHWM`` of ``/proc/self/status``, reset with
``/proc/self/clear_refs`` after the model, the batch and the process group are built, as
``benchmarks/bench_memory.py`` does; model included) and the value; the table gives each
2-process rank's peak against both 1-process peaks and the value's relative difference.

Model: Hugging Face ``GPT2LMHeadModel(GPT2Config(n_layer, n_embd, n_head))`` with random
weights (float32, CPU, one thread per process), ``--batch`` x ``--tokens`` random tokens
(the model's own loss; all sequences have the same length, so the sample-weighted mean over
shards is the token mean), attention on the math path. Calls: ``grad`` (a gradient step:
forward and backward on the process's shard, gradients averaged over the processes with one
bucketed all-reduce (`sharpgen._distributed.average_gradients_`), SGD step; the value is the
global loss), ``trace`` (`hessian_trace`, 3 Hutchinson products), ``top1``
(`top_eigenvalues`, k=1, tol 1e-3), ``sam`` (`sam_sharpness`, rho 0.05).

Examples::

    PYTHONPATH=. python benchmarks/bench_distributed_memory.py            # 4 x 256, 8 x 128
    PYTHONPATH=. python benchmarks/bench_distributed_memory.py --layers 12 --embd 768 \\
        --batch 4 --tokens 64 --calls grad,sam        # GPT-2 small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CALLS = ("grad", "trace", "top1", "sam")


def _status(key: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharpgen import shard_indices

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=max(1, args.embd // 64))
    model = GPT2LMHeadModel(cfg).eval()  # dropout off: a deterministic function
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), generator=g)
    # the 1-process baseline of one shard (--shard): rank 0's shard of --nproc processes
    rows = shard_indices(args.batch, rank, world if world > 1 else args.shard)
    ids = ids[rows.start : rows.stop].clone()  # this process's shard only
    data = ({"input_ids": ids, "labels": ids}, None)

    def loss_fn(out: Any, _: Any) -> Any:
        return out.loss

    gen = torch.Generator().manual_seed(2)
    out: dict[str, Any] = {"call": name, "rank": rank, "world": world, "samples": len(rows)}
    out["params"] = sum(p.numel() for p in model.parameters())
    rss0 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    with sdpa_kernel([SDPBackend.MATH]):
        if name == "grad":
            from sharpgen._distributed import all_reduce_, average_gradients_

            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            loss = model(**data[0]).loss
            loss.backward()
            total = torch.tensor([float(loss) * len(rows), len(rows)], dtype=torch.float64)
            if world > 1:
                average_gradients_(model.parameters(), dist.group.WORLD)
                all_reduce_(total, dist.group.WORLD, what="the loss")
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
            opt.step()
            out.update(value=float(total[0] / total[1]), grad_norm=float(norm))
        elif name == "trace":
            from sharpgen import hessian_trace

            r = hessian_trace(model, loss_fn, data, method="hutchinson", num_matvecs=3,
                              generator=gen)  # fmt: skip
            out.update(value=r.value, plan=repr(r.memory))
        elif name == "top1":
            from sharpgen import top_eigenvalues

            r = top_eigenvalues(model, loss_fn, data, k=1, tol=1e-3, generator=gen)
            out.update(value=float(r.eigenvalues[0]), products=r.num_matvecs,
                       converged=bool(r.converged), plan=repr(r.memory))  # fmt: skip
        elif name == "sam":
            from sharpgen import sam_sharpness

            out.update(value=float(sam_sharpness(model, loss_fn, data, rho=0.05)))
        else:
            raise SystemExit(f"unknown call {name!r}; choose from {CALLS}")
    out.update(seconds=time.perf_counter() - t0, rss_before=rss0, peak=_status("VmHWM"))
    if world > 1:
        dist.destroy_process_group()
    return out


def _run(name: str, world: int, args: argparse.Namespace, shard: int = 1) -> list[dict[str, Any]]:
    skip = ("calls", "child", "nproc", "shard", "out")
    argv = [f"--{k}={v}" for k, v in vars(args).items() if k not in skip]
    out = tempfile.mkdtemp(prefix="bench_dist_mem_")  # one file per rank
    script = [os.path.abspath(__file__), *argv, "--child", name, f"--shard={shard}", f"--out={out}"]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", *script]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    files = sorted(Path(out).glob("rank*.json"))
    found = [json.loads(f.read_text()) for f in files]
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode or len(found) != world:
        print(f"{name} on {world}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
        return []
    return sorted(found, key=lambda r: r["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--calls", default=",".join(CALLS))
    p.add_argument("--child", default="")
    p.add_argument("--shard", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        res = _child(args.child, args)
        Path(args.out, f"rank{res['rank']}.json").write_text(json.dumps(res))
        return
    print(f"load before: {os.getloadavg()}", flush=True)
    table = []
    for name in args.calls.split(","):
        one = _run(name, 1, args)
        part = _run(name, 1, args, shard=args.nproc)
        many = _run(name, args.nproc, args)
        for r in one + part + many:
            print(json.dumps(r), flush=True)
        if one and part and many:
            table.append((name, one[0], part[0], many))
    if not table:
        return
    params = table[0][1]["params"]
    print(f"\nGPT-2 {args.layers} x {args.embd} ({params / 1e6:.1f}M params), batch "
          f"{args.batch} x {args.tokens} tokens; load after {os.getloadavg()}")  # fmt: skip
    ranks = " | ".join(f"rank {r}" for r in range(args.nproc))
    print(
        "Peak RSS in GB (in parentheses: above the RSS before the call, i.e. beyond the "
        "model, batch, libraries and process group)"
    )
    print(f"| call | 1 process, whole batch | 1 process, one shard | {ranks} | max rank / "
          "whole batch | max rank / one shard | value (1 process) | max relative "
          "difference |")  # fmt: skip
    print("|---|---|---|" + "---|" * args.nproc + "---|---|---|---|")

    def gb(r: dict[str, Any]) -> str:
        return f"{r['peak'] / 1e9:.2f} ({(r['peak'] - r['rss_before']) / 1e9:.2f})"

    for name, one, part, many in table:
        top = max(r["peak"] for r in many)
        diff = max(abs(r["value"] - one["value"]) / abs(one["value"]) for r in many)
        print(f"| {name} | {gb(one)} | {gb(part)} | {' | '.join(gb(r) for r in many)} | "
              f"{top / one['peak']:.2f} | {top / part['peak']:.2f} | {one['value']:.6g} | "
              f"{diff:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
