r"""Sharpness-aware minimization (SAM) and its adaptive (ASAM) and unnormalized (USAM) variants.

One `torch.optim.Optimizer` wraps any base optimizer. A step is two forward/backward passes:

$$
g = \nabla L(w), \qquad
\varepsilon = \rho\,\frac{T_w^2 g}{\|T_w g\|_2}, \qquad
w \leftarrow \operatorname{base\_step}\bigl(w,\ \nabla L(w + \varepsilon)\bigr),
$$

with $T_w = I$ (SAM), $T_w = \operatorname{diag}(|w| + \eta)$ (ASAM), the $\ell_\infty$
variant $\varepsilon = \rho T_w \operatorname{sign}(g)$, or $\varepsilon = \rho T_w^2 g$
(USAM). See `sharpgen.sharpness.sam_perturbation` for the maths.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpgen.optim._batchnorm import disable_running_stats
from sharpgen.sharpness._perturbation import _check_eta, _check_norm, _check_rho

__all__ = ["SAM", "SAMStepInfo"]

PerturbSelector = Callable[[str | None, Tensor], bool] | type | tuple[type, ...] | None

_IDLE = "idle"  # no step in progress
_PERTURBED = "perturbed"  # weights are w + eps, waiting for the second pass
_RESTORED = "restored"  # weights restored, .grad holds the final gradient
_UNPERTURBED = "unperturbed"  # no perturbation (zero gradient / rho = 0): .grad is final
_NONFINITE = "nonfinite"  # non-finite gradient at w: the base step will be skipped
_ACCUMULATING = "accumulating"  # m-SAM micro-batches collected in a buffer


@dataclass(frozen=True)
class SAMStepInfo:
    r"""What the last SAM step did (`SAM.last_step_info`).

    Attributes:
        perturbed: The weights were perturbed for the second pass (in at least one micro-batch
            when accumulating).
        stepped: The base optimizer's step was taken (``False`` when a gradient was NaN/Inf).
        grad_norm: $\|T_w g\|_2$ at the unperturbed weights over the perturbed parameters
            (of the last micro-batch), divided by ``grad_scale``; ``None`` when no perturbed
            parameter had a gradient.
        reason: Why the perturbation or the step was skipped, else ``None``.
        micro_batches: Number of (first pass, second pass) pairs that went into the step.
    """

    perturbed: bool
    stepped: bool
    grad_norm: float | None
    reason: str | None
    micro_batches: int = 1


class SAM(Optimizer):
    r"""Sharpness-aware minimization around any base optimizer (SAM, ASAM, USAM, $\ell_\infty$).

    The update of one step, with $T_w$ the identity or, for ``adaptive=True`` (ASAM),
    $\operatorname{diag}(|w| + \eta)$:

    $$
    g = \nabla L(w), \quad
    \varepsilon = \begin{cases}
      \rho\, T_w^2 g / \|T_w g\|_2 & \text{SAM, ASAM} \\
      \rho\, T_w \operatorname{sign}(g) & \ell_\infty \\
      \rho\, T_w^2 g & \text{USAM}
    \end{cases}, \quad
    w \leftarrow \operatorname{base\_step}\bigl(w, \nabla L(w + \varepsilon)\bigr).
    $$

    The norm is global over the perturbed parameters (those selected by ``perturb`` that have
    a gradient, in groups with $\rho > 0$); ``rho``, ``adaptive`` and ``eta`` may differ per
    parameter group. The base step is taken at the *restored* weights $w$ (copied back from a
    saved copy, bit for bit), so weight decay of the base optimizer (coupled as in SGD, or
    decoupled as in AdamW) is applied at $w$, to the final gradient; it does not enter the
    perturbation (put a regularizer in the loss if it should).

    **Contract (the same for every variant).**

    * ``step(closure)``: the closure clears the gradients, runs forward and backward and
      returns the loss, as for `torch.optim.LBFGS`. SAM calls it at $w$, perturbs, calls it
      again at $w + \varepsilon$ (inside `disable_running_stats` when ``model`` is given, and
      with the random state of the first call when ``same_dropout=True``), restores $w$ and
      calls the base optimizer. It returns the loss of the first call. When no perturbation is
      made (``rho=0``, a zero gradient) the closure is called once and the step is exactly the
      base optimizer's.
    * Two-call style: ``backward at w``; `first_step` (returns whether it perturbed);
      ``backward at w + eps``; `second_step` (equivalently ``step()`` without a closure).
      `restore` may be called between the second backward and `second_step` (needed for
      `torch.amp.GradScaler`, see the guide).
    * m-SAM (one perturbation per micro-batch): `accumulate` per micro-batch, then ``step()``.
    * A NaN/Inf gradient at $w$ skips the perturbation; a NaN/Inf gradient in either pass
      skips the base step. Nothing becomes NaN; `last_step_info` says what happened.
    * `state_dict` is the base optimizer's state dict (its param groups carry the SAM
      options); nothing transient is saved, and a resumed run equals an uninterrupted one.

    Memory: one copy of the perturbed parameters while perturbed (plus one of the gradients
    for `GSAM`, and one accumulation buffer for `accumulate`). Two device synchronizations
    per step: the gradient norm at $w$ and the finiteness of the final gradient are checked on
    the host (that is what makes the skips possible).

    Args:
        params: Parameters, named parameters (``model.named_parameters()``, needed by a
            name-based ``perturb``) or parameter groups (dicts, which may set ``rho``,
            ``adaptive`` and ``eta`` per group, besides the base optimizer's options).
        base_optimizer: An optimizer class (built on the same param groups with
            ``base_kwargs``) or an instance built on the same parameters, in the same groups.
        rho: Radius $\rho \ge 0$ (``0`` reproduces the base optimizer).
        adaptive: ASAM scaling $T_w = \operatorname{diag}(|w| + \eta)$.
        eta: $\eta \ge 0$ of the ASAM scaling.
        normalize: ``False`` for unnormalized SAM (USAM), ``norm="l2"`` only.
        norm: ``"l2"`` or ``"linf"``.
        perturb: Which parameters are perturbed: ``None`` (all), a predicate
            ``(name, param) -> bool`` (``name`` is ``None`` unless named parameters or
            ``model`` were given) or module types such as ``(nn.BatchNorm2d, nn.LayerNorm)``
            (their direct parameters; requires ``model``). The others still receive the base
            step with the gradient at the perturbed point.
        model: The model, for module-type selection, parameter names and freezing running
            statistics in the second pass of ``step(closure)``.
        same_dropout: ``step(closure)`` replays the random state of the first pass in the
            second (same dropout masks); the global random state afterwards is the one after
            the first pass.
        **base_kwargs: Options of the base optimizer class (``lr``, ``momentum``, ...).

    Raises:
        ValueError: ``rho < 0``, ``eta < 0``, an unknown ``norm``, ``normalize=False`` with
            ``"linf"``, an instance whose param groups differ, a selection with no parameter.
        TypeError: an unknown option, ``base_kwargs`` with an instance, a bad ``perturb``.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import SAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> opt.last_step_info.perturbed, opt.last_step_info.stepped
        (True, True)

    References:
        Foret, Kleiner, Mobahi & Neyshabur (2021), *Sharpness-Aware Minimization for
        Efficiently Improving Generalization*, ICLR. Kwon et al. (2021), *ASAM*, ICML.
        Andriushchenko & Flammarion (2022), *Towards Understanding Sharpness-Aware
        Minimization*, ICML.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        normalize: bool = True,
        norm: str = "l2",
        perturb: PerturbSelector = None,
        model: nn.Module | None = None,
        same_dropout: bool = False,
        **base_kwargs: Any,
    ) -> None:
        self._init_common(norm, normalize, perturb, model, same_dropout, base_optimizer)
        defaults = {"rho": _check_rho(rho), "adaptive": adaptive, "eta": _check_eta(eta)}
        self._build(params, base_optimizer, defaults, base_kwargs)

    # -- construction -----------------------------------------------------------------------
    def _init_common(self, norm, normalize, perturb, model, same_dropout, base_optimizer) -> None:
        self._norm = _check_norm(norm)
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
        self._perturb_spec = _check_perturb(perturb, model)
        if isinstance(base_optimizer, type):
            if not issubclass(base_optimizer, Optimizer):
                raise TypeError(
                    f"base_optimizer must be a torch.optim.Optimizer subclass or instance, got "
                    f"the class {base_optimizer.__name__}."
                )
        elif not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
                f"or an instance, got {type(base_optimizer).__name__}."
            )
        if isinstance(base_optimizer, (SAM,)) or (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, SAM)
        ):
            raise TypeError("base_optimizer cannot itself be a SAM optimizer.")
        self._phase = _IDLE
        self._saved: dict[Tensor, Tensor] = {}
        self._acc: dict[Tensor, Tensor] = {}
        self._micro = 0
        self._any_perturbed = False
        self._nonfinite_reason: str | None = None
        self._pending: dict[str, Any] = {}
        self._last_info: SAMStepInfo | None = None
        self._base_ready = False

    def _build(self, params, base_optimizer, defaults: dict[str, Any], base_kwargs) -> None:
        self._sam_defaults = dict(defaults)
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"options {sorted(base_kwargs)} were given with a base optimizer instance; "
                    "pass them when building the instance, or pass its class instead."
                )
        else:
            _check_base_kwargs(base_optimizer, base_kwargs, self._sam_option_names())
        super().__init__(params, dict(defaults))
        if isinstance(base_optimizer, Optimizer):
            _check_same_groups(self.param_groups, base_optimizer.param_groups)
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
        return ("rho", "adaptive", "eta", "normalize", "norm", "perturb", "model", "same_dropout")

    def _after_groups_ready(self) -> None:
        """Hook for subclasses: the groups now carry the base optimizer's options."""

    def _check_group(self, group: dict[str, Any]) -> None:
        if "rho" in group:
            group["rho"] = _check_rho(group["rho"])
        if "eta" in group:
            group["eta"] = _check_eta(group["eta"])
        if "adaptive" in group and not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be a bool, got {group['adaptive']!r}.")

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
        spec = self._perturb_spec
        if spec is None:
            self._selected: set[int] | None = None
            return
        selected: set[int] = set()
        if isinstance(spec, tuple):  # module types
            assert self._model is not None
            for module in self._model.modules():
                if isinstance(module, spec):
                    selected.update(id(p) for p in module.parameters(recurse=False))
        else:
            model_names = (
                {id(p): n for n, p in self._model.named_parameters()} if self._model else {}
            )
            for group in self.param_groups:
                names = group.get("param_names")
                for i, p in enumerate(group["params"]):
                    name = names[i] if names is not None else model_names.get(id(p))
                    if spec(name, p):
                        selected.add(id(p))
        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        if not selected & optimized:
            raise ValueError(
                f"perturb={spec!r} selected none of the optimized parameters; check the "
                "predicate / module types (names are None unless named parameters or model= "
                "are given)."
            )
        self._selected = selected

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

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
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
        self.base_optimizer.load_state_dict(state_dict)
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

    def _combine_gradients(self) -> None:
        """Hook for GSAM: form the final gradient in ``.grad`` after restoring $w$."""

    def _is_selected(self, p: Tensor) -> bool:
        return self._selected is None or id(p) in self._selected

    @torch.no_grad()
    def _perturb(self, grad_scale: float | None) -> bool:
        if grad_scale is not None:
            grad_scale = float(grad_scale)
            if not grad_scale > 0:
                raise ValueError(f"grad_scale must be > 0, got {grad_scale!r}.")
        per_group: list[tuple[dict[str, Any], float, list[Tensor]]] = []
        with_grad: list[Tensor] = []
        for group in self.param_groups:
            rho = self._group_rho(group)
            chosen = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                with_grad.append(p)
                if rho > 0 and self._is_selected(p):
                    chosen.append(p)
            if chosen:
                per_group.append((group, rho, chosen))
        if not per_group:
            if not with_grad:
                reason = "no parameter has a gradient"
            elif all(self._group_rho(g) == 0 for g in self.param_groups):
                reason = "rho = 0"
            else:
                reason = "no perturbed parameter has a gradient"
            self._pending = {"grad_norm": None, "reason": reason}
            self._phase = _UNPERTURBED
            return False
        norms = []
        for group, _, ps in per_group:
            if group["adaptive"]:
                eta = group["eta"]
                norms += [torch.linalg.vector_norm(p.grad * (p.abs() + eta)) for p in ps]
            else:
                norms += list(torch._foreach_norm([p.grad for p in ps]))
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        total_f = float(total)  # host synchronization: decides whether to perturb
        if grad_scale is not None:
            total_f /= grad_scale
        self._pending = {"grad_norm": total_f, "reason": None}
        if not math.isfinite(float(total)):
            self._pending["reason"] = "non-finite gradient at w"
            self._nonfinite_reason = "non-finite gradient at w"
            self._phase = _NONFINITE
            return False
        if total_f == 0.0:
            self._pending["reason"] = "zero gradient norm"
            self._phase = _UNPERTURBED
            return False
        self._save_first_gradient(with_grad)
        saved = {}
        for group, rho, ps in per_group:
            for p in ps:
                saved[p] = p.detach().clone()
            if self._norm == "linf":
                for p in ps:
                    step = torch.sign(p.grad)
                    if group["adaptive"]:
                        step.mul_(p.abs().add_(group["eta"]))
                    p.add_(step, alpha=rho)
                continue
            if self._normalize:
                scale = rho / float(total)
            else:
                scale = rho / (grad_scale if grad_scale is not None else 1.0)
            if group["adaptive"]:
                for p in ps:
                    t = p.abs().add_(group["eta"])
                    p.add_(p.grad * t * t, alpha=scale)
            else:
                torch._foreach_add_(ps, [p.grad for p in ps], alpha=scale)
        self._saved = saved
        self._phase = _PERTURBED
        self._any_perturbed = True
        return True

    def _two_passes(self, closure: Callable[[], Any]) -> Any:
        snapshot = _rng_snapshot(self.param_groups) if self._same_dropout else None
        with torch.enable_grad():
            loss = closure()
        if self._perturb(None):
            try:
                replay = _replay_rng(snapshot) if snapshot is not None else nullcontext()
                frozen = (
                    disable_running_stats(self._model) if self._model is not None else nullcontext()
                )
                with replay, frozen, torch.enable_grad():
                    closure()
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
        self._last_info = SAMStepInfo(
            perturbed=self._any_perturbed,
            stepped=stepped,
            grad_norm=self._pending.get("grad_norm"),
            reason=reason,
            micro_batches=micro,
        )
        self._reset()


