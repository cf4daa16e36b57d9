"""Partial against full reorthogonalization in `sharpgen.linalg.lanczos`: products, errors, time.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bench_reorth.py \
        [--seeds 5] [--n 10000000] [--bases 8,40] [--rounds 3] [--threads 1] [--skip-time]
        [--models]

Two parts, in one process:

1. **Products and errors** on the spectra of the tests (n = 200 and 120, dense, known
   eigenvalues), for float64 and float32 operators, ``k`` in 1 and 5, an unrestarted basis
   and a small one (``k + 3``), ``--seeds`` start vectors: the products of each mode, the
   largest relative error of the returned values against ``torch.linalg.eigvalsh``
   (float64), how many runs converged, and the reorthogonalizations of ``"partial"``.
2. ``--models``: ``top_eigenvalues`` (``k`` in 1 and 5, ``tol=1e-3``) in each mode on the
   models of ``bench_topk.py`` (the anchors' MLP and CNN, the BatchNorm client), errors
   against `lanczos` at ``tol=1e-9``.
3. **Lanczos work per step beside the product** on a large cheap operator: a diagonal
   $A = \\mathrm{diag}(d)$ of length ``--n`` in float32 (five outliers 10, 9.5, 9, 8.5, 8 over
   a bulk in [0, 1]; its product is one pass over a vector), ``k=1, tol=1e-3``, a basis of
   ``--bases`` rows (8: the plan's file basis for ``k=1``; 40: the default), in memory
   (``"device"``) and in a file (``"disk"``). The product is timed inside the call and
   subtracted: what remains, divided by the steps, is the per-step overhead (the end's
   Ritz vectors included). Interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

from sharpgen.linalg import LinearOperator, lanczos

MODES = ("full", "partial")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def spectra() -> dict[str, torch.Tensor]:
    """The spectra of tests/linalg/test_linalg_lanczos*.py."""

    def bulk(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    i = torch.arange(1, 201, dtype=torch.float64)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return {
        "close_gap": torch.cat([t([10.0, 9.7, 5.0, 4.0, 3.0]), bulk(195, 0.0, 1.0, 1)]),
        "outliers_negative": torch.cat(
            [t([50.0, 30.0, 20.0, 15.0, 12.0, -10.0, -20.0]), bulk(193, -2.0, 2.0, 2)]
        ),
        "power_1": 100 / i,
        "power_2": 100 / i**2,
        "tied": torch.cat([t([5.0, 5.0, 5.0, 3.0, 3.0, 3.0]), bulk(114, -1.0, 1.0, 7)]),
        "clustered": torch.cat(
            [t([10.0, 10.0 - 1e-3, 10.0 - 2e-3, 9.99, 9.5, 9.4]), bulk(114, -1.0, 1.0, 7)]
        ),
        "negative": torch.cat(
            [t([40.0, 25.0, -30.0, 12.0, -13.0, 8.0, 6.0]), bulk(113, -1.0, 1.0, 7)]
        ),
    }


def accuracy(seeds: int) -> None:
    print("## Products and errors (dense test spectra, tol=1e-3)\n")
    print("| dtype | k | basis | runs | products full | products partial | max error full "
          "| max error partial | converged full / partial | reorth partial (mean) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    total = dict.fromkeys(MODES, 0)
    for dtype in (torch.float64, torch.float32):
        for k in (1, 5):
            for small in (False, True):
                stats = {mode: {"mv": 0, "err": 0.0, "conv": 0, "reorth": 0} for mode in MODES}
                runs = 0
                for si, lam in enumerate(spectra().values()):
                    Q = random_orthogonal(lam.numel(), 10 + si)
                    A = (Q * lam) @ Q.T
                    A = ((A + A.T) / 2).to(dtype)
                    # the distinct eigenvalues nearest each returned value: the truth
                    truth = torch.linalg.eigvalsh(A.double())
                    for seed in range(seeds):
                        runs += 1
                        for mode in MODES:
                            gen = torch.Generator().manual_seed(seed)
                            res = lanczos(A, k, tol=1e-3, reorth=mode, generator=gen,
                                          max_basis=k + 3 if small else None)  # fmt: skip
                            vals = res.eigenvalues.double()
                            near = (vals[:, None] - truth[None, :]).abs().min(dim=1).values
                            err = float((near / vals.abs()).max())
                            _tally(stats[mode], res, err)
                f, p = stats["full"], stats["partial"]
                total["full"] += f["mv"]
                total["partial"] += p["mv"]
                print(f"| {str(dtype)[6:]} | {k} | {'k+3' if small else 'default'} | {runs} "
                      f"| {f['mv']} | {p['mv']} | {f['err']:.1e} | {p['err']:.1e} "
                      f"| {f['conv']} / {p['conv']} | {p['reorth'] / runs:.1f} |")  # fmt: skip
    print(f"\nall runs: products full {total['full']}, partial {total['partial']}, "
          f"ratio {total['partial'] / total['full']:.3f}\n")  # fmt: skip


def _tally(s: dict, res: Any, err: float) -> None:
    """Add one run's products, convergence and reorthogonalizations to ``s``; keep the max error."""
    s["mv"] += res.num_matvecs
    s["err"] = max(s["err"], err)
    s["conv"] += res.converged
    s["reorth"] += res.num_reorth


