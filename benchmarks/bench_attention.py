"""What the twice-differentiable attention path costs, on a small GPT-2-like model.

Curvature work runs scaled-dot-product attention through torch's math backend
(`sharpgen.twice_differentiable_attention`); the fused kernels (flash attention on the CPU)
have no second derivative. On a Hugging Face ``GPT2LMHeadModel`` built from a config (random
weights, default ``"sdpa"`` attention, float32, next-token cross-entropy on one batch) this
script times, in interleaved rounds (median of ``--repeats`` after one warm-up):

* ``hvp_sharpgen``: one Hessian-vector product through ``ModelObjective.hvp`` (double
  backward, no kept graph: forward, ``create_graph`` backward, one more backward);
* ``hvp_manual``: the same product written by hand in plain torch inside
  ``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])`` -- what a user would otherwise need;
* ``grad_fused``: one gradient with the fused kernel (what the objective's loss and gradient
  use: the first-order baseline);
* ``grad_math``: one gradient through the math path (what first-order work would cost had it
  not been routed to the fused kernel).

With ``--memory`` each of them also runs once in a fresh process of its own, which reports
its peak resident memory above the resident memory just before the call (sampled every
millisecond from ``/proc/self/statm``; CPU, Linux), next to the formula of the math path's
extra memory: the attention probabilities it keeps for the backward pass,
``layers * batch * heads * seq**2 * 4`` bytes, with as many scores alive while a layer
runs.

Run (CPU)::

    python benchmarks/bench_attention.py --repeats 5 --memory
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharpgen import ModelObjective  # noqa: E402

warnings.filterwarnings("ignore")

SIZES = {"layers": 2, "hidden": 64, "heads": 4, "seq": 256, "batch": 8, "vocab": 128}


def make_problem(sizes: dict[str, int]):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=sizes["vocab"], n_embd=sizes["hidden"],
                        n_layer=sizes["layers"], n_head=sizes["heads"],
                        n_positions=sizes["seq"], bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"]), generator=g)
    return model, ids


def lm_loss(outputs, ids):
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def make_calls(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    obj = ModelObjective(model, lm_loss, ({"input_ids": ids}, ids), backend="autograd")
    g = torch.Generator().manual_seed(1)
    V = {n: torch.randn(1, *t.shape, generator=g) for n, t in obj.params.items()}
    vs = [V[n][0] for n in obj.params]

    def hvp_sharpgen() -> None:
        obj.hvp(V, backend="autograd")

    def hvp_manual() -> None:
        with sdpa_kernel([SDPBackend.MATH]):
            loss = lm_loss(model(input_ids=ids), ids)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(grads, params, vs)

    def grad(backends: list[SDPBackend]):
        def call() -> None:
            with sdpa_kernel(backends):
                loss = lm_loss(model(input_ids=ids), ids)
            torch.autograd.grad(loss, params)

        return call

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    return {
        "hvp_sharpgen": hvp_sharpgen,
        "hvp_manual": hvp_manual,
        "grad_fused": grad(fused),
        "grad_math": grad([SDPBackend.MATH]),
    }


def timings(repeats: int) -> dict[str, float]:
    model, ids = make_problem(SIZES)
    calls = make_calls(model, ids)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
    for _ in range(repeats):  # interleaved rounds
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_of(name: str) -> float:
    """Peak resident memory during one call above the resident memory just before it (MiB).

    A thread samples the resident set every millisecond while the call runs (torch's
    operators release the GIL). The call is the process's first: a warm-up call would leave
    its freed memory with the allocator, and the measured call would reuse it unseen.
    """
    model, ids = make_problem(SIZES)
    call = make_calls(model, ids)[name]
    gc.collect()
    before = _rss_mib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_mib()) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="peak memory, one process each")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        print(json.dumps({"peak_mib": peak_of(args.peak_of)}))
        return
    print(f"GPT-2-like model {SIZES}, float32, {args.threads} thread(s)")
    med = timings(args.repeats)
    base = med["grad_fused"]
    print(f"{'call':<14} {'median s':>9} {'/ grad_fused':>13}")
    for name, t in med.items():
        print(f"{name:<14} {t:9.4f} {t / base:13.2f}")
    print(f"hvp_sharpgen / hvp_manual = {med['hvp_sharpgen'] / med['hvp_manual']:.2f}")
    if args.memory:
        s = SIZES
        probs = s["layers"] * s["batch"] * s["heads"] * s["seq"] ** 2 * 4 / 2**20
        print(f"formula: attention probabilities kept by the math path {probs:.1f} MiB "
              f"(layers*batch*heads*seq^2*4 bytes)")  # fmt: skip
        for name in med:
            out = subprocess.run(
                [sys.executable, __file__, "--peak-of", name, "--threads", str(args.threads)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
            print(f"peak memory {name:<14} {peak:8.1f} MiB above the model and data")


if __name__ == "__main__":
    main()
