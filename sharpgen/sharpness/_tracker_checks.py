"""The checks of `SharpnessTracker`'s measure options and model, at construction (private).

A tracker (and the Lightning / Hugging Face callbacks built on it) measures long after it is
built; an option it cannot use must be refused when it is built, not at the first
measurement after training time is spent. Every option of a built-in measure is checked
here: its name against the measure function's keyword arguments (and the objective
options), and its value by the package's shared rule for that kind of argument
(`sharpgen._validation`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from sharpgen._validation import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_rho,
)
from sharpgen.curvature import ModelObjective, model_loss
from sharpgen.curvature._options import OBJECTIVE_OPTIONS, check_options
from sharpgen.sharpness._average import average_sharpness
from sharpgen.sharpness._block_traces import block_traces
from sharpgen.sharpness._blocks import check_blocks
from sharpgen.sharpness._eigen import top_eigenvalues
from sharpgen.sharpness._fisher import FISHER_KINDS, fisher_rao_norm, ggn_trace
from sharpgen.sharpness._invariant import relative_flatness
from sharpgen.sharpness._pacbayes import pac_bayes_sigma
from sharpgen.sharpness._trace import hessian_trace
from sharpgen.sharpness._tracker_measures import EXTRA_DEFAULTS, EXTRA_MEASURES
from sharpgen.sharpness._worst_case import sam_sharpness

__all__ = [
    "BUILTIN_MEASURES",
    "COST_KEYS",
    "check_measure_options",
    "check_measures_for_loss",
    "check_tracked_model",
    "resolve_measures",
    "resolve_options",
]

BUILTIN_MEASURES = ("loss", "trace", "top_eigenvalue", "sam", "average", *EXTRA_MEASURES)
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "loss": {},
    "trace": {},
    "top_eigenvalue": {"tol": 1e-3},
    "sam": {"rho": 0.05},
    "average": {"rho": 0.01, "num_samples": 16},
    **EXTRA_DEFAULTS,
}
COST_KEYS = ("matvecs", "gradient_evals", "loss_evals")

# the function behind each built-in measure, and the arguments the tracker sets itself
_FUNCTIONS: dict[str, Callable[..., Any] | None] = {
    "loss": None,
    "trace": hessian_trace,
    "top_eigenvalue": top_eigenvalues,
    "sam": sam_sharpness,
    "average": average_sharpness,
    "ggn_trace": ggn_trace,
    "fisher_rao": fisher_rao_norm,
    "relative_flatness": relative_flatness,
    "pac_bayes": pac_bayes_sigma,
    "block_traces": block_traces,
}
_SET_BY_TRACKER = {"model", "loss_fn", "data", "generator", "objective_options"}
_FIXED = {"top_eigenvalue": {"k"}}  # one eigenvalue is what the record holds


def _int(minimum: int) -> Callable[[str, Any], Any]:
    return lambda name, v: check_int(name, v, minimum=minimum)


def _layer(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a parameter or module name (str), got {value!r}.")
    return value


# one rule per option name, shared by the measures that take it (None passes where the
# function's default is None)
_RULES: dict[str, Callable[[str, Any], Any]] = {
    "num_matvecs": _int(1),
    "max_matvecs": _int(1),
    "exact_threshold": _int(0),
    "block_size": _int(1),
    "max_iter": _int(1),
    "max_basis": _int(1),
    "steps": _int(1),
    "restarts": _int(1),
    "m": _int(1),
    "num_samples": _int(1),
    "max_samples": _int(1),
    "rtol": check_positive,
    "tol": check_positive,
    "target": check_positive,
    "rho": lambda name, v: check_rho(v, name),
    "eta": lambda name, v: check_positive(name, v, allow_zero=True),
    "adaptive": check_bool,
    "antithetic": check_bool,
    "magnitude_aware": check_bool,
    "progress": check_bool,
    "return_perturbation": check_bool,
    "fisher": lambda name, v: check_choice(name, v, FISHER_KINDS),
    "blocks": lambda _name, v: check_blocks(v),
    "layer": _layer,
}
_OBJECTIVE_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(ModelObjective.__init__).parameters.items()
    if k in ("bn", "dropout", "reduction", "backend", "func_mode", "vectorize", "second_order")
}


def _accepted(kind: str) -> tuple[list[str], dict[str, Any]]:
    """The options a built-in measure takes (besides the objective's) and their defaults."""
    fn = _FUNCTIONS[kind]
    if fn is None:
        return [], {}
    params = inspect.signature(fn).parameters
    skip = _SET_BY_TRACKER | _FIXED.get(kind, set())
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [n for n, p in params.items() if n not in skip and p.kind in kinds]
    return names, {n: params[n].default for n in names}


def check_measure_options(options: Mapping[str, Mapping[str, Any]]) -> None:
    """Check every option of every tracked built-in measure (names and values).

    Args:
        options: Built-in measure name -> its keyword arguments (defaults merged in).

    Raises:
        TypeError: An option the measure does not take, or a value of the wrong type.
        ValueError: A value out of range, or a measure missing a required option.
    """
    for kind, opts in options.items():
        names, defaults = _accepted(kind)
        unknown = sorted(set(opts) - set(names) - set(OBJECTIVE_OPTIONS))
        if unknown:
            fixed = sorted(_FIXED.get(kind, set()) & set(unknown))
            why = f" ({fixed} is set by the tracker)" if fixed else ""
            raise TypeError(
                f"options[{kind!r}] has {unknown}, which the {kind!r} measure does not "
                f"take{why}; its options are {names} and the objective options "
                f"{list(OBJECTIVE_OPTIONS)}."
            )
        for key, value in opts.items():
            rule = _RULES.get(key)
            if rule is None or (value is None and defaults.get(key, 0) is None):
                continue
            rule(f"options[{kind!r}][{key!r}]", value)
        own = {k: v for k, v in opts.items() if k in _OBJECTIVE_DEFAULTS}
        if own:
            check_options(**{**_OBJECTIVE_DEFAULTS, **own})
        if kind == "relative_flatness" and "layer" not in opts:
            raise ValueError(
                "the 'relative_flatness' measure needs a layer: options={'relative_flatness': "
                "{'layer': 'name of a weight'}}."
            )


def check_measures_for_loss(
    loss_fn: Any,
    measures: Mapping[str, str | Callable[..., Any]],
    options: Mapping[str, Mapping[str, Any]],
) -> None:
    r"""Refuse, at construction, a Gauss-Newton measure on the loss the model returns.

    The GGN $J^\top H_\ell J$ (``"ggn_trace"``, ``"fisher_rao"`` with ``fisher="ggn"``)
    differentiates the loss twice in the model's outputs; ``outputs.loss``
    (``loss_fn=None``, `sharpgen.model_loss`) is itself one of the outputs, so it would be
    refused at the first measurement, after training time is spent.

    Raises:
        ValueError: Such a measure with ``loss_fn`` None or `sharpgen.model_loss`.
    """
    if loss_fn is not model_loss:
        return
    for name, kind in measures.items():
        ggn = kind == "ggn_trace" or (
            kind == "fisher_rao" and options.get(kind, {}).get("fisher", "ggn") == "ggn"
        )
        if ggn:
            fix = (
                "or options={'fisher_rao': {'fisher': 'empirical'}}" if kind == "fisher_rao" else ""
            )
            raise ValueError(
                f"measure {name!r} ({kind}) is a Gauss-Newton measure: it needs the loss as a "
                "function of the model's outputs, but loss_fn=None means the loss the model "
                "returns (outputs.loss), whose Hessian in the outputs is zero; pass "
                "loss_fn=(outputs, targets) -> loss, e.g. lambda out, y: "
                f"F.cross_entropy(out.logits, y) with the labels as targets{', ' if fix else ''}"
                f"{fix}."
            )


def check_tracked_model(model: nn.Module, options: Mapping[str, Mapping[str, Any]]) -> None:
    """The model can be measured: it has parameters, and a named layer exists.

    Raises:
        ValueError: No parameters; a ``relative_flatness`` layer that is not in the model.
    """
    names = [n for n, _ in model.named_parameters()]
    if not names:
        raise ValueError(
            f"the model ({type(model).__name__}) has no parameters; sharpness is measured with "
            "respect to the parameters, so pass the model being trained."
        )
    layer = options.get("relative_flatness", {}).get("layer")
    if layer is not None:
        from sharpgen.sharpness._invariant import _weight_name

        _weight_name(model, layer)


def resolve_measures(
    measures: Sequence[str] | Mapping[str, str | Callable[..., Any]],
) -> dict[str, str | Callable[..., Any]]:
    """The tracked measures: record name -> built-in name or callable."""
    valid = ", ".join(repr(m) for m in BUILTIN_MEASURES)
    if isinstance(measures, str):
        measures = (measures,)
    if isinstance(measures, Mapping):
        items = list(measures.items())
    elif isinstance(measures, Sequence):
        items = [(m, m) for m in measures]
    else:
        raise TypeError(
            f"measures must be a sequence of names or a dict name -> callable, got "
            f"{type(measures).__name__}."
        )
    if not items:
        raise ValueError(f"measures is empty; choose some of {valid} or pass callables.")
    out: dict[str, str | Callable[..., Any]] = {}
    for name, what in items:
        if not isinstance(name, str):
            raise TypeError(f"measure names must be str, got {name!r}.")
        if isinstance(what, str):
            if what not in BUILTIN_MEASURES:
                raise ValueError(f"unknown measure {what!r}; valid choices are {valid}.")
        elif not callable(what):
            raise TypeError(
                f"measure {name!r} must be a built-in name or a callable "
                f"fn(model, loss_fn, eval_batch), got {type(what).__name__}."
            )
        if name in ("step", *COST_KEYS):
            raise ValueError(f"measure name {name!r} is reserved; choose another name.")
        out[name] = what
    return out


def resolve_options(
    measures: Mapping[str, Any], options: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """Built-in measure -> its options, the defaults merged in."""
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict name -> dict, got {type(options).__name__}.")
    used = {w for w in measures.values() if isinstance(w, str)}
    for key, value in options.items():
        if key not in used:
            raise ValueError(
                f"options given for {key!r}, which is not a tracked built-in measure "
                f"(tracked: {sorted(used)})."
            )
        if not isinstance(value, Mapping):
            raise TypeError(f"options[{key!r}] must be a dict of keyword arguments.")
    return {b: {**DEFAULT_OPTIONS[b], **options.get(b, {})} for b in used}
