r"""`write_report`: a study's markdown report, CSV tables and charts (private)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from sharpgen.study._analysis import MeasureStats, StudyAnalysis

__all__ = ["write_report"]


def _f(v: float, digits: int = 2) -> str:
    return "nan" if math.isnan(v) else f"{v:+.{digits}f}"


def _ci(ci: tuple[float, float]) -> str:
    return "" if math.isnan(ci[0]) else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _markdown_table(analysis: StudyAnalysis, ranked: list[MeasureStats]) -> list[str]:
    axes = [a for a in analysis.axes if a != analysis.seed_axis]
    head = ["measure", "τ", "Ψ", *[f"ψ {a}" for a in axes], "CMI (S)", "SE mean / q90 / max", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in ranked:
        cells = [
            f"`{s.name}`",
            _f(s.tau) + _ci(s.tau_ci),
            _f(s.psi) + _ci(s.psi_ci),
            *[_f(s.granulated.get(a, math.nan)) for a in axes],
            f"{_f(s.cmi, 3)}{_ci(s.cmi_ci)} ({'+'.join(s.cmi_set) or '∅'})",
            " / ".join(_f(v) for v in (s.sign_error_mean, s.sign_error_q90, s.sign_error_max)),
            str(s.n_models),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plots(analysis: StudyAnalysis, ranked: list[MeasureStats], out: Path, by: str) -> list[str]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return ["matplotlib is not installed, so there are no charts (pip install matplotlib)."]
    key = "psi" if by == "psi" else "tau"
    names = [s.name for s in ranked][::-1]
    vals = np.array([getattr(s, key) for s in ranked][::-1])
    ci = np.array([getattr(s, f"{key}_ci") for s in ranked][::-1])
    err = np.nan_to_num(np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals])))
    fig = Figure(figsize=(7, 0.3 * len(names) + 1.2))
    ax = fig.add_subplot()
    ax.barh(names, np.nan_to_num(vals), xerr=err, color="C0", ecolor="k", capsize=2)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(-1, 1)
    label = "Kendall tau" if key == "tau" else "granulated Kendall Psi"
    ax.set_xlabel(f"{label} with {analysis.target} ({analysis.confidence:.0%} bootstrap CI)")
    fig.tight_layout()
    fig.savefig(out / "ranking.png", dpi=110)

    table, y = analysis.table, analysis.table.column(analysis.target)
    cols = 5
    rows = math.ceil(len(ranked) / cols)
    fig = Figure(figsize=(3 * cols, 2.6 * rows))
    color_axis = next((a for a in analysis.axes if a != analysis.seed_axis), None)
    colors = None
    if color_axis is not None:
        values = [r.get(color_axis) for r in table.rows]
        order = {k: i for i, k in enumerate(dict.fromkeys(repr(v) for v in values))}
        colors = [order[repr(v)] for v in values]
    for i, s in enumerate(ranked):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.scatter(table.column(s.name), y, c=colors, s=12, cmap="viridis")
        ax.set_title(f"{s.name}\ntau={_f(s.tau)}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{analysis.target} (y) against each measure (x); colour: {color_axis}")
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=90)
    return [
        f"![ranking of the measures by |{key}|](ranking.png)",
        "",
        "![scatter of each measure against the target](scatter.png)",
    ]


def write_report(analysis: StudyAnalysis, out_dir: str | Path, *, by: str = "tau") -> Path:
    r"""Write a study's report: ``report.md``, ``table.csv``, ``analysis.csv`` and charts.

    * ``table.csv``: the `StudyTable` (one row per model), written with the `csv` module;
    * ``analysis.csv``: one row per measure (`StudyAnalysis.to_rows`);
    * ``ranking.png``: the measures sorted by $|\tau|$ (or $|\Psi|$) with the bootstrap
      intervals as error bars, and ``scatter.png``: the target against each measure, one
      panel per measure, coloured by the first hyperparameter axis -- both only when
      matplotlib is installed (otherwise the report says so in one line);
    * ``report.md``: what was studied, the ranking table (τ, Ψ, ψ per axis, the minimal
      conditional mutual information and its conditioning set, the sign-errors) and the
      charts, and the measures that failed on some models.

    Args:
        analysis: What `analyze` returned.
        out_dir: The directory (created if missing).
        by: Rank by ``"tau"`` (default), ``"psi"`` or ``"cmi"``.

    Returns:
        The path of ``report.md``.

    Example:
        >>> import tempfile
        >>> from sharpgen.study import StudyTable, analyze
        >>> rows = tuple({"name": str(i), "w": i, "gap": 0.1 * i, "m": float(i)}
        ...              for i in range(4))
        >>> res = analyze(StudyTable(rows, ("w",), ("m",)), n_boot=0)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = write_report(res, d)
        ...     print(path.name, "| `m` | +1.00" in path.read_text())
        report.md True
    """
    if not isinstance(analysis, StudyAnalysis):
        raise TypeError(f"analysis must be a StudyAnalysis (from analyze), got {type(analysis)}.")
    ranked = analysis.ranking(by)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analysis.table.to_csv(out / "table.csv")
    rows = analysis.to_rows()
    with (out / "analysis.csv").open("w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    t = analysis.table
    mean_target = np.nanmean(t.column(analysis.target))
    mean_target = np.nanmean(t.column(analysis.target))
    lines = [
        "# Study report",
        "",
        f"{len(t)} models; hyperparameter axes: {', '.join(analysis.axes) or 'none'}"
        + (f" (seed axis: {analysis.seed_axis})" if analysis.seed_axis else "")
        + f"; target: `{analysis.target}`; mean target {mean_target:.4g}.",
        "",
        f"Ranked by |{by}|. Intervals: {analysis.confidence:.0%} percentile bootstrap over "
        f"{analysis.n_boot} resamples (models for τ, Ψ, CMI; environments for the mean "
        "sign-error). τ: Kendall's rank correlation (Jiang et al. 2020, eq. 3); Ψ: mean of the "
        "granulated ψ per axis (Sec. 5); CMI: min over conditioning sets |S| ≤ 2 of the "
        "normalized conditional mutual information (Sec. 6); SE: sign-error over coupled "
        "pairs that differ in one hyperparameter (Dziugaite et al. 2020), mean / 90th "
        "percentile / max (the robust sign-error) over environments.",
        "",
        *_markdown_table(analysis, ranked),
        "",
        *_plots(analysis, ranked, out, by),
        "",
        "Files: `table.csv` (one row per model), `analysis.csv` (one row per measure).",
    ]
    if t.failures:
        lines += ["", f"## Failed measures ({len(t.failures)}, nan in the table)", ""]
        lines += [f"- `{m}` on `{n}`: {msg}" for n, m, msg in t.failures[:50]]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
