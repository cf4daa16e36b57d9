"""Benchmark of the SAM optimizers: step time, per-example SAM with vmap, memory overhead.

Three measurements (float32, CPU), printed as Markdown tables:

1. **Step time** on a small conv net (CIFAR-sized input, batch 64, cross-entropy): one full
   training step of the base optimizer (SGD with momentum: forward, backward, step) against
   one SAM step of `sharpgen.optim.SAM` (``step(closure)`` and the two-call style) and of
   ``pytorch_optimizer.SAM`` (its documented use: backward, then ``step(closure)``). Median of
   the repeats after warm-up, of the wall time and of the process CPU time (the latter is
   less sensitive to other processes on a shared machine); the methods are interleaved round
   by round so that a change of machine load hits all of them alike. One torch thread by
   default (``--threads``).
2. **Per-example SAM (1-SAM)** at batch 128 on an MLP: `sam_gradient(per_example=True)`
   (``torch.func.vmap``) against a Python loop over the examples doing the same maths with
   ``torch.func.grad``, and against a plain autograd loop (``backward`` per example).
3. **Memory overhead** of a step over the base optimizer's step, on an MLP with 8.4M
   parameters (33.6 MB) and a tiny batch (so that activations do not hide it), two ways:
   (a) counted: the bytes of the tensors the optimizer holds at its high point (saved weights,
   GSAM's saved gradient, the base optimizer's state) minus the base optimizer's state;
   (b) measured: each cell runs in a fresh subprocess that samples its current resident set
   (``/proc/self/statm``) after every backward pass and every step of four steps, and reports
   the largest sample after the first step; the table gives the difference to the base
   optimizer's cell. The cells run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc
   returns freed parameter-sized blocks to the OS at once. (b) is whole-process and coarse
   (allocator effects); (a) is exact for what the optimizer keeps.

Run with the benchmark environment (it has pytorch-optimizer)::

    .venv-bench/bin/python benchmarks/bench_sam.py
    .venv-bench/bin/python benchmarks/bench_sam.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharpgen.optim import (  # noqa: E402
    BSAM,
    ESAM,
    GSAM,
    MSAM,
    SAM,
    WSAM,
    FriendlySAM,
    LookSAM,
    perturbed,
    sam_gradient,
)
from sharpgen.sharpness import sam_perturbation  # noqa: E402

try:
    import pytorch_optimizer
except ImportError:  # the table then says so
    pytorch_optimizer = None


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def mlp(width: int = 128, d: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, 10))


def big_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048))


# -- 1. step time ------------------------------------------------------------------------------
def make_steppers(batch: int):
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    kw = {"lr": 0.05, "momentum": 0.9}
    steppers = {}

    base_model = conv_net()
    base_opt = torch.optim.SGD(base_model.parameters(), **kw)

    def base_step():
        base_opt.zero_grad()
        F.cross_entropy(base_model(x), y).backward()
        base_opt.step()

    steppers["base SGD (1 pass)"] = base_step

    model = conv_net()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    steppers["sharpgen SAM step(closure)"] = lambda: opt.step(closure)

    model2 = conv_net()
    opt2 = SAM(model2.parameters(), torch.optim.SGD, rho=0.05, **kw)

    def two_call():
        opt2.zero_grad()
        F.cross_entropy(model2(x), y).backward()
        opt2.first_step(zero_grad=True)
        F.cross_entropy(model2(x), y).backward()
        opt2.second_step()

    steppers["sharpgen SAM first/second_step"] = two_call

    model3 = conv_net()
    opt3 = GSAM(model3.parameters(), torch.optim.SGD, rho_max=0.05, alpha=0.1, **kw)

    def gsam_closure():
        opt3.zero_grad()
        loss = F.cross_entropy(model3(x), y)
        loss.backward()
        return loss

    steppers["sharpgen GSAM step(closure)"] = lambda: opt3.step(gsam_closure)
    steppers.update(family_steppers(x, y, kw))

    if pytorch_optimizer is not None:
        model4 = conv_net()
        opt4 = pytorch_optimizer.SAM(model4.parameters(), torch.optim.SGD, rho=0.05, **kw)

        def po_closure():
            loss = F.cross_entropy(model4(x), y)
            loss.backward()
            return loss

        def po_step():
            opt4.zero_grad()
            po_closure()
            opt4.step(po_closure)
            opt4.zero_grad()

        steppers["pytorch_optimizer SAM"] = po_step
    return steppers


K = 5  # SAM every K steps / LookSAM's k: those rows time K steps and report the mean


def _closure_step(opt, model, x, y, steps: int = 1):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def run():
        for _ in range(steps):
            opt.step(closure)

    return run


def _po_step(opt, model, x, y, steps: int = 1):
    """pytorch-optimizer's documented use: backward at w, then step(closure)."""

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def run():
        for _ in range(steps):
            opt.zero_grad()
            closure()
            opt.step(closure)
            opt.zero_grad()

    return run


