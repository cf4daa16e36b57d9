"""The objective a measure works on: a ready `ModelObjective` or ``(model, loss_fn, data)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from sharpgen.curvature import ModelObjective
from sharpgen.curvature._params import ParamSelection
from sharpgen.curvature._resolve import ready_objective, resolve_objective

__all__ = ["objective_of"]


def objective_of(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    data: Any,
    params: ParamSelection = None,
    *,
    bn: str = "eval",
    dropout: bool = False,
    reduction: str = "mean",
    process_group: Any = "auto",
    where: str = "this measure",
) -> ModelObjective:
    """Return the objective of a ready `ModelObjective` (or operator), else build one.

    Delegates to `sharpgen.curvature` 's resolver; objective options that differ from
    their defaults count as given (an error with a ready objective).

    Raises:
        ValueError: A ready objective together with ``loss_fn``, ``data`` or options.
        TypeError: A module without ``loss_fn`` and ``data``.
    """
    defaults = {"params": None, "bn": "eval", "dropout": False, "reduction": "mean",
                "process_group": "auto"}  # fmt: skip
    given = {"params": params, "bn": bn, "dropout": dropout, "reduction": reduction,
             "process_group": process_group}  # fmt: skip
    options = {k: v for k, v in given.items() if v is not defaults[k] and v != defaults[k]}
    if ready_objective(model) is None:
        options = given
    return resolve_objective(model, loss_fn, data, options, where=where)
