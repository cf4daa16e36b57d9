r"""Weighted SAM (WSAM, Yue et al. 2023): sharpness as a weighted regularization term."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpgen._validation import check_bool, check_interval
from sharpgen.optim._groups import PerturbSelector
from sharpgen.optim._sam import SAM

__all__ = ["WSAM"]


class WSAM(SAM):
    r"""Weighted SAM: minimize $L(w) + \frac{\gamma}{1-\gamma}(L(w + \varepsilon) - L(w))$.

    With $g = \nabla L(w)$, $\tilde g = \nabla L(w + \varepsilon)$ at SAM's perturbation
    (the kernel's, with ``adaptive``/``norm`` as for `SAM`) and $\alpha = \gamma / (1 - \gamma)$:

    $$
    \text{decoupled (default):}\quad
    w \leftarrow \operatorname{base\_step}(w, g) - \eta\,\alpha\,(\tilde g - g), \qquad
    \text{coupled:}\quad
    w \leftarrow \operatorname{base\_step}\bigl(w,\ g + \alpha(\tilde g - g)\bigr),
    $$

    where $\eta$ is the group's current learning rate. The decoupled form (the paper's
    Algorithm 2, "weight decouple") keeps the sharpness term out of the base optimizer's
    momentum and moments, as AdamW does with weight decay. $\gamma = 1/2$ coupled is SAM,
    $\gamma = 0$ is the base optimizer (with two passes). Everything else is `SAM`'s
    contract; a non-finite $\tilde g - g$ skips the step in both forms.

    Memory: one copy of the gradients during the step ($g$), besides SAM's saved weights.

    Args:
        params: As for `SAM`.
        base_optimizer: As for `SAM`.
        rho: $\rho \ge 0$.
        gamma: $\gamma \in [0, 1)$ (the paper recommends 0.8 to 0.95).
        decouple: Apply the sharpness term after the base step (``True``) or feed the
            weighted gradient to the base optimizer (``False``).
        adaptive: ASAM scaling of the perturbation.
        eta: $\eta$ of the ASAM scaling.
        norm: ``"l2"`` or ``"linf"``.
        perturb: As for `SAM`.
        model: As for `SAM`.
        same_dropout: As for `SAM`.
        **base_kwargs: Options of the base optimizer class.

    Raises:
        ValueError: ``gamma`` outside $[0, 1)$, and the errors of `SAM`.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import WSAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)
        >>> opt.last_step_info.stepped
        True

    References:
        Yue, Jiang, Ye, Gao, Liu & Zhang (2023), *Sharpness-Aware Minimization Revisited:
        Weighted Sharpness as a Regularization Term*, KDD.
    """

    _keeps_first_gradient = True

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        gamma: float = 0.9,
        *,
        decouple: bool = True,
        adaptive: bool = False,
        eta: float = 0.0,
        norm: str = "l2",
        perturb: PerturbSelector = None,
        model: nn.Module | None = None,
        same_dropout: bool = False,
        **base_kwargs: Any,
    ) -> None:
        gamma = check_interval(
            "gamma", gamma, 0, 1, hint="(The weight of the sharpness is gamma / (1 - gamma).)"
        )
        self._alpha = gamma / (1.0 - gamma)
        self._decouple = check_bool("decouple", decouple)
        self._sharp: dict[Tensor, Tensor] = {}
        super().__init__(
            params, base_optimizer, rho, adaptive=adaptive, eta=eta, norm=norm,
            perturb=perturb, model=model, same_dropout=same_dropout, **base_kwargs,
        )  # fmt: skip

    def _discard_first_gradient(self) -> None:
        super()._discard_first_gradient()
        self._sharp = {}

    @torch.no_grad()
    def _combine_gradients(self) -> None:
        for _, p, g, gs in self._both_gradients():
            if self._decouple:  # base step on g; g_s - g applied after it
                p.grad = g
                self._sharp[p] = gs.sub_(g)
            else:  # g + alpha (g_s - g) = alpha g_s + (1 - alpha) g
                p.grad = gs.mul_(self._alpha).add_(g, alpha=1.0 - self._alpha)

    def _also_finite(self) -> list[Tensor]:
        return list(self._sharp.values())

    @torch.no_grad()
    def _after_step(self, stepped: bool) -> None:
        super()._after_step(stepped)
        sharp, self._sharp = self._sharp, {}
        if not stepped or not sharp:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p in sharp:
                    p.add_(sharp[p], alpha=-float(group["lr"]) * self._alpha)
