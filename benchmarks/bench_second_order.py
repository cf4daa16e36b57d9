"""Cost of the second-derivative check relative to a `top_eigenvalues` call.

Every `ModelObjective` checks, once, that the loss has a second derivative (no custom
``autograd.Function`` with a ``@once_differentiable`` or detached backward; see
`sharpgen.curvature._second_order`). On the benchmark models of ``bench_curvature.py`` (the
~1M-parameter conv net and the MLP, float32, cross-entropy, one batch) this script times, in
interleaved rounds (median of ``--repeats`` after one warm-up):

* ``top_eigenvalues(k=1, tol=1e-3)``, the reference call (the check is part of it);
* the check as it runs there: a walk of the loss graph of the first batch, which the
  objective builds anyway to validate the data (``first_order_functions``);
* the extra pass the check needs only for models that contain custom Functions without the
  decorator: one gradient with ``create_graph=True`` on the first batch.

Run (CPU, torch threads = 1)::

    python benchmarks/bench_second_order.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_curvature import make_problem  # noqa: E402

from sharpgen.curvature._second_order import first_order_functions  # noqa: E402
from sharpgen.sharpness import top_eigenvalues  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _loss(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    return F.cross_entropy(model(x), y), params


def run(name: str, batch: int, repeats: int) -> dict[str, float]:
    model, x, y = make_problem(name, batch)

    def eig() -> None:
        top_eigenvalues(model, F.cross_entropy, (x, y), k=1, tol=1e-3,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip

    def walk() -> None:
        loss, params = _loss(model, x, y)
        t0 = time.perf_counter()
        assert first_order_functions(loss, params) == []
        times["walk"].append(time.perf_counter() - t0)

    def probe() -> None:
        loss, params = _loss(model, x, y)
        t0 = time.perf_counter()
        torch.autograd.grad(loss, params, create_graph=True)
        times["probe"].append(time.perf_counter() - t0)

    times: dict[str, list[float]] = {"eig": [], "walk": [], "probe": []}
    eig(), walk(), probe()  # warm-up
    times = {k: [] for k in times}
    for _ in range(repeats):
        t0 = time.perf_counter()
        eig()
        times["eig"].append(time.perf_counter() - t0)
        walk()
        probe()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = 32 if args.quick else 128
    repeats = args.repeats or (3 if args.quick else 5)
    print(f"torch {torch.__version__}, threads {args.threads}, batch {batch}, repeats {repeats}")
    print("| model | top_eigenvalues (s) | check: graph walk (ms) | walk / call | "
          "probe pass, custom Functions only (ms) | probe / call |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in ("conv", "mlp"):
        t = run(name, batch, repeats)
        print(
            f"| {name} | {t['eig']:.2f} | {1e3 * t['walk']:.3f} | {t['walk'] / t['eig']:.2e} | "
            f"{1e3 * t['probe']:.1f} | {t['probe'] / t['eig']:.1%} |"
        )


if __name__ == "__main__":
    main()
