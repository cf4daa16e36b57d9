"""Selecting the parameters a curvature quantity is taken with respect to."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Union

import torch
from torch import Tensor, nn

__all__ = ["ParamSelection", "base_point", "check_point", "select_params", "sharing_parameters"]

#: Whether objectives built now share the model's parameter storage (`sharing_parameters`).
_SHARE: ContextVar[bool] = ContextVar("sharpgen_share_parameters", default=False)


@contextmanager
def sharing_parameters() -> Iterator[None]:
    """Context: objectives built inside take the model's parameters as their base point.

    For an objective that lives only inside one measure call, during which nothing steps
    the model: its base point is then detached aliases of the model's parameters instead
    of copies, which saves one copy of the selected parameters ($P$ bytes). An in-place
    write to a parameter during the call would move the base point; an objective built
    elsewhere (one a caller holds across training steps) copies.
    """
    token = _SHARE.set(True)
    try:
        yield
    finally:
        _SHARE.reset(token)


def base_point(selected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The objective's base point: detached copies of ``selected`` (aliases when shared)."""
    if _SHARE.get():
        return {n: t.detach() for n, t in selected.items()}
    return {n: t.detach().clone() for n, t in selected.items()}


ParamSelection = Union[None, Mapping[str, Tensor], Sequence[str], Callable[[str, Tensor], bool]]  # noqa: UP007


def select_params(model: nn.Module, params: ParamSelection = None) -> dict[str, Tensor]:
    """Return the selected parameters of ``model`` as an ordered ``dict`` name -> tensor.

    The order is the order of ``model.named_parameters()`` (for a dict or a name list it is
    the order given), and it fixes the layout of the flattened vectors of
    `flatten_params`.

    Args:
        model: The module whose parameters are selected.
        params: What to select.

            * ``None``: every parameter with ``requires_grad=True`` (the trainable ones).
            * a dict name -> tensor: those names, at the given values (the values are the
              point at which curvature is evaluated; shapes must match the model's).
            * a list or tuple of names (frozen parameters may be named explicitly).
            * a predicate ``(name, tensor) -> bool`` applied to ``model.named_parameters()``.

    Returns:
        A new dict; for ``None``, names and predicates the values are the model's own
        parameter tensors (not copies), for a dict the given tensors.

    Raises:
        ValueError: If nothing is selected, a name is not a parameter of the model, a tensor
            of a dict has the wrong shape, or the selected tensors live on several devices.
        TypeError: If ``params`` is of another kind, or a selected tensor is not
            floating point, or the selected tensors have different dtypes.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> list(select_params(model))
        ['weight', 'bias']
        >>> list(select_params(model, ["bias"]))
        ['bias']
        >>> list(select_params(model, lambda name, p: p.ndim == 2))
        ['weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    named = dict(model.named_parameters())
    selected: dict[str, Tensor]
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
        how = "params=None selects the parameters with requires_grad=True"
    elif isinstance(params, Mapping):
        selected = {}
        for name, value in params.items():
            _check_name(name, named)
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"params[{name!r}] must be a torch.Tensor, got {type(value).__name__}."
                )
            if value.shape != named[name].shape:
                raise ValueError(
                    f"params[{name!r}] has shape {tuple(value.shape)} but the model's parameter "
                    f"has shape {tuple(named[name].shape)}; pass a tensor of the same shape."
                )
            selected[name] = value
        how = "the params dict is empty"
    elif isinstance(params, (list, tuple)):
        selected = {}
        for name in params:
            if not isinstance(name, str):
                raise TypeError(
                    f"params given as a sequence must hold parameter names (str), got "
                    f"{type(name).__name__} {name!r}."
                )
            _check_name(name, named)
            selected[name] = named[name]
        how = "the list of names is empty"
    elif callable(params):
        selected = {n: p for n, p in named.items() if params(n, p)}
        how = "the predicate rejected every parameter"
    else:
        raise TypeError(
            "params must be None, a dict name -> tensor, a list of names or a predicate "
            f"(name, tensor) -> bool, got {type(params).__name__}."
        )
    if not selected:
        raise ValueError(
            f"no parameters selected ({how}); model has parameters {list(named)[:8]}"
            f"{'...' if len(named) > 8 else ''}. Select at least one, e.g. params=None with "
            "requires_grad=True parameters, or a list of names."
        )
    _check_uniform(selected)
    return selected


def _check_name(name: str, named: Mapping[str, Tensor]) -> None:
    if name not in named:
        close = [n for n in named if n.split(".")[-1] == str(name).split(".")[-1]][:5]
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(
            f"params names {name!r}, which is not a parameter of the model (names are those of "
            f"model.named_parameters(), e.g. {list(named)[:5]}).{hint}"
        )


def _check_uniform(selected: Mapping[str, Tensor]) -> None:
    devices = {t.device for t in selected.values()}
    if len(devices) > 1:
        where = {n: str(t.device) for n, t in selected.items()}
        raise ValueError(
            f"the selected parameters live on several devices {sorted(map(str, devices))} "
            f"({where}); move the model to one device with model.to(device), or select only "
            "parameters of one device."
        )
    for name, t in selected.items():
        if not torch.is_floating_point(t):
            raise TypeError(
                f"parameter {name!r} has dtype {t.dtype}; curvature needs floating-point "
                "parameters, so leave it out of params."
            )
    dtypes = {t.dtype for t in selected.values()}
    if len(dtypes) > 1:
        raise TypeError(
            f"the selected parameters have several dtypes {sorted(map(str, dtypes))}; convert "
            "the model with model.to(dtype) or select parameters of one dtype."
        )


def check_point(
    params: object,
    base: Mapping[str, Tensor],
    dtype: torch.dtype,
    device: torch.device,
    wider: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Return ``params`` if it is a point like ``base`` (same names, shapes, dtype, device).

    Entries of dtype ``wider`` (the float32 accumulation dtype of a bfloat16/float16 model)
    are accepted too, rounded to ``dtype``: the model can only be evaluated there.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> tensor, got {type(params).__name__}.")
    if set(params) != set(base):
        missing = sorted(set(base) - set(params))
        extra = sorted(set(params) - set(base))
        raise ValueError(
            f"params must have exactly the selected names; missing {missing}, unexpected "
            f"{extra}. Build it from objective.params, e.g. "
            "{n: p + eps[n] for n, p in objective.params.items()}."
        )
    out = {}
    for name, ref in base.items():
        t = params[name]
        if not isinstance(t, Tensor) or t.shape != ref.shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"params[{name!r}] must be a tensor of shape {tuple(ref.shape)}, got {shape}."
            )
        if wider is not None and t.dtype == wider and t.device == device:
            t = t.to(dtype)
        if t.dtype != dtype or t.device != device:
            raise ValueError(
                f"params[{name!r}] has dtype {t.dtype} on {t.device}, but the objective "
                f"works in {dtype} on {device}; convert it with "
                f".to({dtype}, '{device}')."
            )
        out[name] = t
    return out
