"""The objective a measure works on: a ready `ModelObjective` or ``(model, loss_fn, data)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from sharpgen.curvature import ModelObjective
from sharpgen.curvature._params import ParamSelection

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
    """Return ``model`` if it is a `ModelObjective`, else build one from the arguments.

    Raises:
        ValueError: A ready objective was given together with ``loss_fn``, ``data`` or
            ``params`` (they are fixed where the objective was built), or ``model`` was a
            module without ``loss_fn`` and ``data``.
    """
    if isinstance(model, ModelObjective):
        given = [n for n, v in (("loss_fn", loss_fn), ("data", data), ("params", params))
                 if v is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{where} got a ready ModelObjective and also {', '.join(given)}; those are "
                "fixed where the objective is built. Pass either the objective alone or "
                "(model, loss_fn, data)."
            )
        return model
    if loss_fn is None or data is None:
        raise ValueError(
            f"{where} needs (model, loss_fn, data) or a ready sharpgen.ModelObjective; "
            f"got model={type(model).__name__} with loss_fn={loss_fn!r} and "
            f"data={'None' if data is None else type(data).__name__}."
        )
    return ModelObjective(
        model, loss_fn, data, params, bn=bn, dropout=dropout, reduction=reduction,
        process_group=process_group,
    )  # fmt: skip
