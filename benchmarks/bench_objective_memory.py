"""Peak memory of one measure call on a Hugging Face GPT-2, each call in its own process.

Every (call, tree, options) runs in a fresh Python process that builds the model and the
batch, reads its peak resident memory (``ru_maxrss``), makes the one call and reads the
peak again; rounds are interleaved. The table gives each call's peak (the whole process:
Python, torch, model and batch included) and its ratio to a plain gradient step's peak on
the same model and batch (``loss.backward()``), and the increment over the process's peak
before the call.

``--old REV`` measures a git revision side by side with the working tree (``git archive``
into a temporary directory; only the options that revision knows are run on it), so a
change's before/after comes from one command on one machine state. ``--profile CALL``
prints torch.profiler's memory table (``profile_memory=True``) of one call instead: where
the bytes of that call are allocated.

The model is GPT-2 (random weights, float32, dropout 0, ``attn_implementation="eager"``:
attention from differentiable torch operations, which every curvature product needs) with
the sizes given; the batch is ``--batch`` sequences of ``--seq`` random tokens, the loss the
model's own (``labels=input_ids``).

Example::

    python benchmarks/bench_objective_memory.py --old main --rounds 2 \
        --calls grad,trace,top1 --configs default,micro2,recompute --out objective_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "default": {},
    "recompute": {"graphs": "recompute"},
    "micro2": {"micro_batch_size": 2},
    "micro4": {"micro_batch_size": 4},
    "micro2-keep": {"micro_batch_size": 2, "graphs": "keep"},
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _problem(args: argparse.Namespace):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.embd, n_head=args.heads, vocab_size=args.vocab,
        n_positions=args.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager", bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = ({"input_ids": ids, "labels": ids}, None)
    return model, batch


def _loss(outputs, _targets):
    return outputs.loss


def _call(name: str, model, batch, options: dict):
    import torch

    from sharpgen import hessian_trace, top_eigenvalues

    g = torch.Generator().manual_seed(0)
    if name == "grad":
        out = model(**batch[0])
        out.loss.backward()
        return float(out.loss)
    if name == "trace":
        res = hessian_trace(model, _loss, batch, method="hutchinson", num_matvecs=3,
                            generator=g, **options)  # fmt: skip
        return float(res.value)
    if name == "top1":
        res = top_eigenvalues(model, _loss, batch, k=1, tol=1e-3, generator=g, **options)
        return float(res.eigenvalues[0]), int(res.num_matvecs)
    raise ValueError(f"unknown call {name!r}")


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, batch = _problem(args)
    before = _peak_mb()
    tic = time.perf_counter()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            value = _call(args.child, model, batch, CONFIGS[args.config])
        table = prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=25)
        print(table, file=sys.stderr)
    else:
        value = _call(args.child, model, batch, CONFIGS[args.config])
    seconds = time.perf_counter() - tic
    print(json.dumps({"before_mb": before, "peak_mb": _peak_mb(), "seconds": seconds,
                      "value": value}))  # fmt: skip


def _run(tree: Path, call: str, config: str, args: argparse.Namespace, profile: bool) -> dict:
    names = ("layers", "embd", "heads", "vocab", "batch", "seq", "threads")
    sizes = [x for n in names for x in (f"--{n}", getattr(args, n))]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", call, "--config", config,
           *map(str, sizes), *(["--profile"] if profile else [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{call}/{config} on {tree} failed:\n{done.stderr[-3000:]}")
    if profile:
        print(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _export(rev: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix="bench-old-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "sharpgen"],
                             capture_output=True, check=True)  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None)
    p.add_argument("--config", default="default")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--calls", default="grad,trace,top1")
    p.add_argument("--configs", default="default,recompute,micro2")
    p.add_argument("--old", default=None, help="a git revision measured beside the tree")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    calls = args.calls.split(",")
    if args.profile:
        _run(ROOT, calls[0], args.configs.split(",")[0], args, profile=True)
        return
    trees = [("new", ROOT)] + ([("old", _export(args.old))] if args.old else [])
    jobs = [("grad", "default")] + [(c, k) for c in calls if c != "grad"
                                    for k in args.configs.split(",")]  # fmt: skip
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for call, config in jobs:
            for label, tree in trees:
                if label == "old" and config != "default":
                    continue  # options the old revision may not know
                res = _run(tree, call, config, args, profile=False)
                rows.setdefault((label, call, config), []).append(res)
                print(label, call, config, json.dumps(res), file=sys.stderr, flush=True)
    lines = [
        f"GPT-2 {args.layers} layers, n_embd {args.embd}, vocab {args.vocab}, batch "
        f"{args.batch} x {args.seq} tokens, float32, {args.threads} threads; load "
        f"{os.getloadavg()[0]:.1f}; {args.rounds} round(s), the smallest peak of each row.",
        "",
        "| tree | call | options | peak MB | / gradient step | increment MB | seconds | value |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (label, call, config), runs in rows.items():
        best = min(runs, key=lambda r: r["peak_mb"])
        grad = min(r["peak_mb"] for r in rows[(label, "grad", "default")])
        secs = sorted(r["seconds"] for r in runs)[len(runs) // 2]
        lines.append(
            f"| {label} | {call} | {config} | {best['peak_mb']:.0f} | "
            f"{best['peak_mb'] / grad:.2f} | {best['peak_mb'] - best['before_mb']:.0f} | "
            f"{secs:.1f} | {best['value']} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