def _po_self_closure_step(opt, model, x, y):
    """pytorch-optimizer's WSAM: its step(closure) runs both passes itself."""

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def run():
        opt.zero_grad()
        opt.step(closure)
        opt.zero_grad()

    return run


def _per_sample_step(opt, model, x, y):
    def run():
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))

    return run


def family_steppers(x, y, kw) -> dict:
    """The variants of issue 15, ours and pytorch-optimizer's (names end in "/K" when a call
    runs K steps)."""
    out = {}
    model = conv_net()
    out["sharpgen MSAM"] = _closure_step(
        MSAM(model.parameters(), torch.optim.SGD, rho=0.3, **kw), model, x, y
    )
    model = conv_net()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, interval=K, **kw)
    out[f"sharpgen SAM interval={K} /{K}"] = _closure_step(opt, model, x, y, K)
    model = conv_net()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=K, alpha=0.7, **kw)
    out[f"sharpgen LookSAM k={K} /{K}"] = _closure_step(opt, model, x, y, K)
    model = conv_net()
    opt = WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, **kw)
    out["sharpgen WSAM"] = _closure_step(opt, model, x, y)
    model = conv_net()
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    out["sharpgen FriendlySAM"] = _closure_step(opt, model, x, y)
    model = conv_net()
    opt = BSAM(model.parameters(), num_data=50_000, lr=kw["lr"], rho=0.05)
    out["sharpgen BSAM"] = _closure_step(opt, model, x, y)
    model = conv_net()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5, **kw)
    out["sharpgen ESAM"] = _per_sample_step(opt, model, x, y)
    if pytorch_optimizer is not None:
        model = conv_net()
        opt = pytorch_optimizer.WSAM(
            model, model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, **kw
        )
        out["pytorch_optimizer WSAM"] = _po_self_closure_step(opt, model, x, y)
        model = conv_net()
        opt = pytorch_optimizer.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
        out["pytorch_optimizer FriendlySAM"] = _po_step(opt, model, x, y)
        model = conv_net()
        opt = pytorch_optimizer.LookSAM(
            model.parameters(), torch.optim.SGD, rho=0.05, k=K, alpha=0.7, **kw
        )
        out[f"pytorch_optimizer LookSAM k={K} /{K}"] = _po_step(opt, model, x, y, K)
    return out


def bench_steps(batch: int, repeats: int) -> list[dict]:
    steppers = make_steppers(batch)
    for fn in steppers.values():  # warm-up
        for _ in range(3):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in steppers}
    cpu: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(repeats):
        for name, fn in steppers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    base_w = statistics.median(wall["base SGD (1 pass)"])
    base_c = statistics.median(cpu["base SGD (1 pass)"])
    rows = []
    for name in steppers:
        per = K if name.endswith(f"/{K}") else 1
        w, c = statistics.median(wall[name]) / per, statistics.median(cpu[name]) / per
        rows.append({"method": name, "wall_ms": 1e3 * w, "wall_ratio": w / base_w,
                     "cpu_ms": 1e3 * c, "cpu_ratio": c / base_c})  # fmt: skip
    return rows


