r"""Scaled-dot-product attention through a twice-differentiable path during curvature work.

`torch.nn.functional.scaled_dot_product_attention` (behind every Hugging Face transformer's
default ``"sdpa"`` attention, `torch.nn.MultiheadAttention` with ``need_weights=False`` and
`torch.nn.TransformerEncoderLayer`) picks a fused kernel: flash attention on the CPU, flash,
memory-efficient or cuDNN attention on CUDA. Their backward passes have no derivative of
their own (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented``) and no forward-mode derivative, so every Hessian or GGN product through them
fails. The *math* backend computes the same function from differentiable torch operations,

.. math::

    \operatorname{attn}(Q, K, V) = \operatorname{softmax}\!\Big(\frac{Q K^\top}{\sqrt{d}}
    + M\Big) V,

so double backward, ``torch.func.jvp`` and ``torch.func.vmap`` all go through it. The
`torch.nn.MultiheadAttention` / `torch.nn.TransformerEncoderLayer` *fast path*
(``torch._native_multi_head_attention``, taken when no input requires grad, e.g. under
``torch.func.jvp``) has no forward-mode derivative either and is switched off the same way.

`twice_differentiable_attention` enables only the math backend and switches the fast path
off; on exit (also after an exception) the caller's settings -- the flash, memory-efficient,
math, cuDNN and overrideable SDPA flags (whatever ``torch.nn.attention.sdpa_kernel`` context
the caller is in) and ``torch.backends.mha.get_fastpath_enabled()`` -- are exactly as before.
The flags are process-wide and device-agnostic: the same context covers CPU and CUDA.

`ModelObjective` enters `objective_attention` around every evaluation of the model: the
math path unless the evaluation is marked first-order by `first_order_attention` (the
objective's loss and gradient, which keep the fused kernels: nothing differentiates them
twice).

**Cost.** The math path materializes the attention matrix: per attention call
$B \cdot h \cdot s_q \cdot s_k$ scores and as many probabilities (batch $B$, $h$ heads,
query/key lengths $s_q, s_k$), kept for the backward pass, where flash attention keeps
$O(B \cdot h \cdot s_q)$. ``benchmarks/bench_attention.py`` measures it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType

import torch

__all__ = [
    "first_order_attention",
    "objective_attention",
    "sdpa_settings",
    "twice_differentiable_attention",
]

#: The SDPA backend flags torch keeps process-wide, as (name, getter, setter): the same
#: ``torch._C`` switches ``torch.nn.attention.sdpa_kernel`` and ``torch.backends.cuda``'s
#: ``enable_*_sdp`` use (flash, memory-efficient, math, cuDNN and overrideable backends).
_FLAGS: tuple[tuple[str, Callable[[], bool], Callable[[bool], None]], ...] = tuple(
    (name, getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"))
    for name in ("flash", "mem_efficient", "math", "cudnn", "overrideable")
    if hasattr(torch._C, f"_get_{name}_sdp_enabled")
)

#: Whether the model evaluations now running are first-order only (fused kernels allowed).
_FIRST_ORDER: ContextVar[bool] = ContextVar("sharpgen_first_order_attention", default=False)


def sdpa_settings() -> dict[str, bool]:
    """The process-wide attention settings this module changes and restores.

    Returns:
        ``{"flash": ..., "mem_efficient": ..., "math": ..., "cudnn": ..., "overrideable": ...,
        "mha_fastpath": ...}``: whether each scaled-dot-product-attention backend is enabled
        (``torch.backends.cuda.flash_sdp_enabled()`` and its siblings) and whether the
        `torch.nn.MultiheadAttention` fast path is (``torch.backends.mha``).
    """
    out = {name: bool(get()) for name, get, _ in _FLAGS}
    out["mha_fastpath"] = torch.backends.mha.get_fastpath_enabled()
    return out


class _MathAttention:
    """The context of `twice_differentiable_attention` (a class: entered at every forward)."""

    __slots__ = ("_saved",)

    def __enter__(self) -> None:
        self._saved = ([get() for _, get, _ in _FLAGS], torch.backends.mha.get_fastpath_enabled())
        try:
            for name, _, put in _FLAGS:
                put(name == "math")
            torch.backends.mha.set_fastpath_enabled(False)
        except BaseException:
            self._restore()
            raise

    def _restore(self) -> None:
        flags, fastpath = self._saved
        for (_, _, put), value in zip(_FLAGS, flags, strict=True):
            put(value)
        torch.backends.mha.set_fastpath_enabled(fastpath)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()


def twice_differentiable_attention() -> _MathAttention:
    r"""Context: attention runs through the twice-differentiable math path.

    Inside, `torch.nn.functional.scaled_dot_product_attention` may use only the math backend
    (as in ``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])``) and the
    `torch.nn.MultiheadAttention` / `torch.nn.TransformerEncoderLayer` fast path is off, so
    attention has a second derivative (double backward), a forward-mode derivative
    (``torch.func.jvp``) and batching rules (``torch.func.vmap``), on CPU and CUDA alike.
    On exit, also after an exception, every SDPA backend flag and the fast-path flag are
    what they were (see `sdpa_settings`); contexts nest. Curvature measures enter it by
    themselves; use it around your own ``torch.func`` or double-backward code on attention
    models.

    Cost: the math path holds the $B \cdot h \cdot s_q \cdot s_k$ attention probabilities
    of every attention call for the backward pass (batch $B$, $h$ heads, sequence lengths
    $s_q, s_k$), which the fused kernels do not.

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        >>> x = torch.randn(2, 3, 4)
        >>> w = dict(layer.named_parameters())
        >>> f = lambda q: torch.func.functional_call(layer, q, (x,)).square().sum()
        >>> tangent = {n: torch.ones_like(t) for n, t in w.items()}
        >>> with twice_differentiable_attention():
        ...     hv = torch.func.vjp(torch.func.grad(f), w)[1](tangent)[0]
        >>> torch.backends.mha.get_fastpath_enabled()  # the caller's setting, back
        True
    """
    return _MathAttention()


@contextmanager
def first_order_attention() -> Iterator[None]:
    """Context: the objective's model evaluations inside keep the fused attention kernels.

    For work that differentiates the model at most once by reverse mode (the loss, the
    gradient): there flash and memory-efficient attention are exact and faster.
    """
    token = _FIRST_ORDER.set(True)
    try:
        yield
    finally:
        _FIRST_ORDER.reset(token)


class _Nothing:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NOTHING = _Nothing()


def objective_attention() -> _MathAttention | _Nothing:
    """The context around one model evaluation of `ModelObjective` (the one hook).

    The math path (`twice_differentiable_attention`) unless inside `first_order_attention`.
    """
    return _NOTHING if _FIRST_ORDER.get() else _MathAttention()
