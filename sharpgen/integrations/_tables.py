"""Tables out: the ``results.json`` of ``sharpgen reproduce`` as one tidy DataFrame.

Also re-exports the tracker-history exports of `sharpgen.sharpness._export` (DataFrame, CSV,
TensorBoard). pandas is imported inside the functions that return a DataFrame.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sharpgen.sharpness._export import (
    _pandas,
    history_to_csv,
    history_to_dataframe,
    log_history,
)

__all__ = ["history_to_csv", "history_to_dataframe", "log_history", "results_to_dataframe"]


def _load_runs(results: Any) -> list[dict[str, Any]]:
    if isinstance(results, (str, Path)):
        path = Path(results)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no results file at {path}; pass the results.json written by "
                "`sharpgen reproduce --out DIR` (or DIR itself)."
            )
        results = json.loads(path.read_text())
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
        raise TypeError(
            "results must be a path to results.json, its folder, or a list of RunResult / "
            f"dicts, got {type(results).__name__}."
        )
    return [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in results]


def _spec_columns(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar fields of a spec; the phases as one JSON string plus their epoch total."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "phases":
            out["phases"] = json.dumps(value)
            out["total_epochs"] = sum(int(p.get("epochs", 0)) for p in value)
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[key] = value
    return out


def results_to_dataframe(results: Any) -> Any:
    """The runs of ``sharpgen reproduce`` as one tidy DataFrame (one row per run and epoch).

    One row per (experiment, seed, recorded epoch): the experiment's settings (``name``,
    ``arch``, ``method``, ``width``, ... and ``phases`` as JSON), ``seed``, ``epoch``, one
    column per recorded metric (``train_loss``, ``test_accuracy``, ``trace`` ...),
    ``lower_bound``, ``steps`` and ``wall_time_s``. Group or pivot it with pandas, e.g.
    ``df[df.epoch == df.groupby("name").epoch.transform("max")]`` for the final values.

    Args:
        results: The path of ``results.json`` (or of the ``--out`` folder holding it), or
            the list of `sharpgen.RunResult` that `sharpgen.run_experiments` returns, or
            their ``to_dict()`` forms.

    Returns:
        ``pandas.DataFrame``.

    Raises:
        FileNotFoundError: No ``results.json`` at the path.
        TypeError: ``results`` is none of the accepted kinds.
        ImportError: pandas is not installed.

    Examples:
        >>> run = {"spec": {"name": "gd", "phases": [{"epochs": 2, "lr": 0.1}]},
        ...        "seeds": [0, 1], "epochs": [0, 2], "lower_bound": [1.0, 1.0],
        ...        "metrics": {"trace": [[5.0, 3.0], [6.0, 4.0]]}, "steps": 2,
        ...        "wall_time_s": 0.5}
        >>> df = results_to_dataframe([run])
        >>> df[["name", "seed", "epoch", "trace"]].values.tolist()
        [['gd', 0, 0, 5.0], ['gd', 0, 2, 3.0], ['gd', 1, 0, 6.0], ['gd', 1, 2, 4.0]]
    """
    pd = _pandas()
    rows: list[dict[str, Any]] = []
    for run in _load_runs(results):
        spec = _spec_columns(run.get("spec", {}))
        epochs = list(run.get("epochs", []))
        metrics: Mapping[str, list[list[float]]] = run.get("metrics", {})
        bounds = list(run.get("lower_bound", []))
        for i, seed in enumerate(run.get("seeds", [])):
            for j, epoch in enumerate(epochs):
                row = {**spec, "seed": seed, "epoch": epoch}
                for name, per_seed in metrics.items():
                    value = per_seed[i][j]
                    row[name] = math.nan if value is None else value
                row["lower_bound"] = bounds[i] if i < len(bounds) else math.nan
                row["steps"] = run.get("steps")
                row["wall_time_s"] = run.get("wall_time_s")
                rows.append(row)
    return pd.DataFrame.from_records(rows)
