r"""The measure registry and `measure_models`, the table of a study (private).

Every measure is a `Measure`: a name, a function ``fn(model: TrainedModel, generator) ->
float``, its formula, its reference and whether it needs the parameters at initialization.
Sharpness measures are sharpgen's own functions on the training data; the classical
complexity measures are in `sharpgen.study._complexity`. All are oriented as the studies
orient them: larger means "predicted to generalize worse" (the PAC-Bayes flatness scale
$\sigma$ enters as $1/\sigma^2$).
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sharpgen._validation import check_generator
from sharpgen.sharpness import (
    average_sharpness,
    fisher_rao_norm,
    ggn_trace,
    hessian_trace,
    pac_bayes_sigma,
    relative_flatness,
    sam_sharpness,
    top_eigenvalues,
)
from sharpgen.study import _complexity as cx
from sharpgen.study._record import METRICS, StudyTable, TrainedModel, evaluate

__all__ = ["MEASURES", "Measure", "measure_models"]


@dataclass(frozen=True)
class Measure:
    r"""A complexity measure of a study.

    Attributes:
        name: The column name in the `StudyTable`.
        fn: ``fn(model, generator) -> float`` with ``model`` a `TrainedModel` and
            ``generator`` a `torch.Generator` (or ``None``) for stochastic measures.
        formula: The formula in LaTeX.
        reference: Where the measure comes from.
        needs_init: Whether it needs ``TrainedModel.init_params`` (``nan`` without them).

    Example:
        >>> m = Measure("width", lambda tm, g: float(tm.hparams["width"]), "m", "-")
        >>> m.name
        'width'
    """

    name: str
    fn: Callable[[TrainedModel, torch.Generator | None], float]
    formula: str = ""
    reference: str = ""
    needs_init: bool = False


def _sharp(fn: Callable[..., Any], **kw: Any) -> Callable[[TrainedModel, Any], float]:
    def measure(tm: TrainedModel, generator: torch.Generator | None) -> float:
        return float(fn(tm.model, tm.loss_fn, tm.train_data, generator=generator, **kw))

    return measure


def _budget_trace(fn: Callable[..., Any]) -> Callable[[TrainedModel, Any], float]:
    """Exact up to 64 parameters, else sharpgen's automatic estimator on 64 products."""

    def measure(tm: TrainedModel, generator: torch.Generator | None) -> float:
        p = sum(q.numel() for q in tm.model.parameters() if q.requires_grad)
        kw: dict[str, Any] = {"method": "exact"} if p <= 64 else {"num_matvecs": 64}
        return float(fn(tm.model, tm.loss_fn, tm.train_data, generator=generator, **kw))

    return measure


def _top_eig(tm: TrainedModel, generator: torch.Generator | None) -> float:
    res = top_eigenvalues(tm.model, tm.loss_fn, tm.train_data, k=1, generator=generator)
    return float(res.eigenvalues[0])


def _fisher_rao(tm: TrainedModel, generator: torch.Generator | None) -> float:
    return float(fisher_rao_norm(tm.model, tm.loss_fn, tm.train_data))


def _last_weight(tm: TrainedModel) -> str:
    names = [n for n, p in tm.model.named_parameters() if p.ndim >= 2]
    if not names:
        raise ValueError(f"model {tm.name!r} has no weight matrix for relative flatness.")
    return names[-1]


def _relative_flatness(tm: TrainedModel, generator: torch.Generator | None) -> float:
    layer = _last_weight(tm)
    res = relative_flatness(tm.model, tm.loss_fn, tm.train_data, layer=layer, generator=generator)
    return float(res)


def _pac_bayes(magnitude_aware: bool) -> Callable[[TrainedModel, Any], float]:
    def measure(tm: TrainedModel, generator: torch.Generator | None) -> float:
        res = pac_bayes_sigma(
            tm.model,
            tm.loss_fn,
            tm.train_data,
            magnitude_aware=magnitude_aware,
            num_samples=8,
            max_samples=32,
            rtol=0.05,
            generator=generator,
        )
        return 1.0 / float(res) ** 2

    return measure


