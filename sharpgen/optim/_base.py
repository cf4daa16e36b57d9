r"""The step state machine shared by the SAM family (`SAM`, `GSAM` and the variants).

A SAM-family step is: gradients at $w$; a perturbation $w \to w + \varepsilon$ (the
variant's `_perturb`, built on the kernel of `sharpgen.sharpness._sam_kernel`); gradients at
$w + \varepsilon$; exact restore of $w$; an optional combination of the two gradients (GSAM,
WSAM); the base optimizer's step. `SAMBase` owns that sequence, the two-call style, m-SAM
accumulation, the skips on non-finite gradients, the shared param groups and the state dict;
a variant writes `_perturb` and, where it needs them, the gradient hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpgen.optim._batchnorm import disable_running_stats
from sharpgen.optim._groups import (
    PerturbSelector,
    check_base_kwargs,
    check_base_optimizer,
    check_perturb,
    check_same_groups,
    select_parameters,
)
from sharpgen.optim._rng import replay_rng, rng_snapshot
from sharpgen.optim._state import (
    _ACCUMULATING,
    _IDLE,
    _NONFINITE,
    _PERTURBED,
    _RESTORED,
    _UNPERTURBED,
    SAMStepInfo,
)
from sharpgen.optim._state_checks import load_base_state
from sharpgen.sharpness._sam_kernel import check_norm

__all__ = ["SAMBase", "SAMStepInfo"]


class SAMBase(Optimizer):
    """Base class of the SAM family: the two-pass step around a base optimizer.

    Not used directly: `SAM` documents the contract every subclass keeps. A subclass calls
    `_init_common` and `_build` in its ``__init__`` and implements `_perturb`.
    """

    _norm: str
    _normalize: bool
    _selected: set[int] | None

    # -- construction -----------------------------------------------------------------------
    def _init_common(
        self,
        norm: str,
        normalize: bool,
        perturb: PerturbSelector,
        model: nn.Module | None,
        same_dropout: bool,
        base_optimizer: type[Optimizer] | Optimizer,
    ) -> None:
        self._norm = check_norm(norm)
        for name, value in (("normalize", normalize), ("same_dropout", same_dropout)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}.")
        if not normalize and self._norm != "l2":
            raise ValueError(
                f"normalize=False (unnormalized SAM) is only defined for norm='l2', got "
                f"norm={norm!r}."
            )
        self._normalize = normalize
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}.")
        self._model = model
        self._same_dropout = same_dropout
        self._perturb_spec = check_perturb(perturb, model)
        check_base_optimizer(base_optimizer, SAMBase)
        self._interval = 1  # SAM every `_interval` steps (SAM's and LookSAM's option)
        self._phase = _IDLE
        self._saved: dict[Tensor, Tensor] = {}
        self._acc: dict[Tensor, Tensor] = {}
        self._micro = 0
        self._any_perturbed = False
        self._nonfinite_reason: str | None = None
        self._pending: dict[str, Any] = {}
        self._last_info: SAMStepInfo | None = None
        self._base_ready = False

    def _build(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
    ) -> None:
        self._sam_defaults = dict(defaults)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"options {sorted(base_kwargs)} were given with a base optimizer instance; "
                    "pass them when building the instance, or pass its class instead."
                )
        else:
            check_base_kwargs(base_optimizer, base_kwargs, self._sam_option_names())
        super().__init__(params, dict(defaults))
        if isinstance(base_optimizer, Optimizer):
            check_same_groups(self.param_groups, base_optimizer.param_groups)
            for mine, theirs in zip(self.param_groups, base_optimizer.param_groups, strict=True):
                for key in defaults:
                    theirs[key] = mine[key]
                if "param_names" in mine and "param_names" not in theirs:
                    theirs["param_names"] = mine["param_names"]
            self.base_optimizer = base_optimizer
        else:
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, **defaults}
        self._base_ready = True
        self._after_groups_ready()
        self._build_selection()

    def _sam_option_names(self) -> tuple[str, ...]:
        """The variant's own options (named in the error on an unknown option)."""
        return ()

    def _after_groups_ready(self) -> None:
        """Hook for subclasses: the groups now carry the base optimizer's options."""

    def _check_group(self, group: dict[str, Any]) -> None:
        """Hook for subclasses: validate (and normalize) the variant's options of a group."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (to this optimizer and the base optimizer, which share them)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}.")
        self._check_group(param_group)
        if not self._base_ready:
            super().add_param_group(param_group)
            return
        for key, value in self._sam_defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)
        self._after_groups_ready()
        self._build_selection()

    def _build_selection(self) -> None:
        self._selected = select_parameters(self._perturb_spec, self._model, self.param_groups)

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
        perturbed = self._perturb(grad_scale)
        if zero_grad and perturbed:
            self.zero_grad()
        return perturbed

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (exactly) and form the final gradient; idempotent."""
        if self._phase != _PERTURBED:
            return
        params = list(self._saved)
        torch._foreach_copy_(params, [self._saved[p] for p in params])
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
        loss = self._two_passes(closure)
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
            self._acc = {}
            self._micro = 0
        loss = self._two_passes(closure)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p in self._acc:
                        self._acc[p].add_(p.grad)
                    else:
                        self._acc[p] = p.grad.detach().clone()
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
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from `state_dict` (or from the base optimizer alone)."""
        if self._phase in (_PERTURBED, _ACCUMULATING):
            raise RuntimeError("load_state_dict() called in the middle of a SAM step.")
        owner, options = type(self).__name__, self._sam_defaults
        load_base_state(self.base_optimizer, state_dict, sam_options=options, owner=owner)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key, value in self._sam_defaults.items():
                group.setdefault(key, value)
            self._check_group(group)
        self._after_groups_ready()
        self._reset()
        self._build_selection()

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

    def _save_first_gradient(self, params: list[Tensor]) -> None:
        """Hook for GSAM: the gradient at $w$ is needed after the second pass."""

    def _discard_first_gradient(self) -> None:
        """Hook for GSAM."""

    def _also_finite(self) -> list[Tensor]:
        """Hook: tensors besides ``.grad`` that must be finite for the step (WSAM's)."""
        return []

    def _after_step(self, stepped: bool) -> None:
        """Hook for variants with a step counter or a decoupled update after the base step."""

    def _combine_gradients(self) -> None:
        """Hook for GSAM: form the final gradient in ``.grad`` after restoring $w$."""

    def _is_selected(self, p: Tensor) -> bool:
        return self._selected is None or id(p) in self._selected

    # -- the first half, for the variants' _perturb -----------------------------------------
    def _perturb(self, grad_scale: float | None) -> bool:
        """Perturb the weights from ``.grad``; return whether it did (the variant's maths)."""
        raise NotImplementedError

    def _two_passes(self, closure: Callable[[], Any]) -> Any:
        snapshot = rng_snapshot(self.param_groups) if self._same_dropout else None
        with torch.enable_grad():
            loss = closure()
        if self._perturb(None):
            replay = replay_rng(snapshot) if snapshot is not None else nullcontext()
            model = self._model
            frozen = disable_running_stats(model) if model is not None else nullcontext()
            self._perturbed_pass(closure, replay, frozen)
        return loss

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
                params = list(self._saved)
                torch._foreach_copy_(params, [self._saved[p] for p in params])
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
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            grads += self._also_finite()
            finite = True
            if grads:
                norms = torch._foreach_norm(grads)
                device = norms[0].device
                finite = bool(torch.isfinite(torch.stack([n.to(device) for n in norms])).all())
            if not finite:
                reason = "non-finite gradient at w + eps"
            else:
                self.base_optimizer.step()
                stepped = True
        self._after_step(stepped)
        self._last_info = SAMStepInfo(
            perturbed=self._any_perturbed,
            stepped=stepped,
            grad_norm=self._pending.get("grad_norm"),
            reason=reason,
            micro_batches=micro,
        )
        self._reset()
