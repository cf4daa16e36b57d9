"""Check the SAM-family variants of `sharpgen.optim` against pytorch-optimizer's (outside CI).

Each row trains the same float64 model from the same start for a few steps with our optimizer
and with pytorch-optimizer's, on fixed random mini-batches, and prints the largest weight
difference. Where the two define the same update, the difference is rounding (plus their
``1e-12`` / ``1e-8`` stabilizers); where the definitions differ (stated in the row and in the
SAM guide), the row says so and the difference is not expected to be small.

Run with the benchmark environment (it has pytorch-optimizer)::

    PYTHONPATH=. /work/venv-bench/bin/python benchmarks/check_sam_variants.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_optimizer as po

from sharpgen.optim import SAM, WSAM, FriendlySAM, LookSAM

D = torch.float64
STEPS = 8


def make(single: bool) -> nn.Module:
    torch.manual_seed(0)
    if single:  # one parameter tensor: LookSAM's per-tensor and global forms coincide
        return nn.Linear(6, 3, bias=False).to(D)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g, dtype=D), torch.randn(16, 3, generator=g, dtype=D))
            for _ in range(STEPS)]  # fmt: skip


def run_ours(model, opt):
    for x, y in batches():

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_po(model, opt, runs_both_passes: bool = False):
    for x, y in batches():

        def closure(x=x, y=y):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        if not runs_both_passes:
            closure()  # its documented use: gradient at w first, then step(closure)
        opt.step(closure)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    kw = {"lr": 0.05, "momentum": 0.9}
    rows = []

    def compare(name, ours, theirs, single=False, both=False, note="same update"):
        a, b = make(single), make(single)
        wa = run_ours(a, ours(a))
        wb = run_po(b, theirs(b), both)
        start = torch.cat([p.detach().reshape(-1) for p in make(single).parameters()])
        rows.append((name, float((wa - wb).abs().max()), float((wa - start).abs().max()), note))

    compare("SAM", lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.1, **kw),
            lambda m: po.SAM(m.parameters(), torch.optim.SGD, rho=0.1, **kw))  # fmt: skip
    compare("LookSAM k=3 alpha=0.7 (one tensor)",
            lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, **kw),
            lambda m: po.LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, **kw),
            single=True, note="same update (1e-8 in their reuse denominator)")  # fmt: skip
    compare("LookSAM k=3 alpha=0.7 (MLP)",
            lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, **kw),
            lambda m: po.LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, **kw),
            note="differs by design: global (paper) vs per-tensor projection")  # fmt: skip
    for decouple in (True, False):
        compare(f"WSAM gamma=0.8 decouple={decouple}",
                lambda m, d=decouple: WSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=0.8,
                                           decouple=d, **kw),
                lambda m, d=decouple: po.WSAM(m, m.parameters(), torch.optim.SGD, rho=0.1,
                                              gamma=0.8, decouple=d, **kw),
                both=True)  # fmt: skip
    compare("FriendlySAM sigma=1 lmbda=0.9",
            lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, **kw),
            lambda m: po.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, **kw),
            note="differs by design: paper's m_t, m_0 = 0 vs their m_{t-1}, m_1 = g_1")  # fmt: skip
    compare("FriendlySAM sigma=0 (= SAM)",
            lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, sigma=0.0, **kw),
            lambda m: po.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, sigma=0.0,
                                     **kw))  # fmt: skip
    print(f"{STEPS} steps, float64, SGD(lr=0.05, momentum=0.9) base\n")
    print("| variant | max abs weight difference | max abs weight change | note |")
    print("|---|---|---|---|")
    for name, diff, moved, note in rows:
        print(f"| {name} | {diff:.2e} | {moved:.2e} | {note} |")


if __name__ == "__main__":
    main()
