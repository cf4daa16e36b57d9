"""What ``micro_batch_size="auto"`` costs where the whole batch fits (it then chooses None).

For each model the script times, in CPU seconds of this process (``time.process_time``,
which a loaded machine disturbs less than the wall clock), the median over ``--repeats``
runs of: building a `ModelObjective` (its validation pass) with ``micro_batch_size=None``
and with ``"auto"`` (the probe: the graphs of the first 1 and 2 samples), and a
`hessian_trace` with 3 Hutchinson products each way. Both choose whole batches here (the
budget is ``"auto"``, 80% of the free memory), so the values must be bitwise equal; the
difference is the probe.

Models (random weights, float32, CPU):

* ``mlp``: the anchors' MLP 20-64-64-10 (tanh), cross-entropy, 512 samples;
* ``gpt2``: Hugging Face GPT-2 with 4 layers of width 256, 8 x 128 random tokens, the
  model's own loss, attention on the math path.

Example::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_micro_auto.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def _build(name: str) -> tuple[Any, Any, Any]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                              nn.Linear(64, 10))  # fmt: skip
        x, y = torch.randn(512, 20, generator=g), torch.randint(0, 10, (512,), generator=g)
        return model, nn.functional.cross_entropy, (x, y)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 128), generator=g)
    return model, None, {"input_ids": ids, "labels": ids}


def _cpu(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


def _row(name: str, repeats: int) -> str:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sharpgen import hessian_trace
    from sharpgen.curvature import ModelObjective

    model, loss_fn, data = _build(name)

    def objective(**kw: Any) -> Any:
        return ModelObjective(model, loss_fn, data, **kw)

    def trace(**kw: Any) -> Any:
        return hessian_trace(model, loss_fn, data, method="hutchinson", num_matvecs=3,
                             generator=torch.Generator().manual_seed(2), **kw)  # fmt: skip

    with sdpa_kernel([SDPBackend.MATH]):
        b0, _ = _cpu(objective, repeats)
        b1, obj = _cpu(lambda: objective(micro_batch_size="auto"), repeats)
        t0, r0 = _cpu(trace, repeats)
        t1, r1 = _cpu(lambda: trace(micro_batch_size="auto"), repeats)
    same = r0.value == r1.value
    return (f"| {name} | {b0:.3f} | {b1:.3f} | {b1 - b0:.3f} | {t0:.3f} | {t1:.3f} "
            f"| {100 * (t1 - t0) / t0:+.1f}% | {obj.micro_batch_size} | {same} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,gpt2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print("| model | objective None s | objective auto s | probe s | trace None s "
          "| trace auto s | extra | chosen | values equal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        print(_row(name, args.repeats), flush=True)


if __name__ == "__main__":
    main()
