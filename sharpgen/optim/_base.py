r"""The step state machine shared by the SAM family (`SAM`, `GSAM` and the variants).

A SAM-family step is: gradients at $w$; a perturbation $w \to w + \varepsilon$ (the
variant's `_perturb`, built on the kernel of `sharpgen.sharpness._sam_kernel`); gradients at
$w + \varepsilon$; exact restore of $w$; an optional combination of the two gradients (GSAM,
WSAM); the base optimizer's step. `SAMBase` owns that sequence, the two-call style, m-SAM
accumulation, the skips on non-finite gradients and the state dict (its construction half,
the shared param groups and the parameter selection, is `SAMSetup` in ``_setup.py``).

A variant writes `_perturb` (usually from the building blocks `_accept_norm`,
`_save_weights` and `_mark_perturbed`) and overrides only the hooks it needs:

| hook | default | overridden by |
|---|---|---|
| `_first_pass(closure)` | the closure at $w$ | BSAM (at $w + e$), ESAM (per-sample losses) |
| `_second_closure(closure)` | the closure | ESAM (the sharpest samples only) |
| ``_keeps_first_gradient`` | ``False`` | GSAM, WSAM, LookSAM (``self._g0``) |
| `_combine_gradients()` | nothing | GSAM, WSAM (from `_both_gradients`), LookSAM |
| `_also_finite()` | ``[]`` | WSAM, BSAM |
| `_after_step(stepped)` | nothing | SAM (``interval``), LookSAM, WSAM, BSAM |
| ``_generator_key`` | ``None`` | BSAM, ESAM (the generator's state in the state dict) |
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from sharpgen.optim._batchnorm import disable_running_stats
from sharpgen.optim._rng import replay_rng, rng_snapshot
from sharpgen.optim._setup import SAMSetup
from sharpgen.optim._state import (
    _ACCUMULATING,
    _IDLE,
    _NONFINITE,
    _PERTURBED,
    _RESTORED,
    _UNPERTURBED,
    SAMStepInfo,
    all_finite,
    copy_back,
)
from sharpgen.optim._state_checks import load_base_state

__all__ = ["SAMBase", "SAMStepInfo"]


class SAMBase(SAMSetup):
    """Base class of the SAM family: the two-pass step around a base optimizer.

    Not used directly: `SAM` documents the contract every subclass keeps. A subclass calls
    `_init_common` and `_build` in its ``__init__`` and implements `_perturb` (see the hooks
    in the module docstring).
    """

    # GSAM, WSAM and LookSAM need the gradient at w after the second pass (kept in `_g0`)
    _keeps_first_gradient = False

    # -- public API -------------------------------------------------------------------------
    @property
    def last_step_info(self) -> SAMStepInfo | None:
        """What the last completed step did (`SAMStepInfo`), ``None`` before the first."""
        return self._last_info

    @property
    def perturbed(self) -> bool:
        r"""``True`` while the weights are at $w + \varepsilon$ (between the two passes)."""
        return self._phase == _PERTURBED

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scale: float | None = None) -> bool:
        """Perturb the weights in place, from the gradients in ``.grad`` (computed at $w$).

        Saves a copy of every perturbed parameter. When the gradient norm is zero or ``rho``
        is zero, nothing is perturbed and the current gradients are the final ones; when a
        gradient is NaN/Inf nothing is perturbed and the coming base step will be skipped.

        Args:
            zero_grad: Clear the gradients afterwards (only when it perturbed: otherwise the
                gradients are kept, they are the final gradient or the evidence of overflow).
            grad_scale: The factor the gradients carry (``scaler.get_scale()`` with
                `torch.amp.GradScaler`); only USAM (``normalize=False``) depends on it.

        Returns:
            Whether the weights were perturbed (then run the second forward/backward pass).

        Raises:
            RuntimeError: the weights are already perturbed, or `accumulate` is in progress.
        """
        if self._phase in (_PERTURBED, _ACCUMULATING):
            raise RuntimeError(
                f"first_step() called while a SAM step is in progress (state {self._phase!r}); "
                "finish it with second_step() (or step()) first."
            )
        self._reset()
        self._mark_rng()
        perturbed = self._perturb(grad_scale)
        if zero_grad and perturbed:
            self.zero_grad()
        return perturbed

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (exactly) and form the final gradient; idempotent."""
        if self._phase != _PERTURBED:
            return
        copy_back(self._saved)
        self._saved = {}
        self._phase = _RESTORED
        self._combine_gradients()

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights and take the base optimizer's step (``step()`` without closure).

        Args:
            zero_grad: Clear the gradients afterwards.

        Raises:
            ValueError: `first_step` (or `accumulate`) was not called before.
        """
        self.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Two-pass SAM step with a closure, or the second half of the two-call style.

        Args:
            closure: Clears the gradients, runs forward and backward, returns the loss. Without
                it, completes a step started by `first_step` or `accumulate`.

        Returns:
            The closure's loss at the unperturbed weights (``None`` without a closure).

        Raises:
            ValueError: no closure and no step in progress.
            RuntimeError: a closure while a two-call step is in progress.
        """
        if closure is None:
            if self._phase == _IDLE:
                raise ValueError(
                    f"{type(self).__name__}.step() needs a closure that clears the gradients, "
                    "runs forward and backward and returns the loss (step(closure)); without "
                    "one, call first_step() and the second backward pass before step()."
                )
            self._finish()
            return None
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}.")
        if self._phase not in (_IDLE, _UNPERTURBED, _NONFINITE, _RESTORED):
            raise RuntimeError(
                f"step(closure) called while a two-call step is in progress (state "
                f"{self._phase!r}); finish it with step() or second_step() first."
            )
        self._reset()
        self._mark_rng()
        try:
            loss = self._two_passes(closure)
        except BaseException:
            self._rewind_rng()  # an aborted step draws again what it drew
            raise
        self._finish()
        return loss

    def accumulate(self, closure: Callable[[], Any]) -> Any:
        r"""One micro-batch of m-SAM: both passes with this micro-batch's own perturbation.

        The final gradient of the micro-batch (at $w + \varepsilon_i$, with $\varepsilon_i$
        from the micro-batch's own gradient) is added to a buffer; ``step()`` (no closure) then
        takes the base step on the sum. The closure is the one of `step` (it may clear the
        gradients; the buffer is separate). Scale the micro-batch losses by ``1/k`` for a mean.

        Args:
            closure: Clears the gradients, forward and backward on one micro-batch, returns
                the loss.

        Returns:
            The closure's loss at the unperturbed weights.
        """
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}.")
        if self._phase == _PERTURBED:
            raise RuntimeError(
                "accumulate() called while the weights are perturbed; finish the two-call "
                "step with second_step() first."
            )
        if self._phase != _ACCUMULATING:
            self._reset()
            self._mark_rng()
            self._acc = {}
            self._micro = 0
        loss = self._two_passes(closure)
        with torch.no_grad():
            for p, grad in zip(*self._params_with_grad(), strict=True):
                if p in self._acc:
                    self._acc[p].add_(grad)
                else:
                    self._acc[p] = grad.detach().clone()
        self._micro += 1
        self._phase = _ACCUMULATING
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (shared with the base optimizer)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; its param groups carry the SAM options.

        Raises:
            RuntimeError: called while the weights are perturbed or micro-batches are pending.
        """
        if self._phase in (_PERTURBED, _ACCUMULATING):
            raise RuntimeError(
                "state_dict() called in the middle of a SAM step (weights perturbed or "
                "micro-batches accumulated); finish the step first."
            )
        out = self.base_optimizer.state_dict()
        if self._generator_key is not None:
            out[self._generator_key] = self._generator.get_state()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from `state_dict` (or from the base optimizer alone).

        Raises:
            RuntimeError: called in the middle of a SAM step.
            TypeError, ValueError: a param group carries an invalid SAM option (e.g.
                ``rho=-1``) or the state belongs to another base optimizer; raised before
                anything is loaded.
        """
        if self._phase in (_PERTURBED, _ACCUMULATING):
            raise RuntimeError("load_state_dict() called in the middle of a SAM step.")
        gen_key = self._generator_key
        owner, options = type(self).__name__, self._sam_defaults
        self._check_loaded_groups(state_dict)
        rest = {k: v for k, v in state_dict.items() if k != gen_key}
        load_base_state(self.base_optimizer, rest, sam_options=options, owner=owner)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key, value in self._sam_defaults.items():
                group.setdefault(key, value)
            self._check_group(group)
        self._after_groups_ready()
        self._reset()
        self._build_selection()
        if gen_key is not None and gen_key in state_dict:
            self._generator.set_state(state_dict[gen_key])

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups; keep everything (the base
        # optimizer shares param_groups and state with this object)
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={self.param_groups[0].get(k)!r}" for k in self._sam_defaults)
        return (
            f"{type(self).__name__}({type(self.base_optimizer).__name__}, {opts}, "
            f"norm={self._norm!r}, normalize={self._normalize})"
        )

    # -- internals --------------------------------------------------------------------------
    def _reset(self) -> None:
        self._phase = _IDLE
        self._saved = {}
        self._acc = {}
        self._micro = 0
        self._any_perturbed = False
        self._nonfinite_reason = None
        self._pending = {}
        self._discard_first_gradient()

    def _group_rho(self, group: dict[str, Any]) -> float:
        return group["rho"]

    def _params_with_grad(self) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters that have a gradient and their gradients, in group order."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    def _save_first_gradient(self, params: list[Tensor]) -> None:
        """Keep the gradient at $w$ in ``_g0`` when the variant needs it after the second pass."""
        if self._keeps_first_gradient:
            self._g0 = {p: p.grad.detach().clone() for p in params if p.grad is not None}

    def _discard_first_gradient(self) -> None:
        """Drop what `_save_first_gradient` kept (at the start and the end of every step)."""
        self._g0 = {}

    def _both_gradients(self) -> list[tuple[dict[str, Any], Tensor, Tensor, Tensor]]:
        r"""``(group, p, g, g_eps)``: the gradients at $w$ and $w + \varepsilon$, consumed.

        Every parameter with a gradient in either pass, a missing one counting as zero (a
        missing ``.grad`` is set to that zero tensor); empty when no first gradient was kept.
        """
        g0, self._g0 = self._g0, {}
        if not g0:
            return []
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if p not in g0 and p.grad is None:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(g0[p])
                g = g0[p] if p in g0 else torch.zeros_like(p.grad)
                out.append((group, p, g, p.grad))
        return out

    def _also_finite(self) -> list[Tensor]:
        """Hook: tensors besides ``.grad`` that must be finite for the step (WSAM's)."""
        return []

    def _after_step(self, stepped: bool) -> None:
        """Hook for variants with a step counter or a decoupled update after the base step."""

    def _combine_gradients(self) -> None:
        """Hook for GSAM: form the final gradient in ``.grad`` after restoring $w$."""

    # -- the first half, for the variants' _perturb -----------------------------------------
    def _perturb(self, grad_scale: float | None) -> bool:
        """Perturb the weights from ``.grad``; return whether it did (the variant's maths)."""
        raise NotImplementedError

    def _accept_norm(
        self,
        total: Tensor,
        grad_scale: float | None = None,
        *,
        zero: str = "zero gradient norm",
        nonfinite: str = "non-finite gradient at w",
    ) -> bool:
        """Host synchronization on the norm: perturb unless it is zero or not finite.

        ``zero`` and ``nonfinite`` are the reasons reported in `last_step_info`.
        """
        total_f = float(total)
        shown = total_f / grad_scale if grad_scale is not None else total_f
        self._pending = {"grad_norm": shown, "reason": None}
        if not math.isfinite(total_f):
            self._pending["reason"] = self._nonfinite_reason = nonfinite
            self._phase = _NONFINITE
            return False
        if shown == 0.0:
            self._pending["reason"] = zero
            self._phase = _UNPERTURBED
            return False
        return True

    def _skip_perturbation(self, reason: str) -> bool:
        """No perturbation this step: ``.grad`` is the final gradient."""
        self._pending = {"grad_norm": None, "reason": reason}
        self._phase = _UNPERTURBED
        return False

    def _save_weights(self, params: list[Tensor]) -> None:
        for p in params:
            self._saved[p] = p.detach().clone()

    def _mark_perturbed(self) -> bool:
        self._phase = _PERTURBED
        self._any_perturbed = True
        return True

    # -- the two passes -----------------------------------------------------------------------
    def _two_passes(self, closure: Callable[[], Any]) -> Any:
        snapshot = rng_snapshot(self.param_groups) if self._same_dropout else None
        loss = self._first_pass(closure)
        if self._perturb(None):
            replay = replay_rng(snapshot) if snapshot is not None else nullcontext()
            self._perturbed_pass(self._second_closure(closure), replay, self._frozen_stats())
        return loss

    def _first_pass(self, closure: Callable[[], Any]) -> Any:
        """Hook: the pass at $w$ that leaves the gradients in ``.grad``; returns the loss."""
        with torch.enable_grad():
            return closure()

    def _second_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        r"""Hook: what runs at $w + \varepsilon$ (the closure itself by default)."""
        return closure

    def _frozen_stats(self) -> AbstractContextManager[Any]:
        """BatchNorm running statistics frozen (when the model was given)."""
        model = self._model
        return disable_running_stats(model) if model is not None else nullcontext()

    def _perturbed_pass(self, closure: Callable[[], Any], *contexts: Any) -> Any:
        r"""Run the closure at $w + \varepsilon$; restore $w$ afterwards (also on an exception)."""
        try:
            with contextlib.ExitStack() as stack:
                for context in contexts:
                    stack.enter_context(context)
                stack.enter_context(torch.enable_grad())
                loss = closure()
        except BaseException:
            with torch.no_grad():
                copy_back(self._saved)
            self._reset()
            raise
        self.restore()
        return loss

    def _finish(self) -> None:
        if self._phase == _PERTURBED:
            self.restore()
        micro = 1
        if self._phase == _ACCUMULATING:
            micro = self._micro
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = self._acc.get(p)
            self._acc = {}
        reason = self._pending.get("reason")
        stepped = False
        if self._nonfinite_reason is not None:
            reason = self._nonfinite_reason
        else:
            grads = self._params_with_grad()[1] + self._also_finite()
            if not all_finite(grads):
                reason = "non-finite gradient at w + eps"
            else:
                self.base_optimizer.step()
                stepped = True
        if not stepped:
            self._rewind_rng()  # a skipped step is retried with the same random numbers
        self._after_step(stepped)
        self._last_info = SAMStepInfo(
            perturbed=self._any_perturbed,
            stepped=stepped,
            grad_norm=self._pending.get("grad_norm"),
            reason=reason,
            micro_batches=micro,
        )
        self._reset()
