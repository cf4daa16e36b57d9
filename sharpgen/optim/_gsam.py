r"""Surrogate-gap guided SAM (GSAM, Zhuang et al. 2022)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from sharpgen._validation import check_rho
from sharpgen.optim._sam import SAM, PerturbSelector
from sharpgen.sharpness._sam_kernel import check_eta, total_dot

__all__ = ["GSAM"]


class GSAM(SAM):
    r"""Surrogate-gap guided sharpness-aware minimization (GSAM).

    With $g = \nabla L(w)$ and $g_p = \nabla L(w + \varepsilon)$ from the SAM perturbation
    $\varepsilon = \rho_t T_w^2 g / \|T_w g\|_2$, the final gradient removes part of the
    component of $g$ orthogonal to $g_p$ (a descent direction of the surrogate gap):

    $$
    g_\perp = g - \frac{g^\top g_p}{\|g_p\|_2^2}\, g_p, \qquad
    w \leftarrow \operatorname{base\_step}\bigl(w,\ g_p - \alpha\, g_\perp\bigr),
    $$

    and $\rho_t$ follows the base optimizer's current learning rate $\eta_t$ of the group:

    $$
    \rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min})\,
      \frac{\eta_t - \eta_{\min}}{\eta_{\max} - \eta_{\min}}
    $$

    ($\eta_t$ clipped to $[\eta_{\min}, \eta_{\max}]$; $\rho_t = \rho_{\max}$ when
    $\eta_{\max} = \eta_{\min}$). The inner products run over every parameter that has a
    gradient in either pass (a missing gradient counts as zero); with $g_p = 0$ the projection
    is taken as zero. Everything else (closure contract, two-call style, restore, skips,
    state dict) is that of `SAM`. Memory: one more copy of the gradients than `SAM`.

    Args:
        params: As for `SAM`.
        base_optimizer: As for `SAM`.
        rho_max: $\rho_{\max} \ge 0$.
        rho_min: $\rho_{\min}$, ``0 <= rho_min <= rho_max``; ``None`` means ``rho_max``
            (constant radius).
        alpha: $\alpha$ in the final gradient, ``0 <= alpha``; ``0`` is SAM.
        lr_max: $\eta_{\max}$; ``None`` means each group's learning rate at construction.
        lr_min: $\eta_{\min}$, ``0 <= lr_min <= lr_max``.
        adaptive: ASAM scaling of the perturbation.
        eta: $\eta$ of the ASAM scaling.
        norm: ``"l2"`` or ``"linf"`` (the perturbation; the decomposition is Euclidean).
        perturb: As for `SAM`.
        model: As for `SAM`.
        same_dropout: As for `SAM`.
        **base_kwargs: Options of the base optimizer class.

    Raises:
        ValueError: a negative radius, ``rho_min > rho_max``, ``alpha < 0``, ``lr_min < 0``,
            ``lr_min > lr_max``, and the errors of `SAM`.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import GSAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.1, rho_min=0.01,
        ...            alpha=0.1, lr=0.5, lr_min=0.0)
        >>> opt.current_rho()
        [0.1]
        >>> opt.param_groups[0]["lr"] = 0.25
        >>> round(opt.current_rho()[0], 12)
        0.055

    References:
        Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan & Liu (2022), *Surrogate Gap
        Minimization Improves Sharpness-Aware Training*, ICLR.
    """

    _keeps_first_gradient = True

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Optimizer,
        rho_max: float = 0.05,
        rho_min: float | None = None,
        *,
        alpha: float = 0.1,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        adaptive: bool = False,
        eta: float = 0.0,
        norm: str = "l2",
        perturb: PerturbSelector = None,
        model: nn.Module | None = None,
        same_dropout: bool = False,
        **base_kwargs: Any,
    ) -> None:
        self._init_common(norm, True, perturb, model, same_dropout, base_optimizer)
        rho_max = check_rho(rho_max)
        rho_min = rho_max if rho_min is None else check_rho(rho_min)
        defaults = {
            "rho_max": rho_max,
            "rho_min": rho_min,
            "alpha": alpha,
            "lr_max": lr_max,
            "lr_min": lr_min,
            "adaptive": adaptive,
            "eta": check_eta(eta),
        }
        self._build(params, base_optimizer, defaults, base_kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        for key in ("rho_max", "rho_min"):
            if key in group:
                group[key] = check_rho(group[key])
        if "rho_max" in group and "rho_min" in group and group["rho_min"] > group["rho_max"]:
            raise ValueError(
                f"rho_min must be <= rho_max, got rho_min={group['rho_min']!r} > "
                f"rho_max={group['rho_max']!r}."
            )
        if "alpha" in group:
            a = group["alpha"]
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
                raise TypeError(f"alpha must be a finite number, got {a!r}.")
            if a < 0:
                raise ValueError(f"alpha must be >= 0 (0 is plain SAM), got {a!r}.")
        if group.get("lr_min") is not None and not float(group["lr_min"]) >= 0:
            raise ValueError(f"lr_min must be >= 0, got {group['lr_min']!r}.")
        if group.get("lr_max") is not None and group.get("lr_min") is not None:
            if float(group["lr_max"]) < float(group["lr_min"]):
                raise ValueError(
                    f"lr_max must be >= lr_min, got lr_max={group['lr_max']!r} < "
                    f"lr_min={group['lr_min']!r}."
                )

    def _after_groups_ready(self) -> None:
        for group in self.param_groups:
            if group.get("lr_max") is None:
                if "lr" not in group:
                    raise ValueError(
                        "GSAM needs lr_max (the base optimizer has no 'lr' option to take it "
                        "from); pass lr_max=..."
                    )
                group["lr_max"] = float(group["lr"])
            self._check_group(group)

    def current_rho(self) -> list[float]:
        r"""The radius $\rho_t$ of each param group at the groups' current learning rates."""
        return [self._group_rho(g) for g in self.param_groups]

    def _group_rho(self, group: dict[str, Any]) -> float:
        rho_max, rho_min = group["rho_max"], group["rho_min"]
        lr_max, lr_min = float(group["lr_max"]), float(group["lr_min"])
        if lr_max == lr_min:
            return rho_max
        lr = min(max(float(group["lr"]), lr_min), lr_max)
        return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)

    @torch.no_grad()
    def _combine_gradients(self) -> None:
        entries = self._both_gradients()  # (group, param, g at w, g_p at w + eps)
        if not entries:
            return
        gs, gps = [g for _, _, g, _ in entries], [gp for _, _, _, gp in entries]
        inner, gp_sq = total_dot(gs, gps), total_dot(gps, gps)
        coef = torch.where(gp_sq > 0, inner / gp_sq, torch.zeros_like(inner))
        for group, _, g, gp in entries:
            # g_p - alpha * (g - coef * g_p) = (1 + alpha * coef) * g_p - alpha * g, in place
            alpha = group["alpha"]
            gp.mul_(1.0 + alpha * coef.to(gp.device)).add_(g, alpha=-alpha)