_J = "Jiang et al. (2020), App. C"
_A = "Andriushchenko et al. (2023)"
_MEASURE_LIST = [
    Measure("hessian_trace", _budget_trace(hessian_trace),
            r"\operatorname{tr}\nabla^2 L(\theta)", "Wen, Li & Ma (2023); Keskar et al. (2017)"),
    Measure("top_eigenvalue", _top_eig, r"\lambda_{\max}(\nabla^2 L(\theta))",
            "Keskar et al. (2017); Jastrzebski et al. (2020)"),
    Measure("ggn_trace", _budget_trace(ggn_trace), r"\operatorname{tr} G(\theta)",
            "Martens (2020); Jastrzebski et al. (2020)"),
    Measure("fisher_rao_norm", _fisher_rao, r"\sqrt{\theta^\top G(\theta)\,\theta}",
            "Liang et al. (2019); " + _J),
    Measure("relative_flatness", _relative_flatness,
            r"\operatorname{tr}(A^{1/2} H_W A^{1/2}),\ A = WW^\top\otimes I\ "
            r"\text{(last layer)}", "Petzka et al. (2021)"),
    Measure("worst_case_sharpness", _sharp(sam_sharpness, rho=0.05, steps=3),
            r"\max_{\|\varepsilon\|_2\le 0.05} L(\theta+\varepsilon) - L(\theta)",
            "Keskar et al. (2017); Foret et al. (2021); " + _A),
    Measure("adaptive_worst_case_sharpness",
            _sharp(sam_sharpness, rho=0.5, steps=3, adaptive=True),
            r"\max_{\|\varepsilon/|\theta|\|_2\le 0.5} L(\theta+\varepsilon) - L(\theta)",
            "Kwon et al. (2021); " + _A),
    Measure("average_sharpness", _sharp(average_sharpness, rho=0.05),
            r"\mathbb{E}_{\varepsilon\sim N(0, 0.05^2 I)} L(\theta+\varepsilon) - L(\theta)",
            "Jiang et al. (2020); " + _A),
    Measure("adaptive_average_sharpness", _sharp(average_sharpness, rho=0.5, adaptive=True),
            r"\mathbb{E}_{\varepsilon\sim N(0, 0.5^2\,\mathrm{diag}(\theta^2))} "
            r"L(\theta+\varepsilon) - L(\theta)", _A),
    Measure("pac_bayes_flatness", _pac_bayes(False),
            r"1/\sigma^2,\ \sigma = \max\{\sigma: \mathbb{E}_{u\sim N(0,\sigma^2 I)} "
            r"L(\theta+u) - L(\theta) \le 0.1\}", _J + ', "pacbayes-flatness"'),
    Measure("pac_bayes_mag_flatness", _pac_bayes(True),
            r"1/\sigma^2,\ u_i\sim N(0, \sigma^2\theta_i^2 + \epsilon^2)",
            _J + ', "pacbayes-mag-flatness"'),
    Measure("num_params", cx.num_params, r"\sum_p \mathrm{numel}(p)", _J),
    Measure("inverse_margin", cx.inverse_margin, r"1/\gamma^2", _J),
    Measure("param_norm", cx.param_norm, r"\sum_i \|W_i\|_F^2", _J),
    Measure("frob_distance", cx.frob_distance, r"\sum_i \|W_i - W_i^0\|_F^2", _J,
            needs_init=True),
    Measure("dist_spec_init", cx.dist_spec_init, r"\sum_i \|W_i - W_i^0\|_2^2", _J,
            needs_init=True),
    Measure("log_prod_of_fro", cx.log_prod_of_fro, r"\log\prod_i \|W_i\|_F^2", _J),
    Measure("log_sum_of_fro", cx.log_sum_of_fro,
            r"\log\bigl(d\,(\prod_i \|W_i\|_F^2)^{1/d}\bigr)", _J),
    Measure("log_prod_of_fro_over_margin", cx.log_prod_of_fro_over_margin,
            r"\log\bigl(\prod_i \|W_i\|_F^2/\gamma^2\bigr)", _J),
    Measure("log_prod_of_spec", cx.log_prod_of_spec, r"\log\prod_i \|W_i\|_2^2", _J),
    Measure("log_sum_of_spec", cx.log_sum_of_spec,
            r"\log\bigl(d\,(\prod_i \|W_i\|_2^2)^{1/d}\bigr)", _J),
    Measure("log_spec_over_margin", cx.log_spec_over_margin,
            r"\log\bigl(\prod_i \|W_i\|_2^2/\gamma^2\bigr)", _J),
    Measure("log_spec_orig_main", cx.log_spec_orig_main,
            r"\log\bigl(\prod_i\|W_i\|_2^2\sum_i\|W_i\|_F^2/\|W_i\|_2^2/\gamma^2\bigr)",
            "Bartlett et al. (2017); " + _J),
    Measure("log_spec_init_main", cx.log_spec_init_main,
            r"\log\bigl(\prod_i\|W_i\|_2^2\sum_i\|W_i-W_i^0\|_F^2/\|W_i\|_2^2/\gamma^2\bigr)",
            "Bartlett et al. (2017); " + _J, needs_init=True),
    Measure("path_norm", cx.path_norm, r"\sum_j f_{w^2}(\mathbf 1)[j]",
            "Neyshabur et al. (2015); " + _J),
    Measure("path_norm_over_margin", cx.path_norm_over_margin,
            r"\sum_j f_{w^2}(\mathbf 1)[j]/\gamma^2", _J),
]  # fmt: skip

