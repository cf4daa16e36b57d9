"""The model-state contract: exact restore, and the BatchNorm / dropout policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.dropout import _DropoutNd

__all__ = [
    "VALID_BN",
    "apply_state_policy",
    "check_policy",
    "model_state_policy",
    "preserve_model_state",
]

VALID_BN = ("eval", "batch")


@dataclass
class _Slot:
    """One tensor slot ``module._parameters[name]`` or ``module._buffers[name]``."""

    table: dict[str, Any]
    name: str
    obj: Tensor | None
    value: Tensor | None
    version: int
    requires_grad: bool
    grad_obj: Tensor | None
    grad_value: Tensor | None
    grad_version: int


def _snapshot_slot(table: dict[str, Any], name: str, copy_values: bool, is_param: bool) -> _Slot:
    obj = table[name]
    if obj is None:
        return _Slot(table, name, None, None, 0, False, None, None, 0)
    value = obj.detach().clone() if (copy_values or not is_param) else None
    grad = obj.grad if is_param else None
    grad_value = grad.detach().clone() if (grad is not None and copy_values) else None
    grad_version = grad._version if grad is not None else 0
    return _Slot(
        table, name, obj, value, obj._version, obj.requires_grad, grad, grad_value, grad_version
    )


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values (NaN equal to NaN)."""
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(torch.isclose(a, b, 0.0, 0.0, equal_nan=True).all())


def _put_back(dst: Tensor, value: Tensor, version: int) -> None:
    """Copy ``value`` into ``dst`` only if ``dst`` was written since the snapshot.

    A tensor whose autograd version counter has not moved and whose values are unchanged is
    left alone, so its version counter stays where it was and a graph that saved it still
    backpropagates. (Values are compared too: a write through ``.data`` does not move the
    counter.)
    """
    if dst._version == version and _same(dst, value):
        return
    with torch.no_grad():
        dst.copy_(value)


def _restore_slot(slot: _Slot) -> None:
    slot.table[slot.name] = slot.obj
    obj = slot.obj
    if obj is None:
        return
    if slot.value is not None:
        _put_back(obj, slot.value, slot.version)
    if obj.requires_grad != slot.requires_grad:
        obj.requires_grad_(slot.requires_grad)
    if isinstance(obj, nn.Parameter) or slot.grad_obj is not None or obj.grad is not None:
        if slot.grad_obj is not None and slot.grad_value is not None:
            _put_back(slot.grad_obj, slot.grad_value, slot.grad_version)
        if obj.grad is not slot.grad_obj:
            obj.grad = slot.grad_obj


@contextmanager
def preserve_model_state(model: nn.Module, *, copy_values: bool = True) -> Iterator[nn.Module]:
    """Snapshot the state of ``model`` and restore it exactly on exit, also on exceptions.

    Restored, in place (``copy_`` into the original tensor objects, which are also put back
    into their modules if something replaced them; no ``.data`` rebinding). Only tensors
    that were written are copied back: a tensor whose values did not change keeps its
    autograd version counter, so a graph built before the block still backpropagates
    after it (for example a BatchNorm's running statistics in eval mode):

    * parameter values, ``requires_grad`` flags and ``.grad`` (including whether it is
      ``None``; the original gradient tensor objects are kept);
    * every buffer (BatchNorm running statistics, ``num_batches_tracked``, ...);
    * every submodule's ``training`` flag and the ``track_running_stats`` flag of
      normalization layers.

    Args:
        model: The module to protect.
        copy_values: If ``False``, parameter values and gradient values are not copied
            (only which tensor objects they are, ``requires_grad`` and ``None``-ness of
            ``.grad`` are restored). Use it only around code that provably never writes to
            parameters or gradients, such as the functional evaluation of
            `ModelObjective`; it saves one copy of the parameters. Buffers are always
            copied.

    Yields:
        ``model`` itself.

    Examples:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with preserve_model_state(bn):
        ...     _ = bn(torch.randn(4, 2))  # updates the running statistics in train mode
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([0.0, 0.0], 0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    slots: list[_Slot] = []
    flags: list[tuple[nn.Module, bool, Any]] = []
    for module in model.modules():
        track = module.track_running_stats if isinstance(module, _NormBase) else None
        flags.append((module, module.training, track))
        for name in list(module._parameters):
            slots.append(_snapshot_slot(module._parameters, name, copy_values, True))
        for name in list(module._buffers):
            slots.append(_snapshot_slot(module._buffers, name, copy_values, False))
    try:
        yield model
    finally:
        for module, training, track in flags:
            module.training = training
            if track is not None:
                module.track_running_stats = track
        for slot in slots:
            _restore_slot(slot)


def check_policy(bn: Any, dropout: Any) -> None:
    """Validate the ``bn`` and ``dropout`` arguments (raise ``ValueError``/``TypeError``)."""
    if bn not in VALID_BN:
        raise ValueError(
            f"bn must be one of {VALID_BN} ('eval': BatchNorm uses its running statistics; "
            f"'batch': BatchNorm uses batch statistics, running buffers untouched), got {bn!r}."
        )
    if not isinstance(dropout, bool):
        raise TypeError(
            f"dropout must be a bool (False: dropout off; True: dropout active, results "
            f"random), got {dropout!r}."
        )


def apply_state_policy(model: nn.Module, *, bn: str = "eval", dropout: bool = False) -> None:
    """Put ``model`` into the evaluation state used for curvature (mutates flags only).

    The whole model is put into ``eval()`` mode; then

    * ``bn="batch"``: every BatchNorm layer is switched to ``training=True`` with
      ``track_running_stats=False``, so it normalizes with the statistics of the current
      batch and never touches ``running_mean``, ``running_var`` or ``num_batches_tracked``;
    * ``dropout=True``: every dropout layer is switched back to ``training=True``.

    Call it inside `preserve_model_state` (or use `model_state_policy`), which undoes it.
    """
    check_policy(bn, dropout)
    model.eval()
    for module in model.modules():
        if bn == "batch" and isinstance(module, _BatchNorm):
            module.training = True
            module.track_running_stats = False
        if dropout and isinstance(module, _DropoutNd):
            module.training = True


@contextmanager
def model_state_policy(
    model: nn.Module, *, bn: str = "eval", dropout: bool = False, copy_values: bool = True
) -> Iterator[nn.Module]:
    """Apply `apply_state_policy` inside `preserve_model_state`.

    Args:
        model: The module.
        bn: ``"eval"`` (BatchNorm uses running statistics) or ``"batch"`` (batch
            statistics, running buffers untouched).
        dropout: ``False`` (default) switches dropout off; ``True`` keeps it active, so
            every evaluation is random.
        copy_values: Forwarded to `preserve_model_state`.

    Yields:
        ``model``, in the policy's state; on exit everything is restored.

    Raises:
        ValueError: For an unknown ``bn``.
        TypeError: For a non-bool ``dropout``.
    """
    check_policy(bn, dropout)
    with preserve_model_state(model, copy_values=copy_values):
        apply_state_policy(model, bn=bn, dropout=dropout)
        yield model
