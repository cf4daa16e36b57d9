r"""Efficient SAM (ESAM, Du et al. 2022): stochastic weight perturbation and data selection."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpgen._validation import check_interval
from sharpgen.optim._groups import PerturbSelector
from sharpgen.optim._sam import SAM

__all__ = ["ESAM"]

_RNG = "esam_generator"  # the key of the generator's state in the state dict


class ESAM(SAM):
    r"""Efficient SAM: a random part of SAM's perturbation, the second pass on the sharpest samples.

    With $g = \nabla L_B(w)$ on the batch $B$ and a Bernoulli mask $m_i \sim
    \operatorname{Bern}(\beta)$ per weight (stochastic weight perturbation, SWP):

    $$
    \hat\varepsilon = \frac{\rho}{\beta}\, m \odot \frac{g}{\|g\|_2}, \qquad
    B^+ = \operatorname{top}_{\lceil \gamma |B| \rceil}\bigl(\ell_i(w + \hat\varepsilon)
    - \ell_i(w)\bigr), \qquad
    w \leftarrow \operatorname{base\_step}\bigl(w, \nabla L_{B^+}(w + \hat\varepsilon)\bigr),
    $$

    (sharpness-sensitive data selection, SDS: the samples whose loss rises most). $\beta = 1$,
    $\gamma = 1$ is SAM. The mask comes only from ``generator`` (its state is in
    `state_dict`, so a resume is bit for bit).

    **Closure.** ``step(closure)``'s closure returns the *per-sample* losses (a 1-D tensor
    with its graph, no reduction) and does not call ``backward``: ESAM runs the backward of
    the mean at $w$ and of the mean over $B^+$ at $w + \hat\varepsilon$ itself (clearing the
    gradients before each). It returns the mean loss at $w$. The two-call style
    (`first_step`, `second_step`) is SAM's with SWP only (the caller owns the backward, so no
    data selection). Everything else (exact restore, BatchNorm frozen in the second pass,
    skip-and-report on non-finite gradients) is `SAM`'s contract; ``adaptive``/``norm`` apply
    to $\varepsilon$ before the mask.

    Deviation: the paper (and its code) skips the backward of unselected weights to save
    time; here every weight gets the gradient at $w + \hat\varepsilon$ (only the forward and
    data selection differ from SAM), which is the update the paper writes.

    Args:
        params: As for `SAM`.
        base_optimizer: As for `SAM`.
        rho: $\rho \ge 0$.
        beta: $\beta \in (0, 1]$, the probability that a weight is perturbed (paper: 0.6).
        gamma: $\gamma \in (0, 1]$, the fraction of the batch in the second pass (paper: 0.5).
        generator: The source of the mask; ``None``: a private CPU generator seeded with 0.
        adaptive: As for `SAM`.
        eta: As for `SAM`.
        norm: As for `SAM`.
        perturb: As for `SAM`.
        model: As for `SAM`.
        **base_kwargs: Options of the base optimizer class.

    Raises:
        ValueError: ``beta`` or ``gamma`` outside $(0, 1]$, a closure that does not return a
            1-D tensor of per-sample losses, and the errors of `SAM`.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import ESAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5,
        ...            lr=0.1, generator=torch.Generator().manual_seed(0))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():  # per-sample losses, no backward
        ...     return ((model(x) - y) ** 2).mean(dim=1)
        >>> _ = opt.step(closure)
        >>> opt.last_step_info.perturbed
        True

    References:
        Du, Yan, Feng, Zhou, Zhen, Goh & Tan (2022), *Efficient Sharpness-aware Minimization for
        Improved Training of Neural Networks*, ICLR, arXiv:2110.03141.
    """

    _generator_key = _RNG

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        *,
        generator: torch.Generator | None = None,
        adaptive: bool = False,
        eta: float = 0.0,
        norm: str = "l2",
        perturb: PerturbSelector = None,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        self._beta = check_interval("beta", beta, 0, 1, closed="(]")
        self._gamma = check_interval("gamma", gamma, 0, 1, closed="(]")
        self._own_generator(generator)
        self._before = torch.zeros(0)  # the per-sample losses at w of the current step
        super().__init__(
            params, base_optimizer, rho, adaptive=adaptive, eta=eta, norm=norm,
            perturb=perturb, model=model, **base_kwargs,
        )  # fmt: skip

    @torch.no_grad()
    def _perturb(self, grad_scale: float | None) -> bool:
        if not super()._perturb(grad_scale):
            return False
        if self._beta < 1:
            gen = self._generator
            for p, w in self._saved.items():
                keep = torch.rand(p.shape, generator=gen, device=gen.device) < self._beta
                eps = (p - w).mul_(keep.to(device=p.device, dtype=p.dtype)).div_(self._beta)
                p.copy_(w).add_(eps)
        return True

    @staticmethod
    def _losses(value: object) -> Tensor:
        if not isinstance(value, Tensor) or value.dim() != 1 or value.numel() == 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"ESAM's closure must return the per-sample losses (a non-empty 1-D tensor, no "
                f"reduction, no backward), got {shape}; e.g. F.cross_entropy(out, y, "
                "reduction='none')."
            )
        return value

    def _first_pass(self, closure: Callable[[], Any]) -> Any:
        """Backward of the mean per-sample loss at $w$; returns that mean."""
        self.zero_grad()
        with torch.enable_grad():
            first = self._losses(closure())
            first.mean().backward()
        self._before = first.detach()
        return self._before.mean()

    def _second_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """Backward of the mean loss over the samples whose loss rose most (SDS)."""
        before = self._before

        def selected() -> None:
            self.zero_grad()
            after = self._losses(closure())
            k = max(1, math.ceil(self._gamma * after.numel()))
            idx = torch.topk(after.detach() - before, k, sorted=False).indices
            after[idx].mean().backward()

        return selected
