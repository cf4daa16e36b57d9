r"""Momentum-SAM (MSAM, Becker, Altrock & Risse 2024): the perturbation along the momentum."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpgen._validation import check_rho
from sharpgen.optim._base import SAMBase
from sharpgen.optim._groups import PerturbSelector
from sharpgen.sharpness._sam_kernel import sam_grad_norms, sam_perturb_, total_norm

__all__ = ["MSAM"]

# the base optimizers whose state holds a momentum MSAM can follow, and its key
_MOMENTUM_KEYS = {
    torch.optim.SGD: "momentum_buffer",
    torch.optim.Adam: "exp_avg",
    torch.optim.AdamW: "exp_avg",
    torch.optim.NAdam: "exp_avg",
    torch.optim.RAdam: "exp_avg",
}


class MSAM(SAMBase):
    r"""Momentum-SAM: SAM's second gradient at a point along the momentum, in one pass per step.

    With $v_t$ the base optimizer's momentum (SGD's ``momentum_buffer``, Adam's first moment
    ``exp_avg``) after step $t - 1$:

    $$
    \tilde w_t = w_t - \rho\,\frac{v_t}{\|v_t\|_2}, \qquad
    w_{t+1} = \operatorname{base\_step}\bigl(w_t,\ \nabla L(\tilde w_t)\bigr),
    $$

    so with SGD and momentum $\mu$: $v_{t+1} = \mu v_t + \nabla L(\tilde w_t)$,
    $w_{t+1} = w_t - \eta v_{t+1}$. The perturbation is the SAM kernel's $\ell_2$ step with
    the momentum in place of the gradient and the radius $-\rho$ (the momentum points uphill:
    the weights move *against* it, ahead of the descent, as in Nesterov's method). Only one
    forward/backward pass per step, at $\tilde w_t$; the first step (no momentum yet) is the
    base optimizer's step at $w$.

    Deviation from the paper: the paper keeps the weights at $\tilde w_t$ between steps and
    removes the perturbation by subtraction; here the weights between steps are $w_t$ (exact
    restore from a saved copy, as for every optimizer of the family), at the cost of one copy
    of the perturbed parameters during the step. ``step(closure)`` therefore returns the loss
    at $\tilde w_t$ (the only pass), and evaluation between steps sees $w_t$.

    **Contract.** That of `SAM`, with one pass: ``step(closure)`` perturbs, calls the closure
    at $\tilde w_t$ (BatchNorm statistics are updated there: it is the only pass), restores
    $w_t$ and steps. Two-call style: `first_step` *before* the backward pass (it needs no
    gradient), backward at $\tilde w_t$, `second_step`. ``state_dict`` is the base
    optimizer's (the momentum lives there). A non-finite gradient skips the base step.

    Args:
        params: As for `SAM`.
        base_optimizer: ``torch.optim.SGD`` (with ``momentum > 0``), ``Adam``, ``AdamW``,
            ``NAdam`` or ``RAdam`` (class or instance).
        rho: $\rho \ge 0$ (the paper uses values around 0.3 to 3 for SGD, larger than SAM's).
        perturb: As for `SAM`.
        model: As for `SAM` (parameter names and module-type selection).
        **base_kwargs: Options of the base optimizer class.

    Raises:
        ValueError: ``rho < 0``, SGD without momentum, and the errors of `SAM`.
        TypeError: a base optimizer without a momentum MSAM knows.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import MSAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = MSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)  # no momentum yet: a plain SGD step
        >>> _ = opt.step(closure)
        >>> opt.last_step_info.perturbed
        True

    References:
        Becker, Altrock & Risse (2024), *Momentum-SAM: Sharpness Aware Minimization without
        Computational Overhead*, arXiv:2401.12033.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.3,
        *,
        perturb: PerturbSelector = None,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        self._init_common("l2", True, perturb, model, False, base_optimizer)
        cls = base_optimizer if isinstance(base_optimizer, type) else type(base_optimizer)
        key = next((k for c, k in _MOMENTUM_KEYS.items() if issubclass(cls, c)), None)
        if key is None:
            raise TypeError(
                f"MSAM follows the momentum of SGD, Adam, AdamW, NAdam or RAdam; "
                f"{cls.__name__} has none it knows. Use one of those as base_optimizer."
            )
        self._momentum_key = key
        self._build(params, base_optimizer, {"rho": check_rho(rho)}, base_kwargs)
        if key == "momentum_buffer" and any(g["momentum"] == 0 for g in self.param_groups):
            raise ValueError(
                "MSAM with SGD needs momentum > 0 (the perturbation follows the momentum "
                "buffer); pass momentum=0.9, for example."
            )

    def _two_passes(self, closure: Callable[[], Any]) -> Any:
        if self._perturb(None):
            return self._perturbed_pass(closure)
        with torch.enable_grad():
            return closure()

    @torch.no_grad()
    def _perturb(self, grad_scale: float | None) -> bool:
        entries = []  # (rho, params, momenta)
        for group in self.param_groups:
            params, momenta = [], []
            for p in group["params"]:
                v = self.state.get(p, {}).get(self._momentum_key)
                if v is not None and group["rho"] > 0 and self._is_selected(p):
                    params.append(p)
                    momenta.append(v)
            if params:
                entries.append((group["rho"], params, momenta))
        if not entries:
            return self._skip_perturbation("no momentum yet (or rho = 0)")
        norms: list[Tensor] = []
        for _, params, momenta in entries:
            norms += sam_grad_norms(params, momenta, foreach=True)
        total = total_norm(norms)
        if not self._accept_norm(total, zero="zero momentum", nonfinite="non-finite momentum"):
            return False
        grad_norm = float(total)
        for rho, params, momenta in entries:
            self._save_weights(params)
            sam_perturb_(params, momenta, rho=-rho, grad_norm=grad_norm, foreach=True)
        return self._mark_perturbed()