# -- helpers --------------------------------------------------------------------------------
def _check_perturb(perturb: PerturbSelector, model: nn.Module | None):
    if perturb is None:
        return None
    if isinstance(perturb, type):
        perturb = (perturb,)
    if isinstance(perturb, tuple):
        if not perturb or not all(
            isinstance(t, type) and issubclass(t, nn.Module) for t in perturb
        ):
            raise TypeError(
                f"perturb as module types must be nn.Module subclasses, got {perturb!r}."
            )
        if model is None:
            raise ValueError(
                f"perturb={perturb!r} selects parameters by module type, which needs the "
                "model: pass model=model."
            )
        return perturb
    if callable(perturb):
        return perturb
    raise TypeError(
        "perturb must be None, a predicate (name, param) -> bool, or nn.Module types, got "
        f"{type(perturb).__name__}."
    )


def _check_base_kwargs(cls: type[Optimizer], kwargs: dict[str, Any], sam_names) -> None:
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # builtins without a signature: let the class decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [n for n in sig.parameters if n not in ("self", "params")]
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}: not an option of SAM ({', '.join(sam_names)}) nor of "
            f"{cls.__name__} ({', '.join(accepted)})."
        )


def _check_same_groups(mine: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> None:
    def describe(groups):
        return [len(g["params"]) for g in groups]

    same = len(mine) == len(theirs) and all(
        len(a["params"]) == len(b["params"])
        and all(x is y for x, y in zip(a["params"], b["params"], strict=True))
        for a, b in zip(mine, theirs, strict=True)
    )
    if not same:
        raise ValueError(
            "the base optimizer instance was built on different parameters or param groups "
            f"(group sizes {describe(theirs)}) than those given to SAM (group sizes "
            f"{describe(mine)}); build both from the same params, or pass the class "
            "(e.g. SAM(params, torch.optim.SGD, lr=0.1))."
        )


def _rng_snapshot(groups: list[dict[str, Any]]) -> dict[str, Any]:
    cuda = sorted(
        {p.device.index or 0 for g in groups for p in g["params"] if p.device.type == "cuda"}
    )
    return {
        "cpu": torch.get_rng_state(),
        "cuda": {d: torch.cuda.get_rng_state(d) for d in cuda},
    }


@contextmanager
def _replay_rng(snapshot: dict[str, Any]):
    """Run the block with the saved random state; afterwards the state is as before the block."""
    devices = list(snapshot["cuda"])
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(snapshot["cpu"])
        for d, state in snapshot["cuda"].items():
            torch.cuda.set_rng_state(state, d)
        yield
