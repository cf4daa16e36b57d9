"""Argument checks of the landscape functions, in one place, before any work (private).

Every public function of `sharpgen.landscape` checks its arguments here before it draws a
random number, builds an objective or runs a forward pass, so that a wrong type or value
gives a `TypeError`/`ValueError` naming the argument, the value and the fix (and not an
error from deep inside Python or torch, or a grid of NaN).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sharpgen._validation import check_bool, check_choice, check_int, check_positive
from sharpgen.curvature import model_loss

__all__ = [
    "check_callable",
    "check_num_points",
    "check_span",
    "check_span_2d",
    "check_tensor_map",
    "check_direction_like",
]


def _real(name: str, value: object) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must hold real numbers, got {type(value).__name__} {value!r}; pass a "
            "pair of numbers such as (-1.0, 1.0)."
        )
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must hold finite numbers, got {value!r}; e.g. (-1.0, 1.0).")
    return out


def check_span(name: str, span: object) -> tuple[float, float]:
    """``(low, high)``: two finite real numbers with ``low < high``."""
    if isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 2:
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {span!r}.")
    lo, hi = _real(f"{name}[0]", span[0]), _real(f"{name}[1]", span[1])
    if not lo < hi:
        raise ValueError(f"{name} must have low < high, got {span!r}; e.g. (-1.0, 1.0).")
    return lo, hi


def check_span_2d(span: object) -> tuple[tuple[float, float], tuple[float, float]]:
    """One pair for both axes, or a pair of pairs ``((xlo, xhi), (ylo, yhi))``."""
    pair = (
        isinstance(span, Sequence)
        and not isinstance(span, (str, bytes))
        and len(span) == 2
        and all(isinstance(s, Sequence) and not isinstance(s, (str, bytes)) for s in span)
    )
    if pair:
        assert isinstance(span, Sequence)
        return check_span("span[0]", span[0]), check_span("span[1]", span[1])
    one = check_span("span", span)
    return one, one


def check_num_points(value: object, dims: int = 1) -> tuple[int, ...]:
    """Grid sizes ``>= 2``: one int (for every axis), or ``dims`` ints."""
    if dims > 1 and isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != dims:
            raise ValueError(
                f"num_points must be an int or {dims} ints (one per axis), got {value!r}."
            )
        return tuple(check_int(f"num_points[{i}]", v, minimum=2) for i, v in enumerate(value))
    return (check_int("num_points", value, minimum=2),) * dims


def check_callable(name: str, value: object, how: str) -> None:
    """``value`` is None or callable (``how``: its call signature, for the message)."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable {how} or None, got {type(value).__name__}.")


def check_tensor_map(
    name: str, value: object, *, floating: bool = True, module_ok: bool = False
) -> dict[str, Tensor]:
    """A non-empty mapping str -> Tensor (floating point with ``floating``).

    ``module_ok``: the argument also takes a module (said in the message).
    """
    if not isinstance(value, Mapping):
        example = (
            "dict(model.named_parameters())) or a module"
            if module_ok
            else "{name: tensor} with the parameter names and shapes)"
        )
        raise TypeError(
            f"{name} must be a dict name -> Tensor (e.g. {example}, got {type(value).__name__}."
        )
    if not value:
        raise ValueError(f"{name} is empty; it needs at least one name -> Tensor entry.")
    for k, v in value.items():
        if not isinstance(k, str):
            raise TypeError(f"{name} keys must be parameter names (str), got {k!r}.")
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}[{k!r}] must be a Tensor, got {type(v).__name__}.")
        if floating and not v.is_floating_point():
            raise TypeError(f"{name}[{k!r}] must be a floating-point tensor, got dtype {v.dtype}.")
    return dict(value)


def check_direction_like(
    direction: object, params: Mapping[str, Tensor], name: str = "direction"
) -> dict[str, Tensor]:
    """A direction: the names of ``params`` exactly, each tensor shaped like its parameter."""
    d = check_tensor_map(name, direction)
    if set(d) != set(params):
        missing = [n for n in params if n not in d][:6]
        extra = [n for n in d if n not in params][:6]
        raise ValueError(
            f"{name} must have the parameter names {list(params)[:6]}; missing {missing}, "
            f"unknown {extra}."
        )
    for n, ref in params.items():
        if d[n].shape != ref.shape:
            raise ValueError(
                f"{name}[{n!r}] has shape {tuple(d[n].shape)}, the parameter {tuple(ref.shape)}."
            )
    return d


def check_grid_options(
    *,
    metric: object,
    chunk_size: object,
    memory: object,
    progress: object,
    reduction: object,
) -> tuple[int | None, int]:
    """The options shared by the grids: ``(chunk_size, memory)`` checked and converted."""
    check_callable("metric", metric, "metric(outputs, targets) -> scalar")
    check_bool("progress", progress)
    check_choice("reduction", reduction, ("mean", "sum"))
    chunk = None if chunk_size is None else check_int("chunk_size", chunk_size)
    return chunk, int(check_positive("memory", memory))


def loss_callable(loss_fn: object) -> Callable[..., Any]:
    """``loss_fn`` if callable; None: `sharpgen.model_loss` (the loss the model returns)."""
    if loss_fn is None:
        return model_loss
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be a callable loss_fn(outputs, targets) -> scalar (or None: the "
            f"loss the model returns), got {type(loss_fn).__name__}."
        )
    return loss_fn
