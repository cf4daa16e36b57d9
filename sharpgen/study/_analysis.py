r"""`analyze`: every rank statistic of every measure of a `StudyTable`, with bootstrap CIs."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sharpgen._validation import check_generator, check_int, check_interval
from sharpgen.study._record import METRICS, StudyTable
from sharpgen.study._stats import granulated_kendall, kendall_tau, min_cmi, sign_errors

__all__ = ["MeasureStats", "StudyAnalysis", "analyze"]

Interval = tuple[float, float]


@dataclass(frozen=True)
class MeasureStats:
    r"""The statistics of one measure against the target.

    Every ``*_ci`` is a percentile-bootstrap interval at the analysis' ``confidence``
    (``(nan, nan)`` with ``n_boot=0``).

    Attributes:
        name: The measure.
        n_models: Models with a finite value of the measure (the others are left out).
        tau: Kendall's $\tau$ with the target over all models.
        tau_ci: Its interval.
        granulated: $\psi_k$ per hyperparameter axis.
        psi: $\Psi$, the mean of the finite $\psi_k$.
        psi_ci: Its interval.
        cmi: $\min_{|S|\le 2} \hat I(V_\mu, V_g \mid U_S)$.
        cmi_ci: Its interval.
        cmi_set: The conditioning axes $S$ that attain the minimum.
        sign_error_mean: The mean sign-error over environments.
        sign_error_q90: Its 90th percentile over environments.
        sign_error_max: Its maximum, the robust sign-error of Dziugaite et al.
        sign_error_ci: Interval of the mean (environments resampled).
        n_environments: Environments (pairs of settings differing in one axis) with pairs.
        sign_error_by_axis: The maximum sign-error over the environments of each axis.
    """

    name: str
    n_models: int
    tau: float
    tau_ci: Interval
    granulated: Mapping[str, float]
    psi: float
    psi_ci: Interval
    cmi: float
    cmi_ci: Interval
    cmi_set: tuple[str, ...]
    sign_error_mean: float
    sign_error_q90: float
    sign_error_max: float
    sign_error_ci: Interval
    n_environments: int
    sign_error_by_axis: Mapping[str, float]


@dataclass(frozen=True)
class StudyAnalysis:
    """What `analyze` found: one `MeasureStats` per measure, and the table it came from.

    Attributes:
        table: The `StudyTable`.
        target: The column the measures were compared with (``"gap"`` by default).
        axes: The hyperparameter axes used for grouping, coupling and conditioning.
        seed_axis: The axis treated as the seed (couples models; not a hyperparameter).
        stats: One `MeasureStats` per measure, in the table's order.
        n_boot: Bootstrap resamples.
        confidence: The level of the intervals.
    """

    table: StudyTable
    target: str
    axes: tuple[str, ...]
    seed_axis: str | None
    stats: tuple[MeasureStats, ...]
    n_boot: int
    confidence: float

    def __getitem__(self, name: str) -> MeasureStats:
        for s in self.stats:
            if s.name == name:
                return s
        raise KeyError(f"no measure {name!r}; the measures are {[s.name for s in self.stats]}.")

    def ranking(self, by: str = "tau") -> list[MeasureStats]:
        """The measures sorted by ``|tau|``, ``|psi|`` or ``cmi`` (largest first, nan last)."""
        keys = {"tau": lambda s: abs(s.tau), "psi": lambda s: abs(s.psi), "cmi": lambda s: s.cmi}
        if by not in keys:
            raise ValueError(f"by must be one of {sorted(keys)}, got {by!r}.")
        key = keys[by]
        return sorted(self.stats, key=lambda s: (math.isnan(key(s)), -np.nan_to_num(key(s))))

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per measure (for CSV, pandas or printing)."""
        rows = []
        for s in self.stats:
            row: dict[str, Any] = {"measure": s.name, "n_models": s.n_models}
            for key in ("tau", "psi", "cmi"):
                lo, hi = getattr(s, f"{key}_ci")
                row.update({key: getattr(s, key), f"{key}_lo": lo, f"{key}_hi": hi})
            row.update({f"psi_{a}": v for a, v in s.granulated.items()})
            row["cmi_set"] = "+".join(s.cmi_set) or "-"
            row.update(
                sign_error_mean=s.sign_error_mean,
                sign_error_q90=s.sign_error_q90,
                sign_error_max=s.sign_error_max,
                n_environments=s.n_environments,
            )
            rows.append(row)
        return rows


