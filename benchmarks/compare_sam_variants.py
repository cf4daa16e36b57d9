"""The SAM-family optimizers on the paper's two-layer ReLU nets (bias and no bias).

xor on the 6-cube, 24 distinct training points, width 50, float64, the same initialization
and the same 600 mini-batches of 4 for every optimizer (SGD base, lr 0.01, momentum 0.9).
Prints, per net and optimizer: the final training loss, the trace of the Hessian of the
training loss at the end (`sharpgen.interpolation_trace`, the paper's quantity), the 0-1
error on the whole cube (the test set) and the wall time of the training loop.

    PYTHONPATH=. /work/venv/bin/python benchmarks/compare_sam_variants.py
"""

import time

import torch

import sharpgen as sg
from sharpgen.optim import GSAM, MSAM, SAM, WSAM, FriendlySAM, LookSAM

d, n, width, steps = 6, 24, 50, 600
data = sg.xor_cube(
    d, n, unique=True, generator=torch.Generator().manual_seed(0), dtype=torch.float64
)
X, y = data.train
cube = sg.full_cube(d, dtype=torch.float64)
y_cube = sg.xor_labels(cube)
kw = {"lr": 0.01, "momentum": 0.9}
variants = {
    "SGD": None,
    "SAM": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, **kw),
    "SAM interval=4": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, interval=4, **kw),
    "LookSAM k=4": lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.05, k=4, **kw),
    "MSAM": lambda ps: MSAM(ps, torch.optim.SGD, rho=0.3, **kw),
    "WSAM": lambda ps: WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.8, **kw),
    "FriendlySAM": lambda ps: FriendlySAM(ps, torch.optim.SGD, rho=0.05, **kw),
    "GSAM": lambda ps: GSAM(ps, torch.optim.SGD, rho_max=0.05, alpha=0.1, **kw),
}
print("| net | optimizer | train loss | trace | cube error | wall s |")
print("|---|---|---|---|---|---|")
for arch in ("bias", "no_bias"):
    for name, build in variants.items():
        g = torch.Generator().manual_seed(1)
        net = sg.two_layer_relu(d, width, bias=arch == "bias", generator=g, dtype=torch.float64)
        opt = torch.optim.SGD(net.parameters(), **kw) if build is None else build(net.parameters())
        batches = torch.randint(0, n, (steps, 4), generator=torch.Generator().manual_seed(2))
        start = time.perf_counter()
        for idx in batches:

            def closure(idx=idx, opt=opt, net=net):
                opt.zero_grad()
                loss = ((net(X[idx]) - y[idx]) ** 2).mean()
                loss.backward()
                return loss

            if build is None:
                closure()
                opt.step()
            else:
                opt.step(closure)
        wall = time.perf_counter() - start
        loss = float(((net(X).detach() - y) ** 2).mean())
        trace = float(sg.interpolation_trace(net, X))
        error = sg.zero_one_error(net, cube, y_cube)
        print(f"| {arch} | {name} | {loss:.1e} | {trace:.2f} | {error:.3f} | {wall:.2f} |")
