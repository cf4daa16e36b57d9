"""Where the bytes of one measure call go: resident memory sampled with the Python stack.

A thread samples the process's resident set (``VmRSS``) every ``--interval`` seconds
together with the main thread's innermost sharpgen frames, while one call of
`benchmarks/bench_memory.py` (same models, same calls) runs. It prints the call's peak
(``VmHWM``, reset after the model and batch are built, as in ``bench_memory.py``), the
resident set above the one before the call in parameter-sized vectors ($v$, the
selected parameters' bytes), the stacks at the highest samples, and the highest sample
of each sharpgen function (where each phase of the call peaked). Beside it, the bytes
autograd saves while the first gradient graph is built (the graph a Hessian product
keeps), counted by `sharpgen.curvature._columns.SavedBytes` in a separate pass.

Samples miss peaks shorter than the interval; ``VmHWM`` does not, so the two are shown
side by side.

Examples::

    PYTHONPATH=. python benchmarks/profile_memory.py --model gpt2 --call top1
    PYTHONPATH=. python benchmarks/profile_memory.py --model resnet50 --call top5
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_memory

GB = 1e9


def _rss() -> int:
    return bench_memory._status("VmRSS")


def _stack(frame: Any, depth: int) -> tuple[str, ...]:
    """The innermost ``depth`` frames of sharpgen (or of this benchmark), innermost last."""
    out: list[str] = []
    while frame is not None and len(out) < depth:
        path = frame.f_code.co_filename
        if "sharpgen" in path or "benchmarks" in path:
            out.append(f"{os.path.basename(path)}:{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return tuple(reversed(out))


def saved_graph_bytes(args: argparse.Namespace) -> tuple[int, int]:
    """Bytes autograd saves while the first gradient graph (``create_graph=True``) is built.

    Returns ``(all, new)``: every saved storage, and those beyond the model's parameters,
    buffers and the batch (what keeping the graph adds to the process).
    """
    import torch
    from torch.autograd.graph import saved_tensors_hooks
    from torch.utils._pytree import tree_leaves

    from sharpgen.curvature._columns import SavedBytes

    model, loss_fn, data, _, _ = bench_memory._build(args)
    inputs, targets = data
    batch = [t for t in tree_leaves(data) if isinstance(t, torch.Tensor)]
    counter = SavedBytes([*model.parameters(), *model.buffers(), *batch])
    params = [p for p in model.parameters() if p.requires_grad]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), saved_tensors_hooks(counter.pack, lambda t: t):
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        loss = loss_fn(out, targets)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    del grads
    return counter.bytes, counter.new_bytes


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
    p.add_argument("--call", default="top1", choices=bench_memory.CALLS)
    p.add_argument("--options", default="")
    p.add_argument("--budget", type=float, default=0.0, help="memory_budget in GB (0: 'auto')")
    p.add_argument("--interval", type=float, default=0.002)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--graph", action="store_true", help="also count the graph's saved bytes")
    args = p.parse_args()
    main_thread = threading.main_thread().ident
    samples: list[tuple[int, tuple[str, ...]]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            frame = sys._current_frames().get(main_thread)  # type: ignore[arg-type]
            samples.append((_rss(), _stack(frame, args.depth)))
            time.sleep(args.interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = bench_memory._call(args.call, args)
    stop.set()
    thread.join()
    base = out["rss_before"]
    v = 4 * out["params"]
    print(f"{args.model} {args.call}: {out['params'] / 1e6:.1f}M params, v = {v / GB:.3f} GB")
    print(f"RSS before {base / GB:.2f} GB, peak (VmHWM) {out['peak'] / GB:.2f} GB = before + "
          f"{(out['peak'] - base) / v:.2f} v; {out['seconds']:.1f} s, {out['products']} "
          f"products, plan {out.get('plan')}")  # fmt: skip
    top = sorted(samples, key=lambda s: -s[0])[:3]
    print(f"highest samples ({len(samples)} taken):")
    for rss, stack in top:
        print(f"  {rss / GB:.2f} GB (+{(rss - base) / v:.2f} v): {' > '.join(stack)}")
    print("highest sample per innermost sharpgen function:")
    per: dict[str, int] = {}
    for rss, stack in samples:
        if stack:
            name = stack[-1].rsplit(":", 1)[0]
            per[name] = max(per.get(name, 0), rss)
    for name, rss in sorted(per.items(), key=lambda x: -x[1])[:15]:
        print(f"  +{(rss - base) / v:5.2f} v  {rss / GB:.2f} GB  {name}")
    if args.graph:
        every, new = saved_graph_bytes(args)
        print(f"saved by the first gradient graph (SavedBytes): {every / GB:.3f} GB, of "
              f"which beyond the model and batch {new / GB:.3f} GB = {new / v:.2f} v")  # fmt: skip


if __name__ == "__main__":
    main()
