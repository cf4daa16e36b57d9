r"""The record of one trained model and the table of a study (private).

A study is a list of `TrainedModel` records: a trained network, how its loss is computed,
its training and test data, the hyperparameters that set it apart from the other models and,
where the measure needs it, its parameters at initialization. `StudyTable` holds one row per
model: the hyperparameters, the train/test metrics, the generalization gaps and one column
per complexity measure.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sharpgen.curvature import preserve_model_state
from sharpgen.curvature._data import as_batches, call_model

__all__ = ["METRICS", "StudyTable", "TrainedModel", "evaluate"]

METRICS = ("train_loss", "train_error", "test_loss", "test_error")
"""The four metrics every row of a `StudyTable` carries (errors are fractions in [0, 1])."""


@dataclass(frozen=True)
class TrainedModel:
    r"""One trained model of a study, with everything a measure may need.

    Attributes:
        name: A unique name (the row's key in the `StudyTable`).
        hparams: The values of the grid's axes for this model, e.g.
            ``{"width": 64, "lr": 0.1}``; the analysis groups and couples models by them.
        model: The trained network (never changed by the study: its parameters, buffers,
            modes and gradients are as before each measure).
        loss_fn: ``loss_fn(outputs, targets) -> Tensor``, the mean loss of a batch.
        train_data: The training data, one ``(inputs, targets)`` batch or an iterable of
            batches (sharpgen's convention); the sharpness measures are taken on it.
        test_data: The test data, in the same form.
        init_params: The parameters at initialization (``name -> Tensor``, the names of
            ``model.named_parameters()``), needed by the distance-from-initialization
            measures; ``None`` if not known.
        metrics: Any of ``train_loss``, ``train_error``, ``test_loss``, ``test_error``
            (errors as fractions in [0, 1]); missing ones are computed by `evaluate`.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 3)
        >>> x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
        >>> tm = TrainedModel("a", {"lr": 0.1}, net, torch.nn.functional.cross_entropy,
        ...                   (x, y), (x, y))
        >>> tm.hparams["lr"]
        0.1
    """

    name: str
    hparams: Mapping[str, Any]
    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    train_data: Any
    test_data: Any
    init_params: Mapping[str, Tensor] | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}.")
        if not isinstance(self.hparams, Mapping):
            raise TypeError(
                f"hparams must be a mapping axis -> value (e.g. {{'lr': 0.1}}), got "
                f"{type(self.hparams).__name__}."
            )
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}.")
        if not callable(self.loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets).")
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"metrics has unknown keys {unknown}; use keys of {METRICS}.")
        if self.init_params is not None:
            params = dict(self.model.named_parameters())
            for key, value in self.init_params.items():
                if key not in params or tuple(value.shape) != tuple(params[key].shape):
                    raise ValueError(
                        f"init_params[{key!r}] does not match a parameter of the model "
                        "(name and shape); pass the parameters at initialization under the "
                        "names of model.named_parameters()."
                    )


def _errors(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample 0-1 errors: argmax for several outputs, the sign for one."""
    if outputs.ndim >= 2 and outputs.shape[-1] > 1:
        if targets.ndim == outputs.ndim:  # one-hot or soft targets
            targets = targets.argmax(-1)
        return outputs.argmax(-1) != targets
    out = outputs.reshape(-1)
    t = targets.reshape(-1).to(out.dtype)
    if bool(((t == 0) | (t == 1)).all()):  # {0, 1} labels: positive output means 1
        return (out > 0).to(out.dtype) != t
    return torch.sign(out) != torch.sign(t)


def evaluate(
    model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any
) -> tuple[float, float]:
    r"""The mean loss and the 0-1 error of ``model`` on ``data``, the model in eval mode.

    Means are weighted by batch size. The error counts a sample as wrong when the argmax of a
    multi-output model differs from the label (or from the argmax of one-hot targets), and for
    a single-output model when ${\rm sign} f(x) \ne y$ for labels in $\{-1, +1\}$ or
    $[f(x) > 0] \ne y$ for labels in $\{0, 1\}$. The model's modes and state are restored.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        data: One ``(inputs, targets)`` batch or an iterable of batches.

    Returns:
        ``(loss, error)`` as Python floats.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)
        >>> x, y = torch.tensor([[1.0], [-2.0]]), torch.tensor([[1.0], [1.0]])
        >>> evaluate(net, torch.nn.functional.mse_loss, (x, y))
        (4.5, 0.5)
    """
    loss_sum, err_sum, count = 0.0, 0.0, 0
    with preserve_model_state(model, copy_values=False), torch.no_grad():
        model.eval()
        for inputs, targets in as_batches(data):
            outputs = call_model(model, inputs)
            n = int(targets.shape[0])
            loss_sum += float(loss_fn(outputs, targets)) * n
            err_sum += float(_errors(outputs, targets).to(torch.float64).sum())
            count += n
    return loss_sum / count, err_sum / count


@dataclass(frozen=True)
class StudyTable:
    """One row per model: hyperparameters, metrics, gaps and measures.

    Each row is a dict with the keys ``name``, every hyperparameter axis, the four
    `METRICS`, ``gap`` (test error minus train error), ``loss_gap`` (test loss minus train
    loss) and one key per measure (``nan`` where a measure failed or does not apply).

    Attributes:
        rows: The rows, in the order of the models.
        axes: The hyperparameter axes (the union over the models, in first-seen order).
        measures: The measure columns, in the order they were computed.
        failures: ``(model name, measure, error message)`` for every measure that raised.

    Example:
        >>> t = StudyTable(({"name": "a", "lr": 0.1, "gap": 0.2, "norm": 3.0},), ("lr",),
        ...                ("norm",))
        >>> t.column("norm")
        array([3.])
    """

    rows: tuple[Mapping[str, Any], ...]
    axes: tuple[str, ...]
    measures: tuple[str, ...]
    failures: tuple[tuple[str, str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self.rows)

    @property
    def columns(self) -> tuple[str, ...]:
        """All column names: ``name``, the axes, the metrics, the gaps, the measures."""
        return ("name", *self.axes, *METRICS, "gap", "loss_gap", *self.measures)

    def column(self, key: str) -> np.ndarray:
        """The values of one numeric column as a float64 array (``nan`` where missing)."""
        if key not in self.columns:
            raise KeyError(f"no column {key!r}; the columns are {self.columns}.")
        return np.array([_as_float(row.get(key, math.nan)) for row in self.rows])

    def hparams(self) -> list[tuple[Any, ...]]:
        """Each row's hyperparameter values, a tuple in the order of `axes`."""
        return [tuple(row.get(a) for a in self.axes) for row in self.rows]

    def to_pandas(self) -> Any:
        """The table as a `pandas.DataFrame` (pandas is an optional dependency)."""
        try:
            import pandas as pd
        except ImportError as exc:  # the message is the point
            raise ImportError(
                "StudyTable.to_pandas needs pandas (pip install pandas); "
                "StudyTable.to_csv needs nothing."
            ) from exc
        return pd.DataFrame([dict(r) for r in self.rows], columns=list(self.columns))

    def to_csv(self, path: str | Path) -> Path:
        """Write the table as CSV (standard `csv` module) and return the path."""
        path = Path(path)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.columns), extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k, "") for k in self.columns})
        return path

    @classmethod
    def read_csv(cls, path: str | Path, axes: Sequence[str]) -> StudyTable:
        """Read a table written by `to_csv`; ``axes`` names the hyperparameter columns."""
        with Path(path).open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [{k: _parse(v) if k != "name" else v for k, v in r.items()} for r in reader]
        fixed = {"name", *axes, *METRICS, "gap", "loss_gap"}
        measures = tuple(k for k in header if k not in fixed)
        return cls(tuple(rows), tuple(axes), measures)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _parse(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
