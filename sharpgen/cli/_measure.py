"""``sharpgen measure``: traces and test errors of the paper's flattest constructions."""

from __future__ import annotations

import argparse
from typing import Any

from sharpgen.cli._common import fail

__all__ = ["REQUIRES", "add_parser", "run"]

#: what ``sharpgen measure`` cannot run without
REQUIRES = ("torch", "numpy", "scipy")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``measure`` to the sub-parsers ``sub`` of the ``sharpgen`` parser."""
    mea = sub.add_parser(
        "measure",
        help="traces and test errors of the paper's flattest constructions",
        description="The flattest-minimizer side of Table 1: the closed-form constructions "
        "of the paper (memorizers and generalizers), their exact Hessian traces against the "
        "lower bounds, and their test errors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mea.add_argument("--d", type=int, default=30, help="input dimension, >= 2 (default 30)")
    mea.add_argument(
        "--n",
        type=int,
        default=100,
        help="distinct training points, 1..2^d (default 100); the simplified-BatchNorm "
        "construction needs all four sign patterns of (x1, x2) among them",
    )
    mea.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    mea.add_argument("--test-size", type=int, default=2000, help="test points (default 2000)")
    return mea


def _usage_problem(args: argparse.Namespace) -> str | None:
    """The flags' own limits, in the flags' names (before any data is drawn)."""
    if args.d < 2:
        return f"--d {args.d} must be >= 2 (the xor label needs two coordinates)"
    if args.n < 1:
        return f"--n {args.n} must be >= 1"
    if args.d < 63 and args.n > 2**args.d:
        return (
            f"--n {args.n} is more than the {2**args.d} distinct points of the cube "
            f"{{-1,1}}^{args.d} (--d {args.d}); lower --n to at most {2**args.d} or raise --d"
        )
    if args.test_size < 0:
        return f"--test-size {args.test_size} must be >= 0"
    if not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        return f"--seed {args.seed} is out of range; give a seed from 0 to 2**64 - 1"
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``sharpgen measure`` with the parsed ``args``; returns the exit status."""
    from sharpgen.experiments import constructions_table, measure_constructions

    problem = _usage_problem(args)
    if problem is not None:
        return fail("measure", problem)
    try:
        rows = measure_constructions(d=args.d, n=args.n, seed=args.seed, test_size=args.test_size)
    except ValueError as exc:
        if "sign patterns" in str(exc):  # the only data-dependent limit
            return fail(
                "measure",
                f"the --n {args.n} training points drawn with --seed {args.seed} miss one of "
                "the four sign patterns of (x1, x2) that the simplified-BatchNorm "
                "construction needs; raise --n (e.g. --n 20) or try another --seed",
            )
        flags = f"--d {args.d} --n {args.n} --seed {args.seed} --test-size {args.test_size}"
        return fail("measure", f"{flags}: {exc}")
    print(
        f"Flattest interpolators of the paper on xor data (d={args.d}, n={args.n} distinct "
        f"training points, {args.test_size} fresh test points, seed {args.seed}), float64:\n"
    )
    print(constructions_table(rows))
    if args.test_size == 0:
        print(
            "\nTest errors were not measured (--test-size 0); the table compares traces only. "
            "Run with --test-size > 0 to see which constructions generalize."
        )
    else:
        print(
            "\nEqual minimal traces, opposite test errors: with a bias (and with simplified "
            "LayerNorm) flatness does not decide generalization (Table 1, first column)."
        )
    return 0
