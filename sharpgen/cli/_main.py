"""Argument parsing and the ``reproduce`` / ``measure`` sub-commands."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
sharpgen: measure and minimize sharpness, and reproduce Wen, Li & Ma (2023),
"Sharpness Minimization Algorithms Do Not Only Minimize Sharpness To Achieve Better
Generalization" (NeurIPS 2023).

Start with:   sharpgen reproduce            (the quick preset: Table 1 in a few CPU minutes)
"""

_REPRODUCE_HELP = """\
Train the paper's two-layer ReLU nets with 1-SAM (and the GD + weight-decay baseline) on
the xor data set and print the measured Table 1 next to the paper's: does 1-SAM generalize,
and how close is its Hessian trace to the known lower bound?

Writes into --out: results.json (all metric histories), table1.png (test accuracy and trace
against epoch), report.md (the tables), and checkpoints/ (for --resume).

Presets (run 'sharpgen reproduce --list' for every experiment and its settings):
  quick           all four rows of Table 1 with documented deviations (default; ~1-3 min)
  medium          the paper's sizes, what quick cannot show (~7 min idle, 2 jobs)
  sweep-n         no-bias vs bias 1-SAM test error for n = 25..400, Thm 3.1 (~2 min idle)
  paper           every run of the paper's Table 2 at full scale (days of CPU time; GPU)
  paper-logistic  the logistic-loss runs with label smoothing (Figs. 8-10, full scale)
or single experiments such as 'paper-fig1b'. Times are for the 2-core development machine
without other load (see the guide, docs/guide/reproduce.md).

Ctrl-C stops at once with exit status 130; finished epochs are kept in checkpoints and the
same command plus --resume continues. Usage errors exit with status 2 and one line. An
experiment that diverges is marked FAILED in the report while the others still run; the
command then exits with status 1 and one line naming it.
"""

