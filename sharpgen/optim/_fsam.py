r"""Friendly SAM (F-SAM, Li et al. 2024): the perturbation without the full-gradient part."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpgen._validation import check_interval, check_positive
from sharpgen.optim._groups import PerturbSelector
from sharpgen.optim._sam import SAM, GroupEntry

__all__ = ["FriendlySAM"]

_M = "fsam_momentum"  # the key of the gradient average in the optimizer state


class FriendlySAM(SAM):
    r"""Friendly SAM: SAM's perturbation along the gradient minus a running average of it.

    With $g_t = \nabla L(w_t)$ and an exponential moving average $m_t$ of the gradients
    (an estimate of the full-batch gradient), the perturbation follows the stochastic part:

    $$
    m_t = \lambda m_{t-1} + (1 - \lambda)\, g_t, \quad
    d_t = g_t - \sigma m_t, \quad
    \varepsilon_t = \rho\, \frac{T_w^2 d_t}{\|T_w d_t\|_2}, \quad
    w_{t+1} = \operatorname{base\_step}\bigl(w_t, \nabla L(w_t + \varepsilon_t)\bigr),
    $$

    with $m_0 = 0$ ($T_w$, ``norm`` and ``adaptive`` as for `SAM`: $d_t$ goes through the
    same kernel in place of $g_t$). $m_t$ lives in the optimizer state (``"fsam_momentum"``),
    so `state_dict` resumes bit for bit; it is updated only when a step that perturbed takes
    its base step: a step skipped for a non-finite gradient (at $w$ or at
    $w + \varepsilon$) or aborted by an exception (Ctrl-C included) leaves it as it was, so
    a retried step equals an uninterrupted run. Everything else is `SAM`'s contract.

    Deviation: this follows the paper's equations ($d_t$ uses the updated $m_t$, and
    $m_0 = 0$). The authors' code and pytorch-optimizer's ``FriendlySAM`` use $m_{t-1}$ in
    $d_t$ and start from $m_1 = g_1$ (so their first perturbation is SAM's).

    Memory: one copy of the perturbed parameters' gradients kept between steps ($m$),
    besides SAM's saved weights.

    Args:
        params: As for `SAM`.
        base_optimizer: As for `SAM`.
        rho: $\rho \ge 0$.
        sigma: $\sigma \ge 0$, how much of the average is removed (the paper uses 1).
        lmbda: $\lambda \in [0, 1)$, the decay of the average (the paper uses 0.9 to 0.95).
        adaptive: ASAM scaling of the perturbation.
        eta: $\eta$ of the ASAM scaling.
        norm: ``"l2"`` or ``"linf"``.
        perturb: As for `SAM`.
        model: As for `SAM`.
        same_dropout: As for `SAM`.
        **base_kwargs: Options of the base optimizer class.

    Raises:
        ValueError: ``sigma < 0``, ``lmbda`` outside $[0, 1)$, and the errors of `SAM`.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import FriendlySAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)
        >>> opt.state[model.weight]["fsam_momentum"].shape
        torch.Size([1, 3])

    References:
        Li, Zhou, He, Cheng & Huang (2024), *Friendly Sharpness-Aware Minimization*, CVPR.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        norm: str = "l2",
        perturb: PerturbSelector = None,
        model: nn.Module | None = None,
        same_dropout: bool = False,
        **base_kwargs: Any,
    ) -> None:
        self._sigma = check_positive("sigma", sigma, allow_zero=True)
        self._lmbda = check_interval("lmbda", lmbda, 0, 1, hint="(The decay of the average.)")
        self._new_m: dict[Tensor, Tensor] = {}
        self._pending_m: dict[Tensor, Tensor] = {}
        super().__init__(
            params, base_optimizer, rho, adaptive=adaptive, eta=eta, norm=norm,
            perturb=perturb, model=model, same_dropout=same_dropout, **base_kwargs,
        )  # fmt: skip

    @torch.no_grad()
    def _ascent_directions(self, entries: list[GroupEntry]) -> list[GroupEntry]:
        self._new_m = {}
        out = []
        for group, rho, params, grads in entries:
            directions = []
            for p, g in zip(params, grads, strict=True):
                old = self._average(p)
                m = g * (1.0 - self._lmbda)
                if old is not None:
                    m.add_(old, alpha=self._lmbda)
                self._new_m[p] = m
                directions.append(torch.sub(g, m, alpha=self._sigma))
            out.append((group, rho, params, directions))
        return out

    def _average(self, p: Tensor) -> Tensor | None:
        """$m_{t-1}$: a micro-batch's not yet committed average, else the state's."""
        if p in self._pending_m:
            return self._pending_m[p]
        return self.state[p].get(_M) if p in self.state else None

    def _accepted(self, entries: list[GroupEntry]) -> None:
        # kept aside until the base step is taken: a skipped or aborted step leaves m as it was
        self._pending_m.update(self._new_m)
        self._new_m = {}

    def _after_step(self, stepped: bool) -> None:
        super()._after_step(stepped)
        pending, self._pending_m = self._pending_m, {}
        if stepped:
            for p, m in pending.items():
                self.state[p][_M] = m

    def _reset(self) -> None:
        super()._reset()
        self._new_m, self._pending_m = {}, {}
