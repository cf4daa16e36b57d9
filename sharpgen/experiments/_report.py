"""Table 1 from measured runs: summary statistics, a Markdown report and plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sharpgen.experiments._checkpoint import atomic_write, atomic_write_text
from sharpgen.experiments._trainer import RunResult

__all__ = [
    "Table1Row",
    "table1",
    "markdown_report",
    "plot_results",
    "plot_sweep",
    "sweep_table",
    "save_results",
    "load_results",
]

_ARCH_LABEL = {
    "no_bias": "2-layer, no bias",
    "bias": "2-layer, bias",
    "simplified_bn": "2-layer, simplified BatchNorm",
    "simplified_ln": "2-layer, simplified LayerNorm",
}
# (all flattest minimizers generalize?, 1-SAM generalizes?) as stated by the paper's Table 1
_PAPER = {
    "no_bias": ("yes (Thm 3.1)", "yes"),
    "bias": ("no (Thm 4.1)", "no"),
    "simplified_bn": ("yes (Thm 3.2)", "yes"),
    "simplified_ln": ("no (Thm 5.1)", "yes"),
}
ACCURACY_THRESHOLD = 0.95


def _stats(values: Sequence[float]) -> tuple[float, float, float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return (math.nan,) * 4
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), sd, min(vals), max(vals)


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    mean, sd, lo, hi = _stats(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


@dataclass(frozen=True)
class Table1Row:
    """One measured row of the paper's Table 1.

    Attributes:
        arch: Architecture.
        sam: The 1-SAM run group (None if not run).
        baseline: The GD/SGD + weight-decay group for the same architecture (None if not run).
        reproduced: Whether the paper's 1-SAM outcome showed: mean test accuracy over seeds
            >= 0.95 where the paper says 1-SAM generalizes (seeds below are listed in
            ``verdict``); for the bias net, mean accuracy at
            least 0.1 below the no-bias 1-SAM run and a final trace below the baseline's.
            None when it cannot be decided (a run missing).
        verdict: A sentence explaining ``reproduced``.
    """

    arch: str
    sam: RunResult | None
    baseline: RunResult | None
    reproduced: bool | None
    verdict: str


def table1(results: Sequence[RunResult]) -> list[Table1Row]:
    """Group runs by architecture and decide, per row, whether the paper's outcome showed.

    Only two-layer ReLU runs on xor data with the MSE loss enter Table 1; per architecture the
    first 1-SAM run and the first GD/SGD run are used. Failed runs (``error`` set) are left out.
    """
    by_arch: dict[str, dict[str, RunResult]] = {}
    for res in results:
        s = res.spec
        if res.error is not None:
            continue  # diverged: no metrics to judge
        if (s.data, s.depth, s.activation, s.loss) != ("xor_cube", 2, "relu", "mse"):
            continue  # Table 1 is about two-layer ReLU nets on xor data with the MSE loss
        if s.name.startswith("sweep-"):
            continue  # the sample-complexity sweep has its own plot
        role = "baseline" if s.method == "sgd" else "sam"
        by_arch.setdefault(res.spec.arch, {}).setdefault(role, res)
    rows = []
    for arch in _ARCH_LABEL:
        if arch not in by_arch:
            continue
        sam = by_arch[arch].get("sam")
        base = by_arch[arch].get("baseline")
        reproduced, verdict = None, "no 1-SAM run"
        if sam is not None and arch != "bias":
            acc = sam.final("test_accuracy")
            mean = _stats(acc)[0]
            below = [a for a in acc if a < ACCURACY_THRESHOLD]
            reproduced = mean >= ACCURACY_THRESHOLD
            verdict = (
                f"mean 1-SAM test accuracy {mean:.3f} >= {ACCURACY_THRESHOLD}"
                if reproduced
                else f"NOT reproduced here: mean 1-SAM test accuracy {mean:.3f} < "
                f"{ACCURACY_THRESHOLD}"
            )
            if below:
                verdict += (
                    f" ({len(below)} of {len(acc)} seeds below {ACCURACY_THRESHOLD}: "
                    + ", ".join(f"{a:.3f}" for a in below)
                    + ")"
                )
        elif sam is not None:
            ref = by_arch.get("no_bias", {}).get("sam")
            sam_acc = _stats(sam.final("test_accuracy"))[0]
            parts: list[str] = []
            ok: bool | None = True
            if ref is None:
                parts.append("no no-bias 1-SAM run to compare with")
                ok = None
            else:
                gap = _stats(ref.final("test_accuracy"))[0] - sam_acc
                ok = gap >= 0.1
                parts.append(f"accuracy {gap:+.3f} below the no-bias net (needs >= 0.1)")
            if base is None:
                parts.append("no GD + wd baseline to compare the trace with")
                ok = None if ok is not False else False
            else:
                lower = _stats(sam.final("trace_gn"))[0] < _stats(base.final("trace_gn"))[0]
                parts.append(f"trace {'below' if lower else 'NOT below'} the GD + wd baseline")
                ok = ok and lower if ok is not None else None
            reproduced = ok
            verdict = ("" if ok else "NOT reproduced here: " if ok is False else "") + "; ".join(
                parts
            )
        rows.append(Table1Row(arch, sam, base, reproduced, verdict))
    return rows


def markdown_report(results: Sequence[RunResult], *, title: str = "sharpgen reproduce") -> str:
    """The measured Table 1 next to the paper's, per-experiment details and settings.

    Failed (diverged) experiments are listed first, marked **FAILED**, and left out of the
    tables; Table 1 is left out when no run belongs to it (a ``sweep-n``-only report).
    """
    rows = table1(results)
    done = [r for r in results if r.error is None]
    lines = [
        f"# {title}",
        "",
        "Wen, Li & Ma (2023), *Sharpness Minimization Algorithms Do Not Only Minimize Sharpness "
        f"To Achieve Better Generalization*{', Table 1,' if rows else ','} measured from the "
        "training runs below. Numbers are mean ± standard deviation [min, max] over seeds, at "
        "the last epoch.",
        "",
        *_failed_section(results),
        *_table1_section(rows),
        "The trace is the Hessian trace of the training loss at interpolation, "
        "$(1/n)\\sum_i \\ell''(f_i)\\lVert\\nabla_\\theta f(x_i)\\rVert^2$ (the Gauss-Newton "
        "part, Lemma 4.1; for the two ReLU nets without normalization it is the exact trace "
        "everywhere; the exact trace including the residual term is in `results.json` as "
        "`trace`). Lower bounds (`sharpgen.theory.trace_lower_bound`, on each run's "
        "training set): $4\\sqrt d$ (no bias), $4\\sqrt{d+1}$ (bias), 4 (simplified "
        "BatchNorm; an infimum, not attained), 2 (simplified LayerNorm). Test accuracy: "
        "zero-one, sign(f) against y (f = 0 counts wrong).",
        "",
    ]
    sweep = sweep_table(done)
    if sweep is not None:
        lines += [
            "## Sample-complexity sweep (Theorem 3.1)",
            "",
            "Final test zero-one error and test MSE of 1-SAM against the number of training "
            "points n (mean [min, max] over seeds); Theorem 3.1 bounds the test MSE of "
            "flattest no-bias interpolators by O~(d/n) once n = Omega(d log(d/delta)). Plot: "
            "`sweep_n.png`.",
            "",
            sweep,
        ]
    lines += [
        "## Experiments",
        "",
        "| experiment | paper | arch | method | d | n | width | schedule (epochs: lr, ρ) | "
        "seeds | final train loss | final test accuracy | final trace | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_experiment_row(res) for res in results),
    ]
    notes = [f"- **{r.spec.name}**: {r.spec.notes}" for r in results if r.spec.notes]
    if notes:
        lines += ["", "## Deviations from the paper", "", *notes]
    return "\n".join(lines) + "\n"


def _failed_section(results: Sequence[RunResult]) -> list[str]:
    """The report's list of failed experiments (none: no lines)."""
    failed = [r for r in results if r.error is not None]
    if not failed:
        return []
    lines = [
        "## Failed experiments",
        "",
        f"**FAILED: {len(failed)} of {len(results)} experiments** did not finish; they are left "
        "out of the tables and plots below.",
        "",
    ]
    for res in failed:
        seeds = ", ".join(str(s) for s in res.seeds)
        paper = f"{res.spec.paper}, " if res.spec.paper else ""
        lines.append(f"- **FAILED** `{res.spec.name}` ({paper}seeds {seeds}): {res.error}")
    return [*lines, ""]