MEASURES: dict[str, Measure] = {m.name: m for m in _MEASURE_LIST}
"""Every built-in measure by name (see the study guide for the table of formulas)."""


def _as_measure(item: Any, name: str | None = None) -> Measure:
    if isinstance(item, Measure):
        return item
    if isinstance(item, str):
        if item not in MEASURES:
            raise ValueError(
                f"measures: unknown measure {item!r}; the built-in ones are {sorted(MEASURES)}, "
                "or pass a callable (TrainedModel) -> float."
            )
        return MEASURES[item]
    if callable(item):
        label = name or getattr(item, "__name__", None)
        if not label or label == "<lambda>":
            raise ValueError(
                "measures: a lambda has no name; pass {'my_name': fn} or a named function."
            )
        try:
            takes_generator = "generator" in inspect.signature(item).parameters
        except (TypeError, ValueError):
            takes_generator = False

        def fn(tm: TrainedModel, generator: torch.Generator | None) -> float:
            return float(item(tm, generator=generator) if takes_generator else item(tm))

        return Measure(label, fn, reference="user-defined")
    raise TypeError(
        f"measures: each entry must be a measure name, a Measure or a callable "
        f"(TrainedModel) -> float, got {type(item).__name__}."
    )


def _resolve(measures: Any) -> list[Measure]:
    if measures is None:
        return list(MEASURES.values())
    if isinstance(measures, Mapping):
        out = [_as_measure(v, str(k)) for k, v in measures.items()]
    elif isinstance(measures, (str, Measure)) or callable(measures):
        out = [_as_measure(measures)]
    elif isinstance(measures, Sequence):
        out = [_as_measure(m) for m in measures]
    else:
        raise TypeError(
            f"measures must be None, a sequence of names/callables or a mapping name -> "
            f"callable, got {type(measures).__name__}."
        )
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    reserved = {"name", *METRICS, "gap", "loss_gap"}
    if dup or reserved & set(names):
        raise ValueError(f"measures: names must be unique and not {sorted(reserved)}; got {names}.")
    return out


def _check_models(models: Any) -> list[TrainedModel]:
    if isinstance(models, TrainedModel) or not isinstance(models, Sequence):
        raise TypeError("models must be a list of TrainedModel records.")
    models = list(models)
    if not models:
        raise ValueError("models is empty; pass at least one TrainedModel.")
    for i, tm in enumerate(models):
        if not isinstance(tm, TrainedModel):
            raise TypeError(f"models[{i}] is a {type(tm).__name__}, not a TrainedModel.")
    names = [tm.name for tm in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"models: names must be unique, repeated: {dup}.")
    return models


def _child(seed: int | None, name: str) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed ^ zlib.crc32(name.encode())) % 2**63)


