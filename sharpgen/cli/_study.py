"""``sharpgen study``: train a grid of models, measure them, rank the measures."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["REQUIRES", "add_parser", "run", "interrupted_hint"]

#: what ``sharpgen study`` cannot run without (scikit-learn only for its data sets)
REQUIRES = ("torch", "numpy", "scipy")

_HELP = """\
Does sharpness predict generalization here? Train a grid of small models that differ in
their hyperparameters (models of one architecture train together, stacked), compute every
sharpness and complexity measure on each, and rank the measures by how well they order the
models' generalization gaps (Kendall's tau, granulated Kendall, conditional mutual
information, sign-error), as in Jiang et al. (2020) and Dziugaite et al. (2020).

Writes into --out: checkpoints/ (one per trained stack of models, for --resume),
training.csv (every model: hyperparameters, stop step, metrics), the measure table and
report.md.

Models that do not reach the stopping rule within the step cap are left out of the analysis
and listed in the report. Ctrl-C stops with exit status 130; finished stacks are kept and
the same command plus --resume continues. Usage errors exit with status 2 and one line.
Under torchrun the stacks are spread over the processes and rank 0 writes the report.
"""

_EXAMPLES = """\
examples:
  sharpgen study --list
  sharpgen study --preset quick --out results/study-quick
  sharpgen study --preset quick --out results/study-quick --resume     # after Ctrl-C
  torchrun --nproc-per-node 2 -m sharpgen study --preset digits-large --out results/large
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``study`` to the sub-parsers ``sub`` of the ``sharpgen`` parser."""
    p = sub.add_parser(
        "study",
        help="train many models and rank sharpness/complexity measures by generalization",
        description=_HELP,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="quick", metavar="NAME", help="the study (default quick)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory "
                   "(default results/study-NAME)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the study's seed (default 0)")
    p.add_argument(
        "--resume", action="store_true", help="read finished stacks from DIR/checkpoints"
    )
    p.add_argument("--train-only", action="store_true", help="train (and write training.csv) only")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _fail(message: str) -> int:
    print(f"sharpgen study: error: {message}", file=sys.stderr)
    return 2


def _out(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out is not None else Path("results") / f"study-{args.preset}"


def interrupted_hint(args: argparse.Namespace) -> str:
    """What to tell the user after Ctrl-C."""
    return (
        f"finished stacks are checkpointed in {_out(args) / 'checkpoints'}; continue with "
        "the same command plus --resume"
    )


def _out_problem(out: Path) -> str | None:
    if out.exists() and not out.is_dir():
        return f"--out {out} is an existing file, not a directory; give a directory path"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        return f"--out {out} is not writable ({exc.strerror or exc}); give another directory"
    return None


def list_presets() -> str:
    """The ``--list`` text: one line per preset with its size and description."""
    from sharpgen.study._presets import STUDY_PRESETS
    from sharpgen.study._train import plan_stacks

    width = max(len(n) for n in STUDY_PRESETS) + 2
    lines = ["study presets (sharpgen study --preset NAME):"]
    for name, spec in STUDY_PRESETS.items():
        stacks = len(plan_stacks(spec, 1))
        head = f"{spec.n_models()} models in {stacks} stacks, data {spec.data}: "
        text = textwrap.wrap(head + spec.description, 96 - width)
        lines.append(f"  {name:{width}s}{text[0]}")
        lines += [" " * (width + 2) + t for t in text[1:]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``sharpgen study`` with the parsed ``args``; returns the exit status."""
    from sharpgen.experiments._checkpoint import CheckpointError
    from sharpgen.study._presets import STUDY_PRESETS

    if args.list:
        print(list_presets())
        return 0
    if args.preset not in STUDY_PRESETS:
        return _fail(
            f"unknown preset {args.preset!r}; the presets are {', '.join(STUDY_PRESETS)} "
            "(see --list)"
        )
    if args.seed < 0:
        return _fail(f"--seed {args.seed} must be >= 0")
    spec = STUDY_PRESETS[args.preset]
    if spec.data in ("digits", "breast_cancer") and importlib.util.find_spec("sklearn") is None:
        return _fail(
            f"preset {args.preset!r} uses scikit-learn's {spec.data} data, but scikit-learn "
            "is not installed; install it with: pip install 'sharpgen[study]'"
        )
    out = _out(args)
    problem = _out_problem(out)
    if problem is not None:
        return _fail(problem)
    from sharpgen.study._runner import run_study

    try:
        result = run_study(
            spec, out, resume=args.resume, progress=not args.no_progress, seed=args.seed,
            measure=not args.train_only,
        )  # fmt: skip
    except CheckpointError as exc:
        return _fail(str(exc))
    if result is None:  # a torchrun rank other than 0
        return 0
    kept, left = len(result.models), len(result.excluded)
    print(
        f"sharpgen study --preset {args.preset}: {kept + left} models, {kept} analysed, "
        f"{left} left out (missed the stopping rule); {len(result.trained)} stacks trained "
        f"now; training took {result.train_seconds:.1f} s"
    )
    report = out / "report.md"
    if report.exists():
        print(report.read_text())
    print(f"wrote {out / 'training.csv'}" + (f", {report}" if report.exists() else ""))
    return 0
