r"""Low-precision models: what is computed in the model's dtype, what is accumulated wider.

A model whose parameters are ``bfloat16`` or ``float16`` (or a ``float32`` model evaluated
under `torch.autocast`) computes its forward and backward passes, and so every
curvature-vector product, in that precision. Everything sharpgen adds up is kept wider:
dataset sums over batches, the loss, the gradient, the product buffers, Lanczos vectors,
basis and Gram-Schmidt, probe blocks and Hutchinson sums are float32 (`accumulation_dtype`),
and sharpgen's own linear algebra never runs under an autocast context (`full_precision`),
whatever context the caller wrapped the call in.

The error of a product then comes from the model's own rounding only: with unit roundoff
$u$ of the model's dtype ($u = 2^{-8}$ for bfloat16, $2^{-11}$ for float16) a product
$\widehat{Hv} = Hv + e$ has $\|e\| \lesssim c\,u\,\|H\|\,\|v\|$ with $c$ growing with the
depth of the network, while sums of $N$ terms carry float32's $N\,2^{-24}$ instead of
bfloat16's $N\,2^{-8}$ (see the guide page *Low precision*).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, ParamSpec, TypeVar

import torch
from torch.utils._pytree import tree_map_only

__all__ = [
    "LOW_PRECISION",
    "accumulation_dtype",
    "check_autocast",
    "full_precision",
    "full_precision_fn",
    "refuse_missing_kernel",
    "upcast_outputs",
    "unit_roundoff",
]

#: Parameter (or autocast) dtypes whose sums sharpgen accumulates in float32.
LOW_PRECISION = (torch.bfloat16, torch.float16)
#: Device types whose autocast state `full_precision` switches off (where enabled).
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")

P = ParamSpec("P")
R = TypeVar("R")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sharpgen accumulates in: float32 for bfloat16/float16, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def unit_roundoff(dtype: torch.dtype) -> float:
    r"""The unit roundoff $u = \epsilon / 2$ of a floating dtype ($2^{-8}$ for bfloat16)."""
    return torch.finfo(dtype).eps / 2


@contextmanager
def full_precision() -> Iterator[None]:
    """Context: every enabled autocast region switched off; the caller's state restored.

    Autocast contexts the caller entered (any device type) do not reach the tensors of
    this block; on exit, also by an exception, the caller's autocast state is back.
    """
    with ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if _enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:  # a device type this build of torch does not know
        return False


def full_precision_fn(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: ``fn`` runs inside `full_precision` (for the linear-algebra estimators)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with full_precision():
            return fn(*args, **kwargs)

    return wrapper


def upcast_outputs(outputs: Any) -> Any:
    """``outputs`` (a tensor or a pytree of them) with bfloat16/float16 tensors as float32.

    The loss of a low-precision model is computed from its outputs in float32: the loss is
    itself a sum over the batch, and a bfloat16 loss near 1 is rounded to $2^{-8}$, which a
    difference of two losses (SAM sharpness, a landscape) would see whole.
    """
    return tree_map_only(
        torch.Tensor, lambda t: t.float() if t.dtype in LOW_PRECISION else t, outputs
    )


#: Pieces of torch's messages for an operation without a kernel for a dtype.
_MISSING = ("not implemented for", "Low precision dtypes not supported", "Unsupported dtype")


def refuse_missing_kernel(
    err: RuntimeError, dtype: torch.dtype, autocast: torch.dtype | None, device: torch.device
) -> None:
    """Raise a `TypeError` with the fix if ``err`` is torch lacking a low-precision kernel.

    Does nothing for other errors and for a model computed in float32/float64.
    """
    low = autocast if autocast is not None else dtype
    if low not in LOW_PRECISION or not any(m in str(err) for m in _MISSING):
        return
    how = f"autocast={low}" if autocast is not None else f"model (parameters in {low})"
    fix = (
        "pass autocast=False"
        if autocast is not None
        else "convert the model with model.float() (or keep this layer in float32)"
    )
    raise TypeError(
        f"the {how} cannot be evaluated on {device.type}: torch has no {low} kernel for an "
        f"operation of the model ({err}); {fix}, or run it on a device with {low} kernels."
    ) from err


def check_autocast(autocast: Any, dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an objective's forward passes, or None (see `ModelObjective`).

    ``None`` follows the caller: the dtype of an autocast context enabled for the
    parameters' device type when the objective is built (float32 parameters only; autocast
    leaves other dtypes alone). ``False``: none. ``True``: torch's default for the device
    (bfloat16 on the CPU, float16 on CUDA). A dtype: that one.

    ``autocast`` itself is checked by `sharpgen.curvature._options.check_options`.

    Raises:
        ValueError: Parameters that are not float32, or a device type without autocast.
    """
    if autocast is None:
        on = _enabled(device.type) and dtype == torch.float32
        return torch.get_autocast_dtype(device.type) if on else None
    if autocast is False:
        return None
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(
            f"autocast={autocast!r}: torch has no autocast for device type {device.type!r} "
            "(the parameters' device); pass autocast=False, or convert the model with "
            "model.to(torch.bfloat16) to measure it in low precision."
        )
    target = torch.get_autocast_dtype(device.type) if autocast is True else autocast
    if dtype != torch.float32:
        raise ValueError(
            f"autocast={target} needs float32 parameters, but they are {dtype} (autocast only "
            "lowers float32 operations); pass autocast=False, or convert the model with "
            "model.float()."
        )
    return target