# -- 2. per-example SAM ------------------------------------------------------------------------
def bench_per_example(batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    net = mlp()
    params = {n: p.detach() for n, p in net.named_parameters()}
    x, y = torch.randn(batch, 32), torch.randint(0, 10, (batch,))
    rho = 0.05

    def loss_fn(p, b):
        xb, yb = b
        return F.cross_entropy(torch.func.functional_call(net, p, (xb,)), yb)

    def vmapped():
        return sam_gradient(loss_fn, params, (x, y), rho, per_example=True)

    gfn = torch.func.grad(loss_fn)

    def func_loop():
        out = {k: torch.zeros_like(v) for k, v in params.items()}
        for i in range(batch):
            b = (x[i : i + 1], y[i : i + 1])
            eps = sam_perturbation(gfn(params, b), params, rho)
            g = gfn({k: params[k] + eps[k] for k in params}, b)
            for k in out:
                out[k] += g[k] / batch
        return out

    model = mlp()
    model.load_state_dict(net.state_dict())

    def autograd_loop():
        out = {k: torch.zeros_like(v) for k, v in params.items()}
        for i in range(batch):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            g = {n: p.grad for n, p in model.named_parameters()}
            eps = sam_perturbation(g, dict(model.named_parameters()), rho)
            model.zero_grad()
            with perturbed(model, eps):
                F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            for n, p in model.named_parameters():
                out[n] += p.grad / batch
        return out

    ref = vmapped()
    check = func_loop()
    err = max(float((ref[k] - check[k]).abs().max()) for k in ref)
    fns = {"vmap (sam_gradient per_example=True)": vmapped, "loop, torch.func.grad": func_loop,
           "loop, autograd backward": autograd_loop}  # fmt: skip
    for fn in fns.values():
        fn()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    key = "vmap (sam_gradient per_example=True)"
    vm_w, vm_c = statistics.median(wall[key]), statistics.median(cpu[key])
    return [
        {"method": k, "wall_ms": 1e3 * statistics.median(wall[k]),
         "wall_speedup_of_vmap": statistics.median(wall[k]) / vm_w,
         "cpu_ms": 1e3 * statistics.median(cpu[k]),
         "cpu_speedup_of_vmap": statistics.median(cpu[k]) / vm_c, "max_abs_diff_vs_vmap": err}
        for k in fns
    ]  # fmt: skip


# -- 3. memory ---------------------------------------------------------------------------------
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def state_bytes(opt) -> int:
    return sum(tensor_bytes(s.values()) for s in opt.state.values())


def held_bytes(opt) -> int:
    """Bytes of the distinct tensors an optimizer holds (its state, the base optimizer's
    state, sharpgen's saved weights and GSAM's saved gradient), by storage."""
    seen, total = set(), 0
    pools = [opt.state]
    base = getattr(opt, "base_optimizer", None)
    if base is not None and base.state is not opt.state:
        pools.append(base.state)
    tensors = [t for pool in pools for st in pool.values() for t in st.values()]
    for attr in ("_saved", "_g0", "_sharp", "_new_m"):
        tensors += list(getattr(opt, attr, {}).values())
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def counted_memory() -> list[dict]:
    """Peak, over both passes of two steps, of the bytes held by the optimizer, minus the
    base optimizer's state (momentum buffers)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 2048), torch.randn(4, 2048)
    kw = {"lr": 0.01, "momentum": 0.9}
    model = big_mlp()
    param_bytes = tensor_bytes(model.parameters())
    base = torch.optim.SGD(model.parameters(), **kw)
    base.zero_grad()
    F.mse_loss(model(x), y).backward()
    base.step()
    base_state = held_bytes(base)
    builders = {
        "sharpgen SAM": lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.05, **kw),
        "sharpgen GSAM": lambda m: GSAM(m.parameters(), torch.optim.SGD, rho_max=0.05, **kw),
        "sharpgen MSAM": lambda m: MSAM(m.parameters(), torch.optim.SGD, rho=0.3, **kw),
        "sharpgen LookSAM": lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.05, k=2, **kw),
        "sharpgen WSAM": lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=0.05, **kw),
        "sharpgen FriendlySAM": lambda m: FriendlySAM(
            m.parameters(), torch.optim.SGD, rho=0.05, **kw
        ),
    }
    if pytorch_optimizer is not None:
        builders["pytorch_optimizer SAM"] = lambda m: pytorch_optimizer.SAM(
            m.parameters(), torch.optim.SGD, rho=0.05, **kw
        )
        builders["pytorch_optimizer LookSAM"] = lambda m: pytorch_optimizer.LookSAM(
            m.parameters(), torch.optim.SGD, rho=0.05, k=2, **kw
        )
        builders["pytorch_optimizer WSAM"] = lambda m: pytorch_optimizer.WSAM(
            m, m.parameters(), torch.optim.SGD, rho=0.05, **kw
        )
        builders["pytorch_optimizer FriendlySAM"] = lambda m: pytorch_optimizer.FriendlySAM(
            m.parameters(), torch.optim.SGD, rho=0.05, **kw
        )
    rows = []
    for name, build in builders.items():
        model = big_mlp()
        opt = build(model)
        peak = {"bytes": 0}

        def closure(model=model, opt=opt, peak=peak):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            peak["bytes"] = max(peak["bytes"], held_bytes(opt))
            return loss

        for _ in range(3):
            opt.zero_grad()
            if name == "pytorch_optimizer WSAM":
                opt.step(closure)  # its step runs both passes
            elif name.startswith("pytorch_optimizer"):
                closure()  # its step expects the first-pass gradient already computed
                opt.step(closure)
            else:

                def sg_closure(opt=opt, closure=closure):
                    opt.zero_grad()
                    return closure()

                opt.step(sg_closure)
            peak["bytes"] = max(peak["bytes"], held_bytes(opt))
        extra = peak["bytes"] - base_state
        rows.append(
            {"method": name, "extra_bytes": extra, "extra_param_copies": extra / param_bytes}
        )
    return rows


CHILD = r"""
import os, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from benchmarks.bench_sam import big_mlp
from sharpgen.optim import SAM, GSAM
import pytorch_optimizer  # imported by every cell, so that imports cancel in the differences
PAGE = os.sysconf("SC_PAGE_SIZE")
samples = []
def sample():
    with open("/proc/self/statm") as f:
        samples.append(int(f.read().split()[1]) * PAGE)
torch.manual_seed(0)
kind = {kind!r}
x, y = torch.randn(4, 2048), torch.randn(4, 2048)
model = big_mlp()
kw = dict(lr=0.01, momentum=0.9)
def closure():
    loss = F.mse_loss(model(x), y); loss.backward(); sample(); return loss
if kind == "base":
    opt = torch.optim.SGD(model.parameters(), **kw)
    def step():
        opt.zero_grad(); closure(); opt.step()
elif kind in ("sam", "gsam"):
    opt = (SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw) if kind == "sam"
           else GSAM(model.parameters(), torch.optim.SGD, rho_max=0.05, **kw))
    def sg_closure():
        opt.zero_grad(); return closure()
    def step():
        opt.step(sg_closure)
