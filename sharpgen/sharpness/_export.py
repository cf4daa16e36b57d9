"""A tracker history out: a pandas DataFrame, a CSV file, TensorBoard scalars.

pandas is imported inside the function that returns a DataFrame, and TensorBoard is never
imported (any object with ``add_scalar`` is a writer), so ``import sharpgen`` needs neither.
`sharpgen.integrations` re-exports these functions; `SharpnessTracker` has the shortcuts
``to_dataframe()``, ``to_csv(path)`` and ``log_to(writer)``.
"""

from __future__ import annotations

import csv
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from sharpgen._validation import check_bool

__all__ = ["history_to_csv", "history_to_dataframe", "log_history", "scalar_metrics"]


def scalar_metrics(record: Mapping[str, Any], prefix: str = "sharpness/") -> dict[str, float]:
    """The numbers of a `SharpnessTracker` record, as ``{prefix + key: float}``.

    ``step`` is left out (it is the logging step); booleans (``*_converged``) become 0.0 or
    1.0; entries that are None or not numbers are left out.

    Examples:
        >>> scalar_metrics({"step": 4, "trace": 2.5, "top_eigenvalue_converged": True})
        {'sharpness/trace': 2.5, 'sharpness/top_eigenvalue_converged': 1.0}
    """
    if not isinstance(record, Mapping):
        raise TypeError(
            f"record must be a dict such as {{'step': 0, 'trace': 1.0}}, got {record!r}."
        )
    prefix = _check_prefix(prefix)
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, numbers.Real):
            out[f"{prefix}{key}"] = float(value)
    return out


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
    """A tracker, a list of records or a dict of columns -> a list of records.

    Checked fully here (one rule for every export): record keys and column names are
    strings, columns are sequences (not strings) of one length.
    """
    if hasattr(history, "history") and hasattr(history, "to_dict"):  # a SharpnessTracker
        return list(history.history)
    if isinstance(history, Mapping):
        for k, v in history.items():
            if not isinstance(k, str):
                raise TypeError(f"history column names must be str, got {k!r}.")
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
                raise TypeError(
                    f"history[{k!r}] must be a list (a column of values, one per record), got "
                    f"{type(v).__name__} {v!r}; a single record is a list of one dict: "
                    "[{'step': 0, 'trace': 1.0}]."
                )
        lengths = {len(v) for v in history.values()}
        if len(lengths) > 1:
            raise ValueError(f"history columns have different lengths {sorted(lengths)}.")
        n = lengths.pop() if lengths else 0
        return [{k: v[i] for k, v in history.items()} for i in range(n)]
    if isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        for i, r in enumerate(history):
            if not isinstance(r, Mapping):
                raise TypeError(
                    f"history[{i}] must be a record dict such as {{'step': 0, 'trace': 1.0}}, "
                    f"got {type(r).__name__}."
                )
            bad = [k for k in r if not isinstance(k, str)]
            if bad:
                raise TypeError(f"history[{i}] keys must be str, got {bad[:3]}.")
        return [dict(r) for r in history]
    raise TypeError(
        "history must be a SharpnessTracker, a list of record dicts or a dict of columns, got "
        f"{type(history).__name__}."
    )


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str such as 'sharpness/', got {prefix!r}.")
    return prefix


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
    if not isinstance(path, (str, Path)) or str(path) == "":
        raise TypeError(f"path must be a file path (str or pathlib.Path), got {path!r}.")
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
    prefix = _check_prefix(prefix)
    check_bool("last", last)
    records = _records(history)
    if last:
        records = records[-1:]
    count = 0
    for r in records:
        for tag, value in scalar_metrics(r, prefix).items():
            writer.add_scalar(tag, value, global_step=r.get("step"))
            count += 1
    return count
