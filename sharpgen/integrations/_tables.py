"""Tables and logs out.

Tracker histories as DataFrames / CSV / TensorBoard scalars, and the ``results.json`` of
``sharpgen reproduce`` as one tidy DataFrame.

pandas is imported inside the functions that return a DataFrame (and TensorBoard is never
imported: any object with ``add_scalar`` is a writer), so ``import sharpgen`` needs neither.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sharpgen.integrations._common import scalar_metrics

__all__ = ["history_to_csv", "history_to_dataframe", "log_history", "results_to_dataframe"]


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as exc:  # pandas is an optional dependency
        raise ImportError(
            "this function returns a pandas DataFrame; install pandas with "
            "`pip install 'sharpgen[pandas]'` (or `pip install pandas`)."
        ) from exc
    return pandas


def _records(history: Any) -> list[dict[str, Any]]:
    """A tracker, a list of records or a dict of columns -> a list of records."""
    if hasattr(history, "history") and hasattr(history, "to_dict"):  # a SharpnessTracker
        return list(history.history)
    if isinstance(history, Mapping):
        lengths = {len(v) for v in history.values()}
        if len(lengths) > 1:
            raise ValueError(f"history columns have different lengths {sorted(lengths)}.")
        n = lengths.pop() if lengths else 0
        return [{k: v[i] for k, v in history.items()} for i in range(n)]
    if isinstance(history, Sequence) and all(isinstance(r, Mapping) for r in history):
        return [dict(r) for r in history]
    raise TypeError(
        "history must be a SharpnessTracker, a list of record dicts or a dict of columns, got "
        f"{type(history).__name__}."
    )


def _columns(records: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)
    return keys


def history_to_dataframe(history: Any) -> Any:
    """A tracker history as a pandas DataFrame, one row per record, indexed by ``step``.

    Columns are the record keys in the order they first appear (measures, their
    ``*_stderr`` / ``*_converged`` companions, the costs ``matvecs``, ``gradient_evals``,
    ``loss_evals``); a key missing from a record is NaN (None for non-numeric columns).

    Args:
        history: A `sharpgen.SharpnessTracker`, its ``history`` (list of dicts) or its
            ``to_dict()`` (dict of columns).

    Returns:
        ``pandas.DataFrame`` with index ``step``.

    Raises:
        ImportError: pandas is not installed.
        TypeError: ``history`` is none of the accepted kinds.

    Examples:
        >>> df = history_to_dataframe([{"step": 0, "trace": 2.0}, {"step": 5, "trace": 1.5}])
        >>> df["trace"].tolist(), df.index.tolist()
        ([2.0, 1.5], [0, 5])
    """
    pd = _pandas()
    records = _records(history)
    frame = pd.DataFrame.from_records(records, columns=_columns(records))
    return frame.set_index("step") if "step" in frame.columns else frame


def history_to_csv(history: Any, path: str | Path) -> Path:
    """Write a tracker history to a CSV file (header = record keys; needs no pandas).

    Missing entries are empty cells; floats are written with ``repr`` (they read back
    exactly), booleans as ``True`` / ``False``.

    Args:
        history: A `sharpgen.SharpnessTracker`, its ``history`` or its ``to_dict()``.
        path: The file to write (parent folders are created).

    Returns:
        The path written.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "sharpness.csv"
        >>> _ = history_to_csv([{"step": 0, "trace": 0.1}, {"step": 1}], out)
        >>> out.read_text().splitlines()
        ['step,trace', '0,0.1', '1,']
    """
    records = _records(history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_columns(records), lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return path


def log_history(
    writer: Any, history: Any, *, prefix: str = "sharpness/", last: bool = False
) -> int:
    """Write tracker records to TensorBoard (or any writer with ``add_scalar``).

    Every number of a record (measures, ``*_stderr``, ``*_converged`` as 0/1, costs) becomes
    ``writer.add_scalar(prefix + key, value, global_step=record["step"])``; with
    ``torch.utils.tensorboard.SummaryWriter`` they appear as one chart per key.

    Args:
        writer: A ``SummaryWriter`` (or Lightning's ``TensorBoardLogger.experiment``).
        history: A `sharpgen.SharpnessTracker`, its ``history`` or its ``to_dict()``.
        prefix: Prepended to every key (TensorBoard groups charts by the part before ``/``).
        last: Write only the newest record (call it after each measuring step).

    Returns:
        The number of scalars written.

    Raises:
        TypeError: ``writer`` has no ``add_scalar`` method.

    Examples:
        >>> class Printer:
        ...     def add_scalar(self, tag, value, global_step):
        ...         print(tag, value, global_step)
        >>> _ = log_history(Printer(), [{"step": 3, "trace": 1.5}])
        sharpness/trace 1.5 3
    """
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            "writer must have an add_scalar(tag, value, global_step) method, e.g. "
            f"torch.utils.tensorboard.SummaryWriter; got {type(writer).__name__}."
        )
    records = _records(history)
    if last:
        records = records[-1:]
    count = 0
    for r in records:
        for tag, value in scalar_metrics(r, prefix).items():
            writer.add_scalar(tag, value, global_step=r.get("step"))
            count += 1
    return count


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