def _report(progress: Any, done: int, total: int, name: str) -> None:
    if progress is True:
        print(f"measure_models: {done}/{total} {name}", file=sys.stderr, flush=True)
    elif callable(progress):
        progress(done, total, name)


def measure_models(
    models: Sequence[TrainedModel],
    measures: Any = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool | Callable[[int, int, str], Any] | None = None,
) -> StudyTable:
    r"""Compute every measure on every model: the table a study analyses.

    Each row holds the model's hyperparameters, its metrics (those missing from
    ``TrainedModel.metrics`` are computed by `evaluate`), the generalization gap
    $\text{test error} - \text{train error}$ (``gap``) and the loss gap (``loss_gap``), and
    one column per measure. A measure that raises (a margin-based measure on a model with
    more than 10% training error, a measure that needs ``init_params`` the record lacks, a
    non-finite curvature product) gives ``nan`` and an entry in ``StudyTable.failures``,
    with one warning at the end; the other measures go on.

    Randomness: with a ``generator``, one seed is drawn from it per model and every
    stochastic measure gets its own generator derived from that seed and its name, so a
    measure's value does not depend on which other measures run, and the same seed gives
    the same table. Models are never changed (sharpgen's measures restore their state).

    Args:
        models: The `TrainedModel` records (unique names).
        measures: ``None`` (every measure of `MEASURES`), or a list whose entries are names
            of `MEASURES`, `Measure` objects or callables ``(TrainedModel) -> float`` (named
            by ``__name__``; one that accepts ``generator=`` gets one), or a mapping
            name -> such callable.
        generator: Source of randomness for the stochastic measures.
        progress: ``True`` prints one line per model to stderr; a callable is called as
            ``progress(done, total, model_name)``.

    Returns:
        A `StudyTable`.

    Example:
        >>> import torch
        >>> from sharpgen.study import TrainedModel, measure_models
        >>> x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
        >>> models = [TrainedModel(f"w{w}", {"width": w},
        ...                        torch.nn.Sequential(torch.nn.Linear(2, w), torch.nn.ReLU(),
        ...                                            torch.nn.Linear(w, 2)),
        ...                        torch.nn.functional.cross_entropy, (x, y), (x, y))
        ...           for w in (2, 4)]
        >>> table = measure_models(models, ["num_params", "param_norm"])
        >>> table.column("num_params").tolist()
        [12.0, 22.0]
    """
    models = _check_models(models)
    resolved = _resolve(measures)
    check_generator(generator)
    axes: list[str] = []
    for tm in models:
        axes += [a for a in tm.hparams if a not in axes]
    rows, failures = [], []
    for i, tm in enumerate(models):
        seed = (
            None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
        )
        row: dict[str, Any] = {"name": tm.name, **dict(tm.hparams)}
        metrics = dict(tm.metrics)
        for split, data in (("train", tm.train_data), ("test", tm.test_data)):
            if f"{split}_loss" not in metrics or f"{split}_error" not in metrics:
                loss, err = evaluate(tm.model, tm.loss_fn, data)
                metrics.setdefault(f"{split}_loss", loss)
                metrics.setdefault(f"{split}_error", err)
        row.update({k: float(metrics[k]) for k in METRICS})
        row["gap"] = row["test_error"] - row["train_error"]
        row["loss_gap"] = row["test_loss"] - row["train_loss"]
        for m in resolved:
            if m.needs_init and tm.init_params is None:
                row[m.name] = math.nan
                continue
            try:
                row[m.name] = float(m.fn(tm, _child(seed, m.name)))
            except Exception as exc:  # one failed measure must not end a study
                row[m.name] = math.nan
                failures.append((tm.name, m.name, f"{type(exc).__name__}: {exc}"))
        rows.append(row)
        _report(progress, i + 1, len(models), tm.name)
    if failures:
        warnings.warn(
            f"measure_models: {len(failures)} measure(s) failed and are nan, e.g. "
            f"{failures[0][1]} on {failures[0][0]}: {failures[0][2]} "
            "(all in StudyTable.failures).",
            RuntimeWarning,
            stacklevel=2,
        )
    return StudyTable(tuple(rows), tuple(axes), tuple(m.name for m in resolved), tuple(failures))
