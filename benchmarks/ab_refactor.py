"""A/B check that a refactoring did not slow down the SAM step or the curvature product.

Loads two copies of sharpgen into ONE process, the working tree's and an older commit's
(``git archive REV sharpgen`` into a temporary folder), builds the same problems with each
and times them in interleaved rounds (each round runs every operation of both versions, the
order alternating between rounds), so that a change of machine load hits both alike. Timed
is the process CPU time of one call (less sensitive to other processes on a shared machine
than wall time); reported are the medians and the ratio new/old.

Operations (float32, CPU, one torch thread by default):

* SAM family (`benchmarks/bench_sam.py`'s conv net, CIFAR-sized input): one ``step(closure)``
  of each optimizer present in both versions, SAM's two-call style, and the plain SGD step
  they are divided by (the "x SGD" columns: the step cost in SGD steps).
* Curvature (`benchmarks/bench_curvature.py --quick`'s problems: conv net at batch 32, MLP at
  batch 128): one Hessian-vector product with the default options (and with ``backend=
  "func"`` and ``"autograd"``), a k=8 block, per gradient.

Run it with the benchmark environment, under the benchmark lock on a shared machine::

    PYTHONPATH=$PWD python benchmarks/ab_refactor.py --old 5763ef5 --rounds 15
    PYTHONPATH=$PWD python benchmarks/ab_refactor.py --old d0fd819 --markdown ab.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

K = 5  # SAM every K steps / LookSAM's k (those rows time K steps)


def _purge() -> None:
    for name in [n for n in sys.modules if n == "sharpgen" or n.startswith("sharpgen.")]:
        del sys.modules[name]


def load(root: Path) -> SimpleNamespace:
    """Import the sharpgen found in ``root`` and return the pieces timed here."""
    _purge()
    sys.path.insert(0, str(root))
    try:
        import sharpgen.curvature as curvature
        import sharpgen.optim as optim

        return SimpleNamespace(optim=optim, HessianOperator=curvature.HessianOperator)
    finally:
        sys.path.remove(str(root))
        _purge()


def extract(rev: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "sharpgen"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def _fresh() -> nn.Module:
    torch.manual_seed(0)
    return conv_net()


def _steps(opt: Any, model: nn.Module, x: Any, y: Any, steps: int = 1) -> Callable[[], None]:
    def closure() -> Any:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def run() -> None:
        for _ in range(steps):
            opt.step(closure)

    return run


def sam_ops(v: SimpleNamespace, x: Any, y: Any) -> dict[str, Callable[[], None]]:
    """The SAM-family steps of one version (those it has)."""
    o, kw, sgd = v.optim, {"lr": 0.05, "momentum": 0.9}, torch.optim.SGD
    makers: dict[str, Callable[[nn.Module], Any]] = {
        "SAM": lambda m: o.SAM(m.parameters(), sgd, rho=0.05, **kw),
        "GSAM": lambda m: o.GSAM(m.parameters(), sgd, rho_max=0.05, alpha=0.1, **kw),
        "MSAM": lambda m: o.MSAM(m.parameters(), sgd, rho=0.3, **kw),
        "WSAM": lambda m: o.WSAM(m.parameters(), sgd, rho=0.05, gamma=0.9, **kw),
        "FriendlySAM": lambda m: o.FriendlySAM(m.parameters(), sgd, rho=0.05, **kw),
        "BSAM": lambda m: o.BSAM(m.parameters(), num_data=50_000, lr=kw["lr"], rho=0.05),
    }
    out = {}
    for name, make in makers.items():
        if hasattr(o, name.split()[0]):
            model = _fresh()
            out[name] = _steps(make(model), model, x, y)
    if hasattr(o, "LookSAM"):
        model = _fresh()
        opt = o.LookSAM(model.parameters(), sgd, rho=0.05, k=K, alpha=0.7, **kw)
        out[f"LookSAM k={K} (/{K})"] = _steps(opt, model, x, y, K)
        model = _fresh()
        opt = o.SAM(model.parameters(), sgd, rho=0.05, interval=K, **kw)
        out[f"SAM interval={K} (/{K})"] = _steps(opt, model, x, y, K)
    if hasattr(o, "ESAM"):
        model = _fresh()
        esam = o.ESAM(model.parameters(), sgd, rho=0.05, beta=0.6, gamma=0.5, **kw)
        out["ESAM"] = lambda: esam.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    model = _fresh()
    two = o.SAM(model.parameters(), sgd, rho=0.05, **kw)

    def two_call() -> None:
        two.zero_grad()
        F.cross_entropy(model(x), y).backward()
        two.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        two.second_step()

    out["SAM first/second_step"] = two_call
    return out


def curvature_problems() -> dict[str, tuple[nn.Module, Any, Any]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    conv = conv_net().eval()
    xc, yc = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    xm, ym = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    return {"conv": (conv, xc, yc), "mlp": (mlp, xm, ym)}


def curvature_ops(v: SimpleNamespace, problems: dict) -> dict[str, Callable[[], Any]]:
    out = {}
    for pname, (model, x, y) in problems.items():
        n = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(1)
        v1, v8 = torch.randn(n, 1, generator=gen), torch.randn(n, 8, generator=gen)
        for label, options in (("default", {}), ("func", {"backend": "func"}),
                               ("autograd", {"backend": "autograd"})):  # fmt: skip
            op = v.HessianOperator(model, F.cross_entropy, (x, y), **options)
            out[f"{pname} HVP {label}"] = lambda op=op, v=v1: op.matmat(v)
        op = v.HessianOperator(model, F.cross_entropy, (x, y))
        out[f"{pname} k=8 block default (/8)"] = lambda op=op, v=v8: op.matmat(v)
    return out


def grad_refs(problems: dict) -> dict[str, Callable[[], Any]]:
    out = {}
    for pname, (model, x, y) in problems.items():
        params = list(model.parameters())
        out[pname] = lambda m=model, x=x, y=y, p=params: torch.autograd.grad(
            F.cross_entropy(m(x), y), p
        )
    return out


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def interleave(ops: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median CPU time per op; each round runs every op once, alternating the order."""
    names = list(ops)
    for name in names:  # warm-up
        ops[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(ops[name]))
    return {n: statistics.median(ts) for n, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="5763ef5", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64, help="SAM step batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", choices=("sam", "curvature"), default=None)
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        old = load(extract(args.old, Path(tmp)))
        new = load(ROOT)
        lines = [f"A/B new (working tree) vs old ({args.old}), CPU time, median of "
                 f"{args.rounds} interleaved rounds, {args.threads} thread(s)", ""]  # fmt: skip
        if args.skip != "sam":
            lines += _sam_table(old, new, args)
        if args.skip != "curvature":
            lines += _curvature_table(old, new, args)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def _sam_table(old: SimpleNamespace, new: SimpleNamespace, args: Any) -> list[str]:
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    model = _fresh()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ops: dict[str, Callable[[], Any]] = {"SGD": _steps(sgd, model, x, y)}
    a, b = sam_ops(old, x, y), sam_ops(new, x, y)
    common = [n for n in b if n in a]
    for n in common:
        ops[f"old {n}"], ops[f"new {n}"] = a[n], b[n]
    t = interleave(ops, args.rounds)
    out = [f"| SAM step (batch {args.batch}) | old x SGD | new x SGD | new / old |",
           "|---|---|---|---|"]  # fmt: skip
    for n in common:
        per = K if f"(/{K})" in n else 1
        o, w = t[f"old {n}"] / per / t["SGD"], t[f"new {n}"] / per / t["SGD"]
        out.append(f"| {n} | {o:.2f} | {w:.2f} | {t[f'new {n}'] / t[f'old {n}']:.2f} |")
    out.append(f"| (SGD step: {t['SGD'] * 1e3:.1f} ms CPU) | | | |")
    return [*out, ""]


def _curvature_table(old: SimpleNamespace, new: SimpleNamespace, args: Any) -> list[str]:
    problems = curvature_problems()
    refs = grad_refs(problems)
    a, b = curvature_ops(old, problems), curvature_ops(new, problems)
    ops: dict[str, Callable[[], Any]] = {f"grad {p}": fn for p, fn in refs.items()}
    for n in b:
        ops[f"old {n}"], ops[f"new {n}"] = a[n], b[n]
    t = interleave(ops, args.rounds)
    out = ["| curvature product | old x grad | new x grad | new / old |", "|---|---|---|---|"]
    for n in b:
        per = 8 if "(/8)" in n else 1
        g = t[f"grad {n.split()[0]}"]
        o, w = t[f"old {n}"] / per / g, t[f"new {n}"] / per / g
        out.append(f"| {n} | {o:.2f} | {w:.2f} | {t[f'new {n}'] / t[f'old {n}']:.2f} |")
    return [*out, ""]


if __name__ == "__main__":
    main()