def _codes(table: StudyTable, axes: Sequence[str]) -> np.ndarray:
    cols = []
    for a in axes:
        values = [row.get(a) for row in table.rows]
        keys = [repr(v) for v in values]
        order = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        cols.append([order[k] for k in keys])
    return np.array(cols, dtype=int).T.reshape(len(table.rows), len(axes))


def _ci(samples: list[float], confidence: float) -> Interval:
    arr = np.array([s for s in samples if not math.isnan(s)])
    if arr.size == 0:
        return (math.nan, math.nan)
    a = (1 - confidence) / 2
    return (float(np.quantile(arr, a)), float(np.quantile(arr, 1 - a)))


def _stats_of(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    axes: tuple[str, ...],
    seed_col: int | None,
    resamples: list[np.ndarray],
    env_resamples: np.random.Generator,
    n_boot: int,
    confidence: float,
    min_gap_diff: float,
) -> MeasureStats:
    hp_cols = [k for k in range(len(axes)) if k != seed_col]

    def psi(index: np.ndarray | None) -> tuple[dict[str, float], float]:
        gran = {axes[k]: granulated_kendall(x, y, codes, k, index) for k in hp_cols}
        finite = [v for v in gran.values() if not math.isnan(v)]
        return gran, float(np.mean(finite)) if finite else math.nan

    def cmi(index: np.ndarray | None) -> tuple[float, tuple[int, ...]]:
        return min_cmi(x, y, codes[:, hp_cols], 2, index)

    gran, psi0 = psi(None)
    cmi0, cmi_s = cmi(None)
    se = sign_errors(x, y, codes, seed_col, min_gap_diff)
    nan2 = (math.nan, math.nan)
    tau_ci = psi_ci = cmi_ci = se_ci = nan2
    if n_boot:
        tau_ci = _ci([kendall_tau(x, y, r) for r in resamples], confidence)
        psi_ci = _ci([psi(r)[1] for r in resamples], confidence)
        cmi_ci = _ci([cmi(r)[0] for r in resamples], confidence)
        if se.values.size:
            draws = env_resamples.integers(0, se.values.size, (n_boot, se.values.size))
            se_ci = _ci(list(se.values[draws].mean(1)), confidence)
    by_axis = {axes[k]: float(se.values[se.axes == k].max()) for k in np.unique(se.axes)}
    has = se.values.size > 0
    return MeasureStats(
        name=name,
        n_models=len(x),
        tau=kendall_tau(x, y),
        tau_ci=tau_ci,
        granulated=gran,
        psi=psi0,
        psi_ci=psi_ci,
        cmi=cmi0,
        cmi_ci=cmi_ci,
        cmi_set=tuple(axes[hp_cols[k]] for k in cmi_s),
        sign_error_mean=float(se.values.mean()) if has else math.nan,
        sign_error_q90=float(np.quantile(se.values, 0.9)) if has else math.nan,
        sign_error_max=float(se.values.max()) if has else math.nan,
        sign_error_ci=se_ci,
        n_environments=int(se.values.size),
        sign_error_by_axis=by_axis,
    )


