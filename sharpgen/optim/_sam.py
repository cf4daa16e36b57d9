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

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpgen._validation import check_bool, check_int, check_rho
from sharpgen.optim._base import SAMBase
from sharpgen.optim._groups import PerturbSelector
from sharpgen.optim._state import SAMStepInfo
from sharpgen.sharpness._sam_kernel import check_eta, sam_grad_norms, sam_perturb_, total_norm

__all__ = ["SAM", "SAMStepInfo"]

# one entry per param group with perturbed parameters: (group, rho, params, grads)
GroupEntry = tuple[dict[str, Any], float, list[Tensor], list[Tensor]]


class SAM(SAMBase):
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
        interval: SAM every ``interval`` steps (MosaicML Composer's ``interval``): steps
            $0, k, 2k, \dots$ are SAM steps, the others are base steps on $\nabla L(w)$ (one
            pass; `first_step` returns ``False``). The step count is kept in the param groups
            (``"sam_steps"``), so it survives `state_dict`; it counts the base steps taken (a
            step skipped for a non-finite gradient is retried as the same step).
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
        interval: int = 1,
        **base_kwargs: Any,
    ) -> None:
        self._init_common(norm, normalize, perturb, model, same_dropout, base_optimizer)
        self._interval = check_int("interval", interval, minimum=1)
        defaults = {"rho": check_rho(rho), "adaptive": adaptive, "eta": check_eta(eta)}
        self._build(params, base_optimizer, defaults, base_kwargs)

    # -- SAM every k steps ----------------------------------------------------------------
    def _steps_done(self) -> int:
        return int(self.param_groups[0].get("sam_steps", 0))

    def _is_sam_step(self) -> bool:
        return self._steps_done() % self._interval == 0

    def _counts_steps(self) -> bool:
        """Whether the step count is kept (``"sam_steps"`` in the groups)."""
        return self._interval > 1

    def _after_step(self, stepped: bool) -> None:
        if stepped and self._counts_steps():
            done = self._steps_done() + 1
            for group in self.param_groups:
                group["sam_steps"] = done

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if "eta" in group:
            group["eta"] = check_eta(group["eta"])
        if "adaptive" in group:
            check_bool("adaptive", group["adaptive"])

    @torch.no_grad()
    def _perturb(self, grad_scale: float | None) -> bool:
        grad_scale = _check_grad_scale(grad_scale)
        if not self._is_sam_step():
            return self._between_sam_steps()
        entries, with_grad = self._collect()
        if not entries:
            return self._nothing_to_perturb(with_grad)
        entries = self._ascent_directions(entries)
        norms = []
        for group, _, params, grads in entries:
            norms += sam_grad_norms(
                params, grads, adaptive=group["adaptive"], eta=group["eta"], foreach=True
            )
        total = total_norm(norms)
        if not self._accept_norm(total, grad_scale):
            return False
        self._save_first_gradient(with_grad)
        self._accepted(entries)
        grad_norm = float(total)
        for group, rho, params, grads in entries:
            self._save_weights(params)
            sam_perturb_(
                params, grads, rho=rho, grad_norm=grad_norm, norm=self._norm,
                adaptive=group["adaptive"], eta=group["eta"], normalize=self._normalize,
                grad_scale=grad_scale, foreach=True,
            )  # fmt: skip
        return self._mark_perturbed()

    def _ascent_directions(self, entries: list[GroupEntry]) -> list[GroupEntry]:
        r"""Hook: the directions the kernel normalizes (FriendlySAM's $g - \sigma m$)."""
        return entries

    def _accepted(self, entries: list[GroupEntry]) -> None:
        """Hook: the perturbation is going ahead (the norm was finite and positive)."""

    def _between_sam_steps(self) -> bool:
        """A step without perturbation (``interval > 1``): ``.grad`` is the final gradient."""
        return self._skip_perturbation(f"SAM every {self._interval} steps")

    # -- building blocks of the first half (shared by the variants) --------------------------
    def _collect(self) -> tuple[list[GroupEntry], list[Tensor]]:
        """Per group, the perturbed parameters with a gradient; and all with a gradient.

        (torch.optim's ``_init_group``.)
        """
        entries: list[GroupEntry] = []
        with_grad: list[Tensor] = []
        for group in self.param_groups:
            rho = self._group_rho(group)
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                with_grad.append(p)
                if rho > 0 and self._is_selected(p):
                    params.append(p)
                    grads.append(p.grad)
            if params:
                entries.append((group, rho, params, grads))
        return entries, with_grad

    def _nothing_to_perturb(self, with_grad: list[Tensor]) -> bool:
        if not with_grad:
            reason = "no parameter has a gradient"
        elif all(self._group_rho(g) == 0 for g in self.param_groups):
            reason = "rho = 0"
        else:
            reason = "no perturbed parameter has a gradient"
        return self._skip_perturbation(reason)


def _check_grad_scale(grad_scale: float | None) -> float | None:
    if grad_scale is None:
        return None
    value = float(grad_scale)
    if not value > 0:
        raise ValueError(f"grad_scale must be > 0, got {value!r}.")
    return value
