"""``sharpgen reproduce``: train the paper's experiments and report the measured Table 1."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharpgen.cli._common import fail, missing_packages, note

__all__ = ["EXAMPLES", "REQUIRES", "add_parser", "interrupted_hint", "run"]

#: what ``sharpgen reproduce`` cannot run without (matplotlib and tqdm are optional)
REQUIRES = ("torch", "numpy", "scipy")

_HELP = """\
Train the paper's two-layer ReLU nets with 1-SAM (and the GD + weight-decay baseline) on
the xor data set and print the measured Table 1 next to the paper's: does 1-SAM generalize,
and how close is its Hessian trace to the known lower bound?

Writes into --out: results.json (all metric histories), table1.png (test accuracy and trace
against epoch; needs matplotlib, skipped with a note without it), report.md (the tables),
and checkpoints/ (for --resume).

Presets (run 'sharpgen reproduce --list' for every experiment and its settings):
  quick           all four rows of Table 1 with documented deviations (default; ~1-3 min)
  medium          the paper's sizes, what quick cannot show (~7 min idle, 2 jobs)
  sweep-n         no-bias vs bias 1-SAM test error for n = 25..400, Thm 3.1 (~2 min idle)
  paper           every run of the paper's Table 2 at full scale (days of CPU time; GPU)
  paper-logistic  the logistic-loss runs with label smoothing (Figs. 8-10, full scale)
or single experiments such as 'paper-fig1b'. Times are for the 2-core development machine
without other load (see the guide, docs/guide/reproduce.md).

Progress: on a terminal one bar per experiment (with tqdm installed); otherwise (a log file,
a pipe, CI) one plain line per finished phase and per finished experiment.

Ctrl-C stops at once with exit status 130; finished epochs are kept in checkpoints and the
same command plus --resume continues. Usage errors exit with status 2 and one line. An
experiment that diverges is marked FAILED in the report while the others still run; the
command then exits with status 1 and one line naming it.
"""

EXAMPLES = """\
examples:
  sharpgen reproduce                              # quick preset, 3 seeds, into results/quick
  sharpgen reproduce --seeds 5 --out results/q5
  sharpgen reproduce --preset paper-fig1b paper-fig4b --device cuda --out results/paper
  sharpgen reproduce --preset paper --resume --out results/paper   # continue after a crash
  sharpgen reproduce --preset paper-fig1b --compile --out results/fig1b   # torch.compile
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``reproduce`` to the sub-parsers ``sub`` of the ``sharpgen`` parser."""
    rep = sub.add_parser(
        "reproduce",
        help="train the paper's experiments and report the measured Table 1",
        description=_HELP,
        epilog=EXAMPLES,
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
    rep.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (neither bars nor lines)",
    )
    return rep


def _describe(spec: Any) -> tuple[str, str, str, str]:
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


def _out_dir_problem(text: str) -> str | None:
    """Why ``--out text`` cannot be used (created if missing), or None if it can."""
    if not text.strip():
        return (
            f"--out {text!r} is empty; give the directory to write into, e.g. --out "
            "results/quick (or --out . for the current directory)"
        )
    out = Path(text)
    try:
        if out.exists() and not out.is_dir():
            return f"--out {out} is an existing file, not a directory; give a directory path"
        parent = out
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            return f"--out {out} lies under the file {parent}; give a directory path"
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        return (
            f"--out {out} is not writable ({exc.strerror or exc}); give a directory you can "
            "write to"
        )
    except ValueError as exc:  # e.g. an embedded NUL character
        return f"--out {text!r} is not a valid path ({exc}); give a directory path"
    ckpt = out / "checkpoints"
    if ckpt.exists() and not ckpt.is_dir():
        return f"{ckpt} is a file, but checkpoints go into a directory there; move it away"
    return None


def _preset_problem(names: Sequence[str]) -> str | None:
    """The first unknown ``--preset`` name, with the closest valid ones, or None."""
    import difflib

    from sharpgen.experiments import PRESET_GROUPS, preset_names

    valid = preset_names()
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
            maybe = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            return (
                f"--preset {name}: unknown preset {name!r}; {maybe}groups: "
                f"{', '.join(PRESET_GROUPS)}; 'sharpgen reproduce --list' shows every "
                "experiment with its settings"
            )
    return None


def _compiler_problem(args: argparse.Namespace) -> str | None:
    """``--compile`` on the CPU needs the C++ compiler torch.compile (inductor) calls."""
    if not args.compile or args.device != "cpu":
        return None
    cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    if shutil.which(cxx) is None:
        return (
            f"--compile needs a C++ compiler for torch.compile on the CPU, and {cxx!r} was not "
            "found; install one (e.g. apt-get install g++), set CXX to it, or leave out "
            "--compile"
        )
    return None


def _usage_problem(args: argparse.Namespace) -> str | None:
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
    return _compiler_problem(args) or _out_dir_problem(args.out)


def run(args: argparse.Namespace) -> int:
    """Run ``sharpgen reproduce`` with the parsed ``args``; returns the exit status."""
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
    problem = _preset_problem(args.preset)
    if problem is not None:
        return fail("reproduce", problem)
    try:
        specs = get_preset(*args.preset)
    except ValueError as exc:
        return fail("reproduce", f"--preset {' '.join(args.preset)}: {exc}")
    problem = _usage_problem(args)
    if problem is not None:
        return fail("reproduce", problem)
    out = Path(args.out)
    world = launched_world_size()
    figures = not missing_packages(["matplotlib"])
    if not figures and os.environ.get("RANK", "0") == "0":
        note(
            "reproduce",
            "matplotlib is not installed, so no figures are drawn (results.json and "
            "report.md are written as usual); for them: pip install matplotlib",
        )
    seeds = list(range(args.seeds))
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    start = time.perf_counter()
    done = []

    def keep(res):
        done.append(res)
        save_results(done, out / "results.json")

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
        return fail("reproduce", str(exc))
    written = [save_results(results, out / "results.json")]
    finished = [r for r in results if r.error is None]
    plotted = bool(finished) and figures
    if plotted:
        written.append(plot_results(finished, out / "table1.png"))
    sweep = plot_sweep(results, out / "sweep_n.png") if figures else None
    report = markdown_report(results, title=f"sharpgen reproduce --preset {' '.join(args.preset)}")
    report += (
        f"\nTotal wall time: {time.perf_counter() - start:.1f} s on {args.device} "
        f"({f'{world} torchrun processes' if world > 1 else f'{jobs} parallel job(s)'}), "
        f"{len(seeds)} seeds.\n" + ("\n![plots](table1.png)\n" if plotted else "")
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


def interrupted_hint(args: argparse.Namespace) -> str:
    """What the one line after Ctrl-C says: where the checkpoints are and how to go on."""
    return (
        f"finished epochs are checkpointed in {Path(args.out) / 'checkpoints'} (at most "
        "30 s old); continue with the same command plus --resume"
    )
