"""bfloat16 / autocast against float32: accuracy, peak memory and time of a trace and top-1.

The same Hugging Face GPT-2 (random weights, built from a seed, ``--batch`` x ``--tokens``
random tokens, next-token cross-entropy from the logits, attention routed by sharpgen to
its twice-differentiable path) is measured three ways, each call in a fresh child process:

* ``float32``: the model as built;
* ``bfloat16``: ``model.to(torch.bfloat16)`` (products in bfloat16, sums in float32);
* ``autocast``: the float32 model with ``autocast=torch.bfloat16`` (forward passes under
  `torch.autocast`, parameters and sums float32).

Calls: ``trace`` (`hessian_trace`, ``--probes`` Hutchinson products, the same generator, so
the same probes for every precision) and ``top1`` (`top_eigenvalues`, k=1, ``--tol``, same
start vector). For each the table gives the value, its relative difference to float32
(the rounding's effect on the *same* estimator, not the estimator's own error), the
products, the peak resident set of the process (``VmHWM`` after a reset once the model and
batch are built) and the wall time. Rounds are interleaved (every precision once per
round) so time ratios are taken under the same load; run ``uptime`` beside it.

Example::

    PYTHONPATH=. python benchmarks/bench_bf16.py --layers 4 --embd 256 --rounds 2
    # GPT-2 small (124M) trace, under the big-memory lock
    flock /work/wt/bigmem.lock env PYTHONPATH=. python benchmarks/bench_bf16.py \\
        --layers 12 --embd 768 --calls trace
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

PRECISIONS = ("float32", "bfloat16", "autocast")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child(call: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    import sharpgen as sg

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=max(1, args.embd // 64))
    model = GPT2LMHeadModel(cfg).eval()
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), generator=g)

    def loss_fn(out: Any, targets: Any) -> Any:
        logits = out.logits[:, :-1].flatten(0, 1)
        return F.cross_entropy(logits, targets[:, 1:].flatten())

    data = ({"input_ids": ids}, ids)
    opts: dict[str, Any] = {"autocast": torch.bfloat16} if precision == "autocast" else {}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak of the call, model included
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(2)
    if call == "trace":
        r = sg.hessian_trace(model, loss_fn, data, method="hutchinson",
                             num_matvecs=args.probes, generator=gen, **opts)  # fmt: skip
        out = {"value": r.value, "stderr": r.stderr, "products": r.num_matvecs}
    else:
        e = sg.top_eigenvalues(model, loss_fn, data, k=1, tol=args.tol, generator=gen, **opts)
        out = {"value": float(e.eigenvalues[0]), "products": e.num_matvecs,
               "converged": e.converged}  # fmt: skip
    out.update(seconds=time.perf_counter() - t0, rss_before=rss0, peak=_status("VmHWM"))
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--calls", default="trace,top1")
    p.add_argument("--child", nargs=2, metavar=("CALL", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args)))
        return
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for call in args.calls.split(","):
            for precision in PRECISIONS:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--child", call, precision]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(f"{call} {precision} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.setdefault((call, precision), []).append(
                    json.loads(proc.stdout.splitlines()[-1])
                )
    print(f"GPT-2 {args.layers} layers x {args.embd}, batch {args.batch} x {args.tokens} tokens")
    print("| call | precision | value | rel. diff to float32 | products | peak GB | "
          "peak / float32 | seconds (median) | time / float32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for call in args.calls.split(","):
        ref = rows.get((call, "float32"))
        for precision in PRECISIONS:
            runs = rows.get((call, precision))
            if not runs:
                continue
            r = runs[0]
            secs = sorted(x["seconds"] for x in runs)[len(runs) // 2]
            if ref:
                f = ref[0]
                rel = abs(r["value"] - f["value"]) / abs(f["value"])
                fsecs = sorted(x["seconds"] for x in ref)[len(ref) // 2]
                peak = f"{r['peak'] / 2**30:.2f} | {r['peak'] / f['peak']:.2f}"
                ratios = f"{rel:.2e} | {r['products']} | {peak} | {secs:.1f} | {secs / fsecs:.2f}"
            else:
                ratios = f"-- | {r['products']} | {r['peak'] / 2**30:.2f} | -- | {secs:.1f} | --"
            print(f"| {call} | {precision} | {r['value']:.6g} | {ratios} |")
    print(json.dumps({f"{c}/{q}": v for (c, q), v in rows.items()}))


if __name__ == "__main__":
    main()
