"""2-D loss landscapes: sharpgen.landscape against the `loss-landscapes` package.

Run with the benchmark environment (which has loss-landscapes installed):

    PYTHONPATH=$PWD /work/venv-bench/bin/python benchmarks/bench_landscape.py [--quick] \
        [--rounds 3] [--models cnn,mlp,bias] [--out landscape.md] [--anchor-channels-last]

It prints a Markdown table (and writes it to ``--out``), with the load average before and after.

Same model, same data and the same grid points for both: `loss_landscapes.random_plane`
(filter normalization, 41 x 41 steps) is run once with its parameter vector recorded at every
evaluation; the two directions and the coefficients of its grid are recovered from the
recording (its grid puts odd columns one step lower than even ones; this script reproduces
that exactly), and `sharpgen.landscape` evaluates the same points through the same
directions. Values must agree to float32 tolerance. Timing: rounds interleaved in one
process, one thread each (`torch.set_num_threads(1)`), medians of the CPU time of the process
(`time.process_time`: on a shared machine wall-clock time moves with the other jobs; the
wall-clock ratio is printed beside it). `random_plane` writes
weights into the model point by point and runs one forward pass (plus `.item()`) per point;
sharpgen evaluates the first affine layer once per direction and, for a Sequential of
standard layers, runs the rest point by point in channels-last layout with fused kernels
(`sharpgen/landscape/_fastseq.py`); other models go through `torch.func.vmap`.

Models: the ANCHORS.md small CNN (conv(3->4)+ReLU, maxpool, conv(4->32)+ReLU,
linear(2048->10); 256 images 3x16x16, cross-entropy, 21,786 parameters), an MLP 20-64-64-10
(tanh, 512 samples, 6,154 parameters) and the paper's two-layer bias net (d=30, width 500,
n=100, MSE, 16,000 parameters). float32, eval mode.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import loss_landscapes
import loss_landscapes.metrics
import torch
import torch.nn.functional as F
from torch import nn

from sharpgen import ModelObjective
from sharpgen.landscape import loss_landscape_2d
from sharpgen.landscape._grid import evaluate_points


def small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 10),
    )  # fmt: skip
    x, y = torch.randn(256, 3, 16, 16), torch.randint(0, 10, (256,))
    return "small CNN (21,786 params, 256 images)", model.eval(), F.cross_entropy, x, y


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 10))  # fmt: skip
    x, y = torch.randn(512, 20), torch.randint(0, 10, (512,))
    return "MLP 20-64-64-10 (6,154 params, 512 samples)", model.eval(), F.cross_entropy, x, y


def bias_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 500), nn.ReLU(), nn.Linear(500, 1, bias=False))
    x = torch.randint(0, 2, (100, 30)).float() * 2 - 1
    y = (x[:, :1] * x[:, 1:2]).float()
    return (
        "2-layer bias net d=30 m=500 (16,000 params, 100 samples)",
        model.eval(),
        F.mse_loss,
        x,
        y,
    )


def record_plane(model, loss_fn, x, y, steps):
    """Run random_plane once, recording every evaluated parameter vector."""
    points = []
    base = loss_landscapes.metrics.Loss(loss_fn, x, y)

    def metric(wrapper):
        points.append(
            torch.cat([p.detach().reshape(-1).clone() for p in wrapper.modules[0].parameters()])
        )
        return base(wrapper)

    torch.manual_seed(1)
    values = loss_landscapes.random_plane(model, metric, distance=1, steps=steps,
                                          normalization="filter", deepcopy_model=True)  # fmt: skip
    return torch.tensor(values), torch.stack(points)


def recover(points, steps):
    """Base point, the two per-step directions and each point's coefficients."""
    P = points.double().reshape(steps, steps, -1)  # evaluation order: column i, then j
    # even columns were evaluated at j+1, j = 0..steps-1; odd ones in reverse (inserted at 0)
    order = []
    for i in range(steps):
        order.append(P[i] if i % 2 == 0 else P[i].flip(0))
    P = torch.stack(order)
    d2 = P[0, 1] - P[0, 0]
    d1 = (P[2, 0] - P[0, 0]) / 2
    origin = P[0, 0] - d2  # column 0, j + 1 = 1 at index 0
    coeffs = []
    for i in range(steps):
        for j in range(steps):
            coeffs.append((i, j + 1 if i % 2 == 0 else j))
    C = torch.tensor(coeffs, dtype=torch.float64)
    recon = origin + C[:, :1] * d1 + C[:, 1:] * d2
    err = float((recon - P.reshape(steps * steps, -1)).abs().max() / P.abs().max())
    return origin, d1, d2, C, err


