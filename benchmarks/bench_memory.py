"""Peak resident memory of one measure call, each in its own process, against a gradient step.

Every call runs in a fresh child process (the model built from a seed, random weights) and
reports its peak resident set (``VmHWM`` of ``/proc/self/status``, reset with
``/proc/self/clear_refs`` after the model and batch are built, so the figure is the call's
own peak with the model included), the resident set before the call, its wall time, its
value and its products. The table gives each call's peak as a multiple of the plain
gradient step's (forward, backward, SGD step) on the same model and batch.

Models (random weights, float32, CPU, ``--threads`` threads):

* ``gpt2``: Hugging Face ``GPT2LMHeadModel(GPT2Config(n_layer, n_embd, n_head))``,
  ``--batch`` x ``--tokens`` random tokens, the model's own loss, attention on the math
  path (``sdpa_kernel([SDPBackend.MATH])``, the only one with a second derivative);
* ``resnet50``: Hugging Face ``ResNetForImageClassification(ResNetConfig())`` (ResNet-50),
  ``--batch`` random 3 x ``--image`` x ``--image`` images, cross-entropy, BatchNorm on
  running statistics (``bn="eval"``) so every call sees the same function.

Calls: ``grad``, ``trace`` (`hessian_trace`, 3 Hutchinson products), ``top1`` /
``top5`` (`top_eigenvalues`, tol 1e-3), ``sam`` (`sam_sharpness`), ``pyhessian`` (top-1
by PyHessian's power iteration, tol 1e-3, in ``--bench-python``: a venv with PyHessian),
``landscape1d`` (`loss_landscape_1d`, random filter-normalized direction, 11 points),
``blocks`` (`block_traces`, 3 Hutchinson products). ``--options`` passes extra keyword
arguments to the measure (e.g. ``'{"micro_batch_size": 2}'`` or ``'{"micro_batch_size":
"auto"}'``); ``--budget`` (GB) passes ``memory_budget`` to the measures that plan their
memory (``trace``, ``top1``/``top5``, ``blocks``), and the table then says whether the
call's peak above the resident set before it stayed within that budget.

Examples::

    # development size (GPT-2 with 4 layers of width 256)
    PYTHONPATH=. python benchmarks/bench_memory.py --quick
    # GPT-2 small (124M): needs about 12 GB free
    PYTHONPATH=. python benchmarks/bench_memory.py --model gpt2 --layers 12 --embd 768
    # a batch larger than a 0.6 GB budget: whole batch, then micro-batches chosen by the plan
    PYTHONPATH=. python benchmarks/bench_memory.py --quick --batch 8 --tokens 128 \
        --threads 1 --budget 0.6 --calls grad,trace
    PYTHONPATH=. python benchmarks/bench_memory.py --quick --batch 8 --tokens 128 \
        --threads 1 --budget 0.6 --calls trace --options '{"micro_batch_size": "auto"}'
    # GPT-2 medium (355M, 16 heads)
    PYTHONPATH=. python benchmarks/bench_memory.py --model gpt2 --layers 24 --embd 1024 \
        --heads 16 --calls grad,trace,top1
    PYTHONPATH=. python benchmarks/bench_memory.py --model resnet50 --calls grad,trace,top1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

CALLS = ("grad", "trace", "top1", "top5", "sam", "landscape1d", "blocks", "pyhessian")


def _status(key: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _build(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """(model, loss_fn, data as (inputs, targets), PyHessian (module, criterion, data), opts)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if args.model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        head = args.heads or max(1, args.embd // 64)
        cfg = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=head)
        model = GPT2LMHeadModel(cfg).eval()  # dropout off: a deterministic function
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), generator=g)
        data = ({"input_ids": ids, "labels": ids}, None)

        def loss_fn(out: Any, _: Any) -> Any:
            return out.loss

        class Logits(nn.Module):  # PyHessian calls model(inputs) and criterion(out, targets)
            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: Any) -> Any:
                return self.inner(input_ids=x).logits

        def criterion(logits: Any, y: Any) -> Any:
            return nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1)
            )

        return model, loss_fn, data, (Logits(model), criterion, (ids, ids)), {}
    from transformers import ResNetConfig, ResNetForImageClassification

    model = ResNetForImageClassification(ResNetConfig(num_labels=10)).eval()
    x = torch.randn(args.batch, 3, args.image, args.image, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    class Plain(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner(pixel_values=x).logits

    plain = Plain(model).eval()
    ce = nn.functional.cross_entropy
    return plain, ce, (x, y), (plain, ce, (x, y)), {"bn": "eval"}


def _call(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    model, loss_fn, data, (pmodel, crit, pdata), opts = _build(args)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(2)
    extra = json.loads(args.options) if args.options else {}
    if args.budget and name in ("trace", "top1", "top5", "blocks"):
        extra["memory_budget"] = int(args.budget * 1e9)
    out: dict[str, Any] = {"call": name, "params": sum(p.numel() for p in model.parameters())}
    rss0 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    with sdpa_kernel([SDPBackend.MATH]):
        if name == "grad":
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            inputs, targets = data
            loss = loss_fn(model(**inputs) if isinstance(inputs, dict) else model(inputs),
                           targets)  # fmt: skip
            loss.backward()
            opt.step()
            out.update(value=float(loss), products=0)
        elif name == "trace":
            from sharpgen import hessian_trace

            r = hessian_trace(model, loss_fn, data, method="hutchinson", num_matvecs=3,
                              generator=gen, **opts, **extra)  # fmt: skip
            out.update(value=r.value, products=r.num_matvecs, plan=repr(getattr(r, "memory", None)))
        elif name in ("top1", "top5"):
            from sharpgen import top_eigenvalues

            k = 1 if name == "top1" else 5
            r = top_eigenvalues(model, loss_fn, data, k=k, tol=1e-3, generator=gen, **opts, **extra)
            out.update(value=r.eigenvalues.tolist(), products=r.num_matvecs,
                       converged=r.converged, residuals=r.residuals.tolist(),
                       plan=repr(getattr(r, "memory", None)))  # fmt: skip
        elif name == "sam":
            from sharpgen import sam_sharpness

            r = sam_sharpness(model, loss_fn, data, rho=0.05, **opts, **extra)
            out.update(value=float(r), products=0)
        elif name == "landscape1d":
            from sharpgen import loss_landscape_1d

            r = loss_landscape_1d(model, loss_fn, data, num_points=11, generator=gen,
                                  **opts, **extra)  # fmt: skip
            out.update(value=float(r.loss.min()), products=r.num_loss_evals)
        elif name == "blocks":
            from sharpgen import block_traces

            r = block_traces(model, loss_fn, data, method="hutchinson", num_matvecs=3,
                             generator=gen, **opts, **extra)  # fmt: skip
            out.update(value=float(r.total), products=r.num_matvecs,
                       plan=repr(getattr(r, "memory", None)))  # fmt: skip
        elif name == "pyhessian":
            from pyhessian import hessian

            ph = sys.modules["pyhessian.hessian"]
            hvp, count = ph.hessian_vector_product, [0]

            def counted(*a: Any) -> Any:
                count[0] += 1
                return hvp(*a)

            ph.hessian_vector_product = counted
            torch.manual_seed(3)
            h = hessian(pmodel, crit, data=pdata, cuda=False)
            vals, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
            out.update(value=vals, products=count[0])
        else:
            raise SystemExit(f"unknown call {name!r}; choose from {CALLS}")
    out.update(seconds=time.perf_counter() - t0, rss_before=rss0, peak=_status("VmHWM"))
    memory = getattr(locals().get("r"), "memory", None)
    if memory is not None:
        out.update(micro=memory.micro_batch_size, planned=memory.planned_bytes,
                   graph=memory.graph_bytes)  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("gpt2", "resnet50"), default="gpt2")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--heads", type=int, default=0, help="GPT-2 heads (default embd // 64)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", default="grad,trace,top1,top5,sam")
    p.add_argument("--options", default="", help="JSON of extra measure keyword arguments")
    p.add_argument("--budget", type=float, default=0.0, help="memory_budget in GB (0: 'auto')")
    p.add_argument("--bench_python", default="/work/venv-bench/bin/python")
    p.add_argument("--quick", action="store_true", help="GPT-2 with 4 layers of width 256")
    p.add_argument("--child", default="")
    args = p.parse_args()
    if args.quick:
        args.layers, args.embd = 4, 256
    if args.child:
        print("RESULT " + json.dumps(_call(args.child, args)), flush=True)
        return
    rows = []
    for name in args.calls.split(","):
        python = args.bench_python if name == "pyhessian" else sys.executable
        argv = [f"--{k}={v}" for k, v in vars(args).items()
                if k not in ("calls", "quick", "child", "bench_python")]  # fmt: skip
        cmd = [python, os.path.abspath(__file__), *argv, "--child", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        rows.append(json.loads(lines[-1][7:]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["peak"] for r in rows if r["call"] == "grad"), None)
    print(f"\n{args.model} ({rows[0]['params'] / 1e6:.1f}M params) load {os.getloadavg()}")
    print(f"budget {args.budget or 'auto'} GB, options {args.options or '{}'}")
    print("| call | peak RSS GB | x grad step | RSS before GB | above before GB | within budget "
          "| micro-batch | planned GB | seconds | products |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['peak'] / base:.2f}" if base else "-"
        above = (r["peak"] - r["rss_before"]) / 1e9
        fits = "-" if not args.budget or "planned" not in r else str(above <= args.budget)
        planned = f"{r['planned'] / 1e9:.2f}" if "planned" in r else "-"
        print(f"| {r['call']} | {r['peak'] / 1e9:.2f} | {ratio} | {r['rss_before'] / 1e9:.2f} "
              f"| {above:.2f} | {fits} | {r.get('micro', '-')} | {planned} "
              f"| {r['seconds']:.1f} | {r['products']} |")  # fmt: skip


if __name__ == "__main__":
    main()
