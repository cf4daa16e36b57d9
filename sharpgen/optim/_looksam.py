r"""LookSAM (Liu, Mai, Chen, Hsieh & You 2022): full SAM every k steps, its sharpness reused."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from sharpgen._validation import check_int, check_positive
from sharpgen.optim._groups import PerturbSelector
from sharpgen.optim._sam import SAM
from sharpgen.sharpness._sam_kernel import total_dot as _dot

__all__ = ["LookSAM"]

_GV = "looksam_gv"  # the key of the stored sharpness component in the optimizer state


class LookSAM(SAM):
    r"""LookSAM: a SAM step every ``k`` steps; in between, the last sharpness direction reused.

    On a SAM step ($t \equiv 0 \bmod k$) the update is `SAM`'s, and the part of the SAM
    gradient $g_s = \nabla L(w + \varepsilon)$ orthogonal to $g = \nabla L(w)$ is kept:

    $$
    g_v = g_s - \frac{g^\top g_s}{\|g\|_2^2}\, g .
    $$

    On the other steps there is one pass, and the base optimizer receives

    $$
    g + \alpha\, \frac{\|g\|_2}{\|g_v\|_2}\, g_v .
    $$

    Norms and inner products are global (over every parameter with a gradient), as in the
    paper's Algorithm 1. ``alpha=0`` is SAM every ``k`` steps (``SAM(..., interval=k)``).
    Everything else (closure contract, two-call style, restore, skips, state dict) is that of
    `SAM`; on a reuse step `first_step` returns ``False`` (no second pass) and the final
    gradient is formed in ``.grad``. $g_v$ lives in the optimizer state (``"looksam_gv"``),
    so `state_dict` resumes bit for bit; a non-finite $g_s$ leaves the previous $g_v$.

    Deviation from pytorch-optimizer's ``LookSAM``: its projection and scaling are per
    parameter tensor and its ``step(closure)`` runs the closure on every step; here they are
    global (as in the paper) and a reuse step costs one pass.

    Memory: one copy of the gradients kept between steps ($g_v$), plus during a SAM step
    the saved weights and $g$.

    Args:
        params: As for `SAM`.
        base_optimizer: As for `SAM`.
        rho: $\rho \ge 0$.
        k: A SAM step every ``k >= 1`` steps.
        alpha: $\alpha \ge 0$, the weight of the reused component (the paper uses 0.7).
        adaptive: ASAM scaling of the perturbation.
        eta: $\eta$ of the ASAM scaling.
        norm: ``"l2"`` or ``"linf"`` (the perturbation; the decomposition is Euclidean).
        perturb: As for `SAM`.
        model: As for `SAM`.
        same_dropout: As for `SAM`.
        **base_kwargs: Options of the base optimizer class.

    Raises:
        ValueError: ``k < 1``, ``alpha < 0``, and the errors of `SAM`.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import LookSAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=2, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> [(opt.step(closure), opt.last_step_info.perturbed)[1] for _ in range(3)]
        [True, False, True]

    References:
        Liu, Mai, Chen, Hsieh & You (2022), *Towards Efficient and Scalable Sharpness-Aware
        Minimization*, CVPR.
    """

    _keeps_first_gradient = True

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
        norm: str = "l2",
        perturb: PerturbSelector = None,
        model: nn.Module | None = None,
        same_dropout: bool = False,
        **base_kwargs: Any,
    ) -> None:
        k = check_int("k", k, minimum=1, hint="LookSAM takes a SAM step every k steps.")
        self._alpha = check_positive("alpha", alpha, allow_zero=True)
        super().__init__(
            params, base_optimizer, rho, adaptive=adaptive, eta=eta, norm=norm,
            perturb=perturb, model=model, same_dropout=same_dropout, interval=k, **base_kwargs,
        )  # fmt: skip

    def _counts_steps(self) -> bool:
        return True  # counted also for k = 1

    @torch.no_grad()
    def _combine_gradients(self) -> None:
        g0, self._g0 = self._g0, {}
        params, gs = self._params_with_grad()
        if not g0 or not params:
            return
        g = [g0[p] if p in g0 else torch.zeros_like(s) for p, s in zip(params, gs, strict=True)]
        g_sq = _dot(g, g)
        coef = torch.where(g_sq > 0, _dot(g, gs) / g_sq, torch.zeros_like(g_sq))
        gv = [s - coef.to(s.device) * q for s, q in zip(gs, g, strict=True)]
        if not bool(torch.isfinite(_dot(gv, gv))):  # keep the last finite g_v
            return
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].pop(_GV, None)
        for p, v in zip(params, gv, strict=True):
            self.state[p][_GV] = v

    @torch.no_grad()
    def _between_sam_steps(self) -> bool:
        params, grads = self._params_with_grad()
        pairs = zip(params, grads, strict=True)
        stored = [(p, g) for p, g in pairs if _GV in self.state.get(p, {})]
        reason = "LookSAM: no sharpness component yet"
        if stored and self._alpha > 0:
            gv = [self.state[p][_GV] for p, _ in stored]
            g_norm, gv_norm = _dot(grads, grads).sqrt(), _dot(gv, gv).sqrt()
            scale = torch.where(gv_norm > 0, self._alpha * g_norm / gv_norm, 0.0)
            torch._foreach_add_([g for _, g in stored], torch._foreach_mul(gv, scale))
            reason = "LookSAM: sharpness component reused"
        elif stored:
            reason = f"SAM every {self._interval} steps"
        return self._skip_perturbation(reason)