def unflat(vec, model):
    out, off = {}, 0
    for n, p in model.named_parameters():
        out[n] = vec[off : off + p.numel()].reshape(p.shape).to(p.dtype)
        off += p.numel()
    return out


def run(case, steps, rounds, anchor_cl=False):
    name, model, loss_fn, x, y = case()
    ref, points = record_plane(model, loss_fn, x, y, steps)
    origin, d1, d2, C, recon_err = recover(points, steps)
    # sharpgen on the same points: a model at the grid origin, directions d1 and d2
    model0 = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in model0.named_parameters():
            p.copy_(unflat(origin, model)[n])
    obj = ModelObjective(model0, loss_fn, (x, y))
    dirs = [unflat(d1, model), unflat(d2, model)]
    loss, _ = evaluate_points(obj, dirs, C, chunk_size=16)
    mine = loss.reshape(steps, steps)
    rel = float(((mine - ref).abs() / ref.abs()).max())
    # the anchor given channels-last images and weights (a layout a user could choose)
    model_cl, x_cl = model, x
    if anchor_cl and x.dim() == 4:
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)

    def theirs(m=model, inputs=x):
        torch.manual_seed(1)
        metric = loss_landscapes.metrics.Loss(loss_fn, inputs, y)
        loss_landscapes.random_plane(m, metric, distance=1, steps=steps, normalization="filter",
                                     deepcopy_model=True)  # fmt: skip

    def ours():
        loss_landscape_2d(model, loss_fn, (x, y), num_points=steps,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    fns = {"theirs": theirs, "ours": ours}
    if model_cl is not model:
        fns["theirs_cl"] = lambda: theirs(model_cl, x_cl)
    times = {k: [] for k in fns}
    walls = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t, w = time.process_time(), time.perf_counter()
            fn()
            times[k].append(time.process_time() - t)
            walls[k].append(time.perf_counter() - w)
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b = med["theirs"], med["ours"]
    ratios = sorted(x / y for x, y in zip(times["theirs"], times["ours"], strict=True))
    wall = statistics.median(walls["theirs"]) / statistics.median(walls["ours"])
    cl = f"{med['theirs_cl']:.2f} s ({med['theirs_cl'] / b:.2f}x)" if "theirs_cl" in med else "-"
    row = (f"| {name} | {steps}x{steps} | {a:.2f} s | {b:.2f} s | {a / b:.2f}x | "
           f"{ratios[0]:.2f}-{ratios[-1]:.2f}x | {wall:.2f}x | {cl} | {rel:.1e} "
           f"(grid recovery {recon_err:.0e}) |")  # fmt: skip
    print(row, flush=True)
    return row


CASES = {"cnn": small_cnn, "mlp": mlp, "bias": bias_net}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="11 x 11 grids, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="cnn,mlp,bias", help="comma-separated: cnn,mlp,bias")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    parser.add_argument("--anchor-channels-last", action="store_true",
                        help="also time loss-landscapes on a channels-last CNN")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, rounds = (11, 1) if args.quick else (41, args.rounds)
    lines = [
        f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
        f"({os.cpu_count()} cores, 1 thread each, {rounds} interleaved rounds, medians of the "
        "CPU time of this process; wall-clock ratio of the medians beside them)",
        "",
        "| model | grid | loss-landscapes | sharpgen | ratio | ratio range | wall-clock ratio | "
        "loss-landscapes, channels-last (ratio) | max rel. value difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for key in args.models.split(","):
        lines.append(run(CASES[key.strip()], steps, rounds, args.anchor_channels_last))
    after = f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    print(after)
    lines += ["", after]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