_EXAMPLES = """\
examples:
  sharpgen reproduce                              # quick preset, 3 seeds, into results/quick
  sharpgen reproduce --seeds 5 --out results/q5
  sharpgen reproduce --preset paper-fig1b paper-fig4b --device cuda --out results/paper
  sharpgen reproduce --preset paper --resume --out results/paper   # continue after a crash
  sharpgen reproduce --preset paper-fig1b --compile --out results/fig1b   # torch.compile
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``sharpgen`` argument parser (sub-commands ``reproduce`` and ``measure``)."""
    parser = _Parser(
        prog="sharpgen",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from sharpgen._version import __version__

    parser.add_argument("--version", action="version", version=f"sharpgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rep = sub.add_parser(
        "reproduce",
        help="train the paper's experiments and report the measured Table 1",
        description=_REPRODUCE_HELP,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument(
        "--preset",
        nargs="+",
        default=["quick"],
        metavar="NAME",
        help="preset(s) or group(s) to run (default: quick); see --list",
    )
    rep.add_argument(
        "--seeds",
        type=int,
        default=3,
        metavar="N",
        help="runs per experiment, seeds 0..N-1 (default: 3)",
    )
    rep.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default: cpu)"
    )
    rep.add_argument(
        "--out",
        default="results/quick",
        metavar="DIR",
        help="output directory (default: results/quick)",
    )
    rep.add_argument(
        "--resume",
        action="store_true",
        help="continue every experiment from its checkpoint in DIR/checkpoints if present",
    )
    rep.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="J",
        help="experiments trained at once in separate processes on the CPU "
        "(default: min(2, number of CPUs))",
    )
    rep.add_argument(
        "--compile",
        action="store_true",
        help="run the 1-SAM step of the no-bias, bias and simplified-LayerNorm nets through "
        "torch.compile: 6-45 s to compile in every process, then 1.1-1.45x faster per step "
        "(worth it for runs of an hour or more); results equal the eager ones to float "
        "rounding, not bitwise. The simplified-BatchNorm step is not compiled (slower "
        "compiled). Default: off",
    )
    rep.add_argument("--list", action="store_true", help="list the presets and exit")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    mea = sub.add_parser(
        "measure",
        help="traces and test errors of the paper's flattest constructions",
        description="The flattest-minimizer side of Table 1: the closed-form constructions "
        "of the paper (memorizers and generalizers), their exact Hessian traces against the "
        "lower bounds, and their test errors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mea.add_argument("--d", type=int, default=30, help="input dimension (default 30)")
    mea.add_argument("--n", type=int, default=100, help="training points (default 100)")
    mea.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    mea.add_argument("--test-size", type=int, default=2000, help="test points (default 2000)")
    return parser


def _describe(spec) -> tuple[str, str, str, str]:
    """The ``--list`` columns of an experiment: figure, model, method, schedule."""
    model = [spec.arch, f"d={spec.d}", f"n={spec.n}", f"m={spec.width}"]
    model += [f"depth={spec.depth}"] if spec.depth > 2 else []
    model += [spec.activation] if spec.activation != "relu" else []
    model += [spec.data] if spec.data != "xor_cube" else []
    if spec.loss == "logistic":
        model.append(f"logistic p={spec.label_smoothing / 2:g}")
    if spec.method == "sgd":
        method = f"sgd batch={spec.batch_size} wd={spec.weight_decay:g}"
        sched = " + ".join(f"{p.epochs} ep lr {p.lr:g}" for p in spec.phases)
    else:
        method = spec.method
        sched = " + ".join(f"{p.epochs} ep lr {p.lr:g} rho {p.rho:g}" for p in spec.phases)
    return spec.paper or "-", " ".join(model), method, sched


def _list_presets() -> str:
    from sharpgen.experiments import PRESET_GROUPS, PRESETS

    width = max(len(name) for name in (*PRESETS, *PRESET_GROUPS)) + 2
    lines = ["groups (sharpgen reproduce --preset GROUP):"]
    for name, members in PRESET_GROUPS.items():
        wrapped = textwrap.wrap(", ".join(members), 96 - width, break_on_hyphens=False)
        lines.append(f"  {name:{width}s}{wrapped[0]}")
        lines += [" " * (width + 2) + more for more in wrapped[1:]]
    rows = {name: _describe(spec) for name, spec in PRESETS.items()}
    cols = [max(len(row[i]) for row in rows.values()) for i in range(3)]
    lines += ["", "experiments (paper figure, model, method, epochs with lr and rho):"]
    for name, row in rows.items():
        cells = "  ".join(f"{cell:{w}s}" for cell, w in zip(row, cols, strict=False))
        lines.append(f"  {name:{width}s}{cells}  {row[3]}")
    return "\n".join(lines)


def _fail(command: str, message: str) -> int:
    """Print the one-line usage error of ``sharpgen <command>`` and return exit status 2."""
    print(f"sharpgen {command}: error: {message}", file=sys.stderr)
    return 2


def _out_dir_problem(out: Path) -> str | None:
    """Why ``--out`` cannot be used (created if missing), or None if it can."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is an existing file, not a directory; give a directory path"
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return f"--out {out} lies under the file {parent}; give a directory path"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        return (
            f"--out {out} is not writable ({exc.strerror or exc}); give a directory you can "
            "write to"
        )
    ckpt = out / "checkpoints"
    if ckpt.exists() and not ckpt.is_dir():
        return f"{ckpt} is a file, but checkpoints go into a directory there; move it away"
    return None


def _reproduce_usage_problem(args: argparse.Namespace) -> str | None:
    import torch

    if args.seeds < 1:
        return f"--seeds {args.seeds} must be >= 1"
    if args.jobs is not None and args.jobs < 1:
        return f"--jobs {args.jobs} must be >= 1 (or leave it out for min(2, CPUs))"
    if args.device == "cuda" and not torch.cuda.is_available():
        return (
            "--device cuda but torch.cuda.is_available() is False; use --device cpu or "
            "install a CUDA build of torch"
        )
    return _out_dir_problem(Path(args.out))


def _reproduce(args: argparse.Namespace) -> int:
    from sharpgen.experiments import (
        get_preset,
        markdown_report,
        plot_results,
        plot_sweep,
        run_experiments,
        save_results,
    )
    from sharpgen.experiments._checkpoint import CheckpointError, atomic_write_text
    from sharpgen.experiments._runner import check_resumable
    from sharpgen.experiments._spread import launched_world_size, run_spread

    if args.list:
        print(_list_presets())
        return 0
    try:
        specs = get_preset(*args.preset)
    except ValueError as exc:
        return _fail("reproduce", str(exc))
    problem = _reproduce_usage_problem(args)
    if problem is not None:
        return _fail("reproduce", problem)
    out = Path(args.out)
    seeds = list(range(args.seeds))
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    start = time.perf_counter()
    done = []

    def keep(res):
        done.append(res)
        save_results(done, out / "results.json")

    world = launched_world_size()
    options = {
        "device": args.device,
        "checkpoint_dir": out / "checkpoints",
        "resume": args.resume,
        "progress": not args.no_progress,
        "compile": args.compile,
        "keep_going": True,  # a diverged experiment is reported; the others still train
    }
    try:
        if world > 1:  # launched by torchrun: experiments spread over the processes
            check_resumable(specs, seeds, out / "checkpoints", args.resume)
            results = run_spread(specs, seeds, **options)
            if results is None:  # not rank 0: rank 0 writes the report
                return 0
        else:
            results = run_experiments(specs, seeds, jobs=jobs, on_result=keep, **options)
    except CheckpointError as exc:
        return _fail("reproduce", str(exc))
    written = [save_results(results, out / "results.json")]
    finished = [r for r in results if r.error is None]
    if finished:
        written.append(plot_results(finished, out / "table1.png"))
    sweep = plot_sweep(results, out / "sweep_n.png")
    report = markdown_report(results, title=f"sharpgen reproduce --preset {' '.join(args.preset)}")
    report += (
        f"\nTotal wall time: {time.perf_counter() - start:.1f} s on {args.device} "
        f"({f'{world} torchrun processes' if world > 1 else f'{jobs} parallel job(s)'}), "
        f"{len(seeds)} seeds.\n" + ("\n![plots](table1.png)\n" if finished else "")
    )
    written.append(atomic_write_text(out / "report.md", report))
    print(report)
    print("wrote " + ", ".join(str(path) for path in [*written, *([sweep] if sweep else [])]))
    return _failure_summary(results, out / "report.md")


def _failure_summary(results: Sequence, report: Path) -> int:
    """Exit status 1 with one line naming the failed experiments, 0 when none failed."""
    failed = [r.spec.name for r in results if r.error is not None]
    if not failed:
        return 0
    print(
        f"sharpgen reproduce: {len(failed)} of {len(results)} experiments failed (diverged): "
        f"{', '.join(failed)}; the others finished; see {report}",
        file=sys.stderr,
    )
    return 1


def _measure(args: argparse.Namespace) -> int:
    from sharpgen.experiments import constructions_table, measure_constructions

    if args.test_size < 0:
        return _fail("measure", f"--test-size {args.test_size} must be >= 0")
    try:
        rows = measure_constructions(d=args.d, n=args.n, seed=args.seed, test_size=args.test_size)
    except ValueError as exc:
        return _fail("measure", str(exc))
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


def _interrupted(args: argparse.Namespace) -> int:
    """The one line printed on Ctrl-C; exit status 130 (128 + SIGINT), as shells use.

    Under ``torchrun`` only rank 0 prints it (every rank gets the signal).
    """
    if os.environ.get("RANK", "0") != "0":
        return 130
    if args.command == "reproduce":
        hint = (
            f"finished epochs are checkpointed in {Path(args.out) / 'checkpoints'} (at most "
            "30 s old); continue with the same command plus --resume"
        )
    else:
        hint = "nothing was written; run the command again"
    print(f"sharpgen {args.command}: interrupted; {hint}", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sharpgen`` command line; returns the exit status.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success; 1 when an experiment failed (diverged: it is marked in the report, the
        others still ran, and one line on stderr names it); 2 on a usage error (one line
        ``sharpgen <command>: error: ...`` on stderr, no traceback); 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "measure":
            return _measure(args)
    except KeyboardInterrupt:
        return _interrupted(args)
    parser.print_help()
    print("\n" + textwrap.dedent(_EXAMPLES))
    return 0
