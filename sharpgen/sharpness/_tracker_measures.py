"""The invariant and per-layer measures as `SharpnessTracker` built-ins.

Each entry maps an objective (and the tracker's generator and the measure's options) to
``(values, cost)``: record entries by key suffix (``""`` is the measure's own key) and the
products / evaluations spent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sharpgen.curvature import ModelObjective
from sharpgen.sharpness._block_traces import block_traces
from sharpgen.sharpness._fisher import fisher_rao_norm, ggn_trace
from sharpgen.sharpness._invariant import relative_flatness
from sharpgen.sharpness._pacbayes import pac_bayes_sigma

__all__ = ["EXTRA_DEFAULTS", "EXTRA_MEASURES"]

Values = tuple[dict[str, Any], dict[str, int]]


def _ggn(obj: ModelObjective, gen: torch.Generator | None, **opts: Any) -> Values:
    est = ggn_trace(obj, generator=gen, **opts)
    return {"": est.value, "_stderr": est.stderr}, {"matvecs": est.num_matvecs}


def _fisher_rao(obj: ModelObjective, gen: torch.Generator | None, **opts: Any) -> Values:
    res = fisher_rao_norm(obj, **opts)
    return {"": res.value}, {"matvecs": 1 if res.fisher == "ggn" else 0}


def _relative(obj: ModelObjective, gen: torch.Generator | None, **opts: Any) -> Values:
    if "layer" not in opts:
        raise ValueError(
            "the 'relative_flatness' measure needs a layer: options={'relative_flatness': "
            "{'layer': 'name of a weight'}}."
        )
    est = relative_flatness(obj, generator=gen, **opts)
    return {"": est.value, "_stderr": est.stderr}, {"matvecs": est.num_matvecs}


def _pac_bayes(obj: ModelObjective, gen: torch.Generator | None, **opts: Any) -> Values:
    res = pac_bayes_sigma(obj, generator=gen, **opts)
    return {"": res.sigma}, {"loss_evals": res.num_loss_evals}


def _blocks(obj: ModelObjective, gen: torch.Generator | None, **opts: Any) -> Values:
    res = block_traces(obj, generator=gen, **opts)
    values: dict[str, Any] = {"": res.total}
    values.update({f"/{k or 'root'}": v for k, v in res.traces.items()})
    return values, {"matvecs": res.num_matvecs}


EXTRA_MEASURES: dict[str, Callable[..., Values]] = {
    "ggn_trace": _ggn,
    "fisher_rao": _fisher_rao,
    "relative_flatness": _relative,
    "pac_bayes": _pac_bayes,
    "block_traces": _blocks,
}
EXTRA_DEFAULTS: dict[str, dict[str, Any]] = {
    "ggn_trace": {},
    "fisher_rao": {},
    "relative_flatness": {},
    "pac_bayes": {"target": 0.1, "num_samples": 8, "max_samples": 32},
    "block_traces": {},
}
