"""Measuring sharpness in your own training loop with sharpgen.

A plain PyTorch loop (SGD on a small regression problem) with a `SharpnessTracker` that,
every `every` steps, computes the loss, the Hessian trace, the top Hessian eigenvalue and
the one-step SAM sharpness on a fixed evaluation batch -- without touching the model or
the optimizer. Run it with

    python examples/sharpness_in_your_loop.py --steps 300 --every 50 --plot sharpness.png

It runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from sharpgen.sharpness import SharpnessTracker, hessian_trace, sam_sharpness, top_eigenvalues


def make_problem(seed: int = 0, n: int = 64, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, (x, y)


def main(
    steps: int = 300, every: int = 50, seed: int = 0, plot: str | None = None
) -> SharpnessTracker:
    model, (x, y) = make_problem(seed)
    loss_fn = nn.functional.mse_loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    eval_batch = (x[:32], y[:32])  # a fixed evaluation batch
    tracker = SharpnessTracker(
        model,
        loss_fn,
        eval_batch,
        every=every,
        measures=("loss", "trace", "top_eigenvalue", "sam"),
        options={"trace": {"num_matvecs": 40}, "sam": {"rho": 0.05}},
        generator=torch.Generator().manual_seed(seed),
    )
    for step in range(steps + 1):
        record = tracker.step(step)  # measures on steps 0, every, 2 * every, ...
        if record is not None:
            print(
                f"step {record['step']:4d}  loss {record['loss']:.4f}  "
                f"trace {record['trace']:8.3f} ± {record['trace_stderr']:.3f}  "
                f"lambda_max {record['top_eigenvalue']:7.3f}  sam {record['sam']:.5f}"
            )
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    print("total cost:", tracker.total_cost)

    # one-off measurements at the end of training, with more budget
    g = torch.Generator().manual_seed(1)
    print(hessian_trace(model, loss_fn, (x, y), method="xtrace", num_matvecs=100, generator=g))
    print(top_eigenvalues(model, loss_fn, (x, y), k=3, generator=g))
    print(sam_sharpness(model, loss_fn, (x, y), rho=0.05, steps=5))
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        tracker.plot().savefig(plot, dpi=120)
        print("saved", plot)
    return tracker


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="save the tracker's plot to this file")
    args = parser.parse_args()
    main(args.steps, args.every, args.seed, args.plot)