def analyze(
    table: StudyTable,
    target: str = "gap",
    *,
    axes: Sequence[str] | None = None,
    seed_axis: str | None = "seed",
    generator: torch.Generator | None = None,
    n_boot: int = 200,
    confidence: float = 0.95,
    min_gap_diff: float = 0.0,
) -> StudyAnalysis:
    r"""Does each measure rank the models by their generalization? Every statistic, with CIs.

    For every measure column of ``table`` (models where it is ``nan`` left out):

    * Kendall's $\tau$ with the target (Jiang et al. 2020, eq. 3; `kendall_tau`);
    * the granulated coefficients $\psi_k$ per hyperparameter axis and their mean $\Psi$
      (Jiang et al. 2020, Sec. 5: only axis $k$ varies within a group);
    * $\min_{|S| \le 2}$ of the normalized conditional mutual information between the
      orders of measure and target given the hyperparameters in $S$ (Jiang et al. 2020,
      Sec. 6), with the minimizing $S$;
    * the sign-errors over environments, pairs of settings that differ in one axis with
      the models coupled by seed (Dziugaite et al. 2020): mean, 90th percentile and max
      (the robust sign-error), and the max per axis.

    The intervals are percentile bootstraps: models resampled with replacement (pairs of a
    model with its own copy left out) for $\tau$, $\Psi$ and CMI; environments resampled
    for the mean sign-error. The seed axis groups nothing and is not conditioned on.

    Args:
        table: A `StudyTable` from `measure_models`.
        target: The column to predict: ``"gap"`` (test error minus train error, default),
            ``"loss_gap"``, ``"test_error"``, ``"test_loss"``...
        axes: The hyperparameter axes (default: every axis of the table).
        seed_axis: The axis holding the seed, if the table has it (default ``"seed"``).
        generator: Source of the bootstrap resamples.
        n_boot: Bootstrap resamples (0: no intervals).
        confidence: Level of the intervals, in (0, 1).
        min_gap_diff: Pairs whose targets differ by at most this are left out of the
            sign-errors.

    Returns:
        A `StudyAnalysis`.

    Example:
        >>> from sharpgen.study import StudyTable
        >>> rows = tuple({"name": str(i), "w": i, "gap": g, "m": m} for i, (g, m) in
        ...              enumerate([(0.1, 1.0), (0.2, 3.0), (0.3, 2.0)]))
        >>> res = analyze(StudyTable(rows, ("w",), ("m",)), n_boot=0)
        >>> round(res["m"].tau, 3)
        0.333
    """
    if not isinstance(table, StudyTable):
        raise TypeError(f"table must be a StudyTable (from measure_models), got {type(table)}.")
    numeric = (*METRICS, "gap", "loss_gap", *table.measures)
    if target not in numeric:
        raise ValueError(f"target must be one of the numeric columns {numeric}, got {target!r}.")
    axes = tuple(table.axes if axes is None else axes)
    unknown = [a for a in axes if a not in table.axes]
    if unknown:
        raise ValueError(f"axes {unknown} are not axes of the table {table.axes}.")
    n_boot = check_int("n_boot", n_boot, minimum=0)
    confidence = check_interval("confidence", confidence, 0.0, 1.0, closed="()")
    check_generator(generator)
    seed = seed_axis if seed_axis in axes else None
    seed_col = axes.index(seed) if seed is not None else None
    codes_all = _codes(table, axes)
    y_all = table.column(target)
    seed_int = int(torch.randint(0, 2**62, (1,), generator=generator))
    stats = []
    for name in table.measures:
        x_all = table.column(name)
        keep = np.isfinite(x_all) & np.isfinite(y_all)
        x, y, codes = x_all[keep], y_all[keep], codes_all[keep]
        rng = np.random.default_rng([seed_int, zlib.crc32(name.encode())])
        resamples = [rng.integers(0, len(x), len(x)) for _ in range(n_boot)] if len(x) else []
        stats.append(
            _stats_of(name, x, y, codes, axes, seed_col, resamples, rng, n_boot, confidence,
                      min_gap_diff)
        )  # fmt: skip
    return StudyAnalysis(table, target, axes, seed, tuple(stats), n_boot, confidence)