def _table1_section(rows: Sequence[Table1Row]) -> list[str]:
    """The measured Table 1 next to the paper's (no rows: no lines)."""
    if not rows:
        return []
    lines = [
        "## Table 1",
        "",
        "| architecture | paper: all flattest minimizers generalize? | paper: 1-SAM "
        "generalizes? | measured 1-SAM test accuracy | 1-SAM trace / lower bound | "
        "GD + wd test accuracy | GD + wd trace | reproduced? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        flat, sam_gen = _PAPER[row.arch]
        sam_acc = _fmt(row.sam.final("test_accuracy")) if row.sam else "–"
        if row.sam is None:
            ratio = "–"
        elif math.isnan(row.sam.lower_bound[0]):
            ratio = f"{_fmt(row.sam.final('trace_gn'), 2)} (no bound for this loss)"
        else:
            ratio = (
                f"{_fmt(row.sam.final('trace_gn'), 2)} / {_stats(row.sam.lower_bound)[0]:.2f} = "
                f"{_fmt(row.sam.final('trace_ratio'), 3)}"
            )
        base_acc = _fmt(row.baseline.final("test_accuracy")) if row.baseline else "–"
        base_tr = _fmt(row.baseline.final("trace_gn"), 2) if row.baseline else "–"
        mark = {True: "yes", False: "**no**", None: "undecided"}[row.reproduced]
        lines.append(
            f"| {_ARCH_LABEL[row.arch]} | {flat} | {sam_gen} | {sam_acc} | {ratio} | {base_acc} "
            f"| {base_tr} | {mark}: {row.verdict} |"
        )
    return [*lines, ""]


def _experiment_row(res: RunResult) -> str:
    """One experiment's line of the report's Experiments table (**FAILED** if it failed)."""
    s = res.spec
    sched = "; ".join(f"{p.epochs}: {p.lr:g}, {p.rho:g}" for p in s.phases)
    if s.method == "sgd":
        sched += f" (batch {s.batch_size}, wd {s.weight_decay:g})"
    if res.error is not None:
        final = "**FAILED** (see above) | – | –"
    else:
        final = (
            f"{_fmt(res.final('train_loss'), 4)} | {_fmt(res.final('test_accuracy'))} | "
            f"{_fmt(res.final('trace_gn'), 2)}"
        )
    return (
        f"| {s.name} | {s.paper} | {s.arch} | {s.method} | {s.d} | {s.n} | {s.width} | "
        f"{sched} | {len(res.seeds)} | {final} | {res.wall_time_s:.1f} s |"
    )


def plot_results(results: Sequence[RunResult], path: str | Path) -> Path:
    """Test accuracy and trace against epoch, one column per architecture (PNG).

    Each line is the mean over seeds, the band the min-max range. Failed runs (``error``
    set) are left out; at least one run must have finished.
    """
    results = [r for r in results if r.error is None]
    if not results:
        raise ValueError("plot_results: no finished run to plot (every run failed)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = [a for a in _ARCH_LABEL if any(r.spec.arch == a for r in results)]
    fig, axes = plt.subplots(2, len(archs), figsize=(4.2 * len(archs), 6.5), squeeze=False)
    for col, arch in enumerate(archs):
        for res in (r for r in results if r.spec.arch == arch):
            label = f"{res.spec.name} ({res.spec.method})"
            for row, metric in enumerate(("test_accuracy", "trace_gn")):
                ax = axes[row][col]
                data = list(zip(*res.metrics[metric], strict=False))
                mean = [statistics.fmean(v) for v in data]
                ax.plot(res.epochs, mean, label=label)
                ax.fill_between(
                    res.epochs, [min(v) for v in data], [max(v) for v in data], alpha=0.25
                )
        lb = next((r.lower_bound[0] for r in results if r.spec.arch == arch), math.nan)
        if not math.isnan(lb):
            axes[1][col].axhline(lb, color="k", ls="--", lw=1, label="lower bound")
        axes[0][col].set_title(_ARCH_LABEL[arch])
        axes[0][col].set_ylabel("test accuracy")
        axes[1][col].set_ylabel("Hessian trace (at interpolation)")
        axes[1][col].set_yscale("log")
        for ax in axes[:, col]:
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlim(left=0)  # epochs are >= 0; symlog margins would show negative ticks
            ax.set_xlabel("epoch (linear to 10, then log)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda handle: fig.savefig(handle, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _sweep_runs(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """The ``sweep-n`` runs per architecture, sorted by n."""
    sweep = [r for r in results if r.spec.name.startswith("sweep-n") and r.error is None]
    out = {}
    for arch in ("no_bias", "bias"):
        runs = sorted((r for r in sweep if r.spec.arch == arch), key=lambda r: r.spec.n)
        if runs:
            out[arch] = runs
    return out


def sweep_table(results: Sequence[RunResult]) -> str | None:
    r"""The ``sweep-n`` runs as a Markdown table: final test error and MSE per n, next to $d/n$.

    Returns None when there are no sweep runs. Each cell is the mean over seeds with the
    [min, max] range.

    Examples:
        >>> sweep_table([]) is None
        True
    """
    by_arch = _sweep_runs(results)
    if not by_arch:
        return None
    cells: dict[tuple[int, str], RunResult] = {
        (r.spec.n, arch): r for arch, runs in by_arch.items() for r in runs
    }
    d = next(iter(by_arch.values()))[0].spec.d
    head = ["n", "d/n"]
    for arch in by_arch:
        head += [f"{_ARCH_LABEL[arch]}: test error", "test MSE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sorted({n for n, _ in cells}):
        row = [str(n), f"{d / n:.3f}"]
        for arch in by_arch:
            res = cells.get((n, arch))
            if res is None:
                row += ["–", "–"]
                continue
            row.append(_fmt([1.0 - a for a in res.final("test_accuracy")]))
            row.append(_fmt(res.final("test_mse")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(results: Sequence[RunResult], path: str | Path) -> Path | None:
    r"""Final 1-SAM test error and test MSE against n (log axes) per architecture, next to $d/n$.

    Uses the runs whose names start with ``sweep-n`` (the ``sweep-n`` preset); returns None
    when there are none. Each point is the mean over seeds, the bar the min-max range; values
    are floored at $10^{-4}$ so that zero shows on the log axis. The dashed line is $d/n$
    itself (constant 1): Theorem 3.1 bounds the test MSE of flattest no-bias interpolators by
    $\tilde O(d/n)$ once $n = \Omega(d\log(d/\delta))$, with constants and log factors not
    known, so the line shows the rate, not a prediction.
    """
    by_arch = _sweep_runs(results)
    if not by_arch:
        return None
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    floor = 1e-4
    for arch, runs in by_arch.items():
        ns = [r.spec.n for r in runs]
        for ax, values in (
            (axes[0], [[1.0 - a for a in r.final("test_accuracy")] for r in runs]),
            (axes[1], [r.final("test_mse") for r in runs]),
        ):
            mean = [max(statistics.fmean(v), floor) for v in values]
            low = [m - max(min(v), floor) for m, v in zip(mean, values, strict=True)]
            high = [max(max(v), floor) - m for m, v in zip(mean, values, strict=True)]
            ax.errorbar(ns, mean, yerr=[low, high], marker="o", capsize=3, label=_ARCH_LABEL[arch])
    ns = sorted({r.spec.n for runs in by_arch.values() for r in runs})
    d = next(iter(by_arch.values()))[0].spec.d
    for ax, label in ((axes[0], "test zero-one error"), (axes[1], "test MSE")):
        ax.plot(ns, [d / n for n in ns], "k--", lw=1, label=f"d/n (d={d})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training points n")
        ax.set_ylabel(f"{label} (floor {floor:g})")
        ax.legend(fontsize=7)
    axes[0].set_title("1-SAM, final epoch", fontsize=9)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda handle: fig.savefig(handle, dpi=80, format="png"))
    finally:
        plt.close(fig)


def save_results(results: Sequence[RunResult], path: str | Path) -> Path:
    """Write the runs (specs and metric histories) to a JSON file, atomically.

    A crash or a full disk leaves the previous file intact (see `atomic_write`).
    """
    return atomic_write_text(path, json.dumps([r.to_dict() for r in results], indent=1))


def load_results(path: str | Path) -> list[RunResult]:
    """Read runs written by `save_results`."""
    return [RunResult.from_dict(d) for d in json.loads(Path(path).read_text())]