def models(seeds: int) -> None:
    """`top_eigenvalues` with each mode on the models of ``bench_topk.py`` (k = 1 and 5)."""
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_topk import problems

    from sharpgen import top_eigenvalues
    from sharpgen.curvature import HessianOperator

    print("## top_eigenvalues on the models of bench_topk.py (tol=1e-3)\n")
    print("| model | k | runs | products full | products partial | max error full "
          "| max error partial | converged full / partial | reorth partial (sum) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (model, data) in problems("mlp,cnn,client").items():
        H = HessianOperator(model, F.cross_entropy, data, backend="autograd", cache_graph=True)
        ref = lanczos(H, k=6, tol=1e-9, max_iter=400,
                      generator=torch.Generator().manual_seed(5)).eigenvalues.double()  # fmt: skip
        H.clear_cache()
        for k in (1, 5):
            stats = {mode: {"mv": 0, "err": 0.0, "conv": 0, "reorth": 0} for mode in MODES}
            for seed in range(seeds):
                for mode in MODES:
                    gen = torch.Generator().manual_seed(seed)
                    res = top_eigenvalues(model, F.cross_entropy, data, k=k, reorth=mode,
                                          generator=gen)  # fmt: skip
                    err = float(((res.eigenvalues.double() - ref[:k]).abs() / ref[:k].abs()).max())
                    _tally(stats[mode], res, err)
            f, p = stats["full"], stats["partial"]
            print(f"| {name} | {k} | {seeds} | {f['mv']} | {p['mv']} | {f['err']:.1e} "
                  f"| {p['err']:.1e} | {f['conv']} / {p['conv']} | {p['reorth']} |")  # fmt: skip
    print()


def timing(n: int, rounds: int, directory: str | None, bases: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=g)
    d[:5] = torch.tensor([10.0, 9.5, 9.0, 8.5, 8.0])
    spent = [0.0]

    class Diagonal(LinearOperator):
        """diag(d), its products timed (the whole ``matvec``, checks included)."""

        def _matmat(self, V: torch.Tensor) -> torch.Tensor:
            return d.unsqueeze(1) * V

        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            y = super().matvec(v)
            spent[0] += time.perf_counter() - t0
            return y

    op = Diagonal(n, torch.float32, "cpu")
    cases = [(s, m) for s in ("device", "disk") for m in bases]
    times: dict[tuple[str, int, str], list[float]] = {}
    info: dict[tuple[str, int, str], tuple[int, int, int, float]] = {}
    load0 = os.getloadavg()
    for r in range(rounds + 1):  # the first round warms up
        for storage, m in cases:
            for mode in MODES:
                spent[0] = 0.0
                t0 = time.perf_counter()
                res = lanczos(op, 1, tol=1e-3, reorth=mode,
                              max_basis=m, basis_storage=storage, basis_dir=directory,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
                total = time.perf_counter() - t0
                key = (storage, m, mode)
                info[key] = (res.num_matvecs, res.num_restarts, res.num_reorth,
                             float(res.eigenvalues[0]))  # fmt: skip
                if r:
                    times.setdefault(key, []).append((total - spent[0]) / res.num_matvecs)
                del res
    load1 = os.getloadavg()
    print(f"## Lanczos work per step beside the product (diagonal, n = {n}, float32, k=1)\n")
    print(f"{torch.get_num_threads()} threads, medians of {rounds} interleaved rounds, "
          f"load {load0} / {load1}\n")  # fmt: skip
    print("| storage | basis | products full / partial | restarts | reorth partial "
          "| overhead/step full s | overhead/step partial s | partial / full |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for storage, m in cases:
        f, p = (statistics.median(times[(storage, m, mode)]) for mode in MODES)
        fi, pi = info[(storage, m, "full")], info[(storage, m, "partial")]
        print(f"| {storage} | {m} | {fi[0]} / {pi[0]} | {fi[1]} / {pi[1]} | {pi[2]} "
              f"| {f:.4f} | {p:.4f} | {p / f:.2f} |")  # fmt: skip
    print("\nproduct (one pass, d * x) for scale: ", end="")
    x = torch.randn(n, generator=g)
    t0 = time.perf_counter()
    for _ in range(5):
        d * x
    print(f"{(time.perf_counter() - t0) / 5:.4f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--bases", default="8,40", help="comma-separated basis sizes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", default=None, help="directory of the disk basis file")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--models", action="store_true", help="also the models of bench_topk.py")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("command: " + " ".join(["python", *sys.argv]) + "\n")
    if not args.skip_accuracy:
        accuracy(args.seeds)
    if args.models:
        models(args.seeds)
    if not args.skip_time:
        timing(args.n, args.rounds, args.dir, [int(b) for b in args.bases.split(",")])


if __name__ == "__main__":
    main()
