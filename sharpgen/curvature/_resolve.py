"""One objective from either form: ``(model, loss_fn, data, **options)`` or a ready one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from sharpgen.curvature._objective import ModelObjective
from sharpgen.curvature._options import OBJECTIVE_OPTIONS

__all__ = ["as_objective", "ready_objective", "resolve_objective"]


def ready_objective(source: object) -> ModelObjective | None:
    """The objective of a ready `ModelObjective` or curvature operator, else None."""
    if isinstance(source, ModelObjective):
        return source
    objective = getattr(source, "objective", None)
    return objective if isinstance(objective, ModelObjective) else None


def check_objective_args(
    source: object, loss_fn: object, data: object, options: Mapping[str, Any], where: str
) -> ModelObjective | None:
    """Check the two forms without any work; return the ready objective (None: build one).

    Raises:
        TypeError: An unknown option, a missing ``loss_fn``/``data`` with a model, or a
            ``source`` that is neither a module nor a ready objective or operator.
        ValueError: A ready objective together with ``loss_fn``, ``data`` or options.
    """
    unknown = sorted(set(options) - set(OBJECTIVE_OPTIONS))
    if unknown:
        raise TypeError(
            f"{where} got unexpected keyword argument(s) {unknown}; the objective options are "
            f"{list(OBJECTIVE_OPTIONS)}."
        )
    ready = ready_objective(source)
    if ready is not None:
        given = [n for n, v in (("loss_fn", loss_fn), ("data", data)) if v is not None]
        given += sorted(options)
        if given:
            raise ValueError(
                f"{where} got a ready {type(source).__name__} and also {given}; the objective "
                "already fixes the loss, the data and the objective options. Pass them where "
                "it is built (ModelObjective(model, loss_fn, data, ...)), or call "
                f"{where}(model, loss_fn, data, ...) instead (other arguments by keyword)."
            )
        return ready
    if not isinstance(source, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (with loss_fn and data), a ModelObjective or a "
            f"curvature operator, got {type(source).__name__}."
        )
    if data is None:
        raise TypeError(
            f"{where} needs loss_fn and data with a model: {where}(model, loss_fn, data, ...) "
            "(loss_fn=None: the loss the model returns, e.g. a Hugging Face model with the "
            "labels in the batch); or pass a ready ModelObjective."
        )
    return None


def resolve_objective(
    source: Any,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    data: Any,
    options: Mapping[str, Any],
    *,
    where: str,
) -> ModelObjective:
    """`as_objective` for a caller named ``where`` (it names the caller in errors)."""
    ready = check_objective_args(source, loss_fn, data, options, where)
    if ready is not None:
        return ready
    return ModelObjective(source, loss_fn, data, **options)


def as_objective(
    model: Any,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    **objective_options: Any,
) -> ModelObjective:
    """The objective of either calling form of the measures.

    ``as_objective(model, loss_fn, data, **objective_options)`` builds a `ModelObjective`
    (the options are its keyword arguments, see `ObjectiveOptions`);
    ``as_objective(objective)`` returns a ready objective as it is, and
    ``as_objective(operator)`` the objective of a curvature operator. One objective
    serves several measures in a row, with its checks and caches.

    Args:
        model: An ``nn.Module``, a `ModelObjective` or a curvature operator.
        loss_fn: ``loss_fn(outputs, targets)`` (only with a module).
        data: One batch or an iterable of batches (only with a module).
        **objective_options: Keyword arguments of `ModelObjective` (only with a module).

    Returns:
        A `ModelObjective`.

    Raises:
        ValueError: A ready objective together with ``loss_fn``, ``data`` or options.
        TypeError: An unknown option, or a module without ``loss_fn`` and ``data``.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1).double()
        >>> batch = (torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))
        >>> obj = as_objective(model, torch.nn.functional.mse_loss, batch, reduction="sum")
        >>> as_objective(obj) is obj
        True
    """
    return resolve_objective(model, loss_fn, data, objective_options, where="as_objective")