else:
    opt = pytorch_optimizer.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    def step():
        opt.zero_grad(); closure(); opt.step(closure); opt.zero_grad()
for _ in range(4):
    step(); sample()
print(max(samples[len(samples) // 4:]))
"""


def measured_memory() -> list[dict]:
    param_bytes = tensor_bytes(big_mlp().parameters())
    kinds = {"base": "base SGD", "sam": "sharpgen SAM", "gsam": "sharpgen GSAM"}
    if pytorch_optimizer is not None:
        kinds["po"] = "pytorch_optimizer SAM"
    out = {}
    for kind in kinds:
        code = CHILD.format(root=str(ROOT), kind=kind)
        # a fixed mmap threshold makes glibc return freed large blocks to the OS at once, so
        # that the resident set follows the live tensors instead of the allocator's high-water
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=ROOT, env=env)  # fmt: skip
        out[kind] = int(res.stdout.strip().splitlines()[-1])
    return [
        {"method": kinds[k], "peak_sampled_rss_bytes": v, "over_base_bytes": v - out["base"],
         "over_base_param_copies": (v - out["base"]) / param_bytes}
        for k, v in out.items()
    ]  # fmt: skip


# -- main --------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 30
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"pytorch_optimizer {'present' if pytorch_optimizer else 'missing'}\n")  # fmt: skip
    results = {
        "step_time_conv_net_batch64": bench_steps(64, repeats),
        "per_example_sam_batch128": bench_per_example(128, max(3, repeats // 5)),
        "memory_counted": counted_memory(),
        "memory_measured_rss": measured_memory(),
    }
    for name, rows in results.items():
        print(f"### {name}\n\n{table(rows)}\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
