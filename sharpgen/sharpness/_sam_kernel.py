r"""The SAM perturbation kernel: one pure function on lists of tensors, torch.optim style.

Every SAM-family computation of $\varepsilon$ goes through this module: the optimizers of
`sharpgen.optim` (`SAM`, `GSAM` and the variants) call `sam_perturb_` on their parameter
groups, and the dict-based `sam_perturbation` (used by `sam_gradient` and the worst-case
sharpness measure) calls `sam_perturbation_list`. Like ``torch.optim.sgd`` the functions take
parallel lists ``params, grads`` and keyword options, have no state, do not check their
arguments (the callers do) and come in a single-tensor and a ``foreach`` flavour.

With $T_w = \operatorname{diag}(|w| + \eta)$ for ``adaptive`` (ASAM) and $T_w = I$ otherwise,
and $\|T_w g\|_2$ the norm over *all* tensors of the step (see `sam_grad_norms`):

$$
\varepsilon = \begin{cases}
  \rho\, T_w^2 g / \|T_w g\|_2 & \text{``l2'', normalized (SAM, ASAM)} \\
  (\rho / s)\, T_w^2 g & \text{``l2'', ``normalize=False`` (USAM)} \\
  \rho\, T_w \operatorname{sign}(g) & \text{``linf''}
\end{cases}
$$

where $s$ is ``grad_scale``, the factor the gradients carry under `torch.amp.GradScaler`
(the normalized and sign forms do not depend on it). A zero norm gives $\varepsilon = 0$.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sharpgen._validation import check_positive
from sharpgen.linalg._reduce import dot, is_long
from sharpgen.linalg._reduce import norm as accurate_norm

__all__ = [
    "NORMS",
    "check_eta",
    "check_norm",
    "sam_grad_norms",
    "sam_perturb_",
    "sam_perturbation_list",
    "total_dot",
    "total_norm",
]

NORMS = ("l2", "linf")


def check_eta(eta: object) -> float:
    r"""The offset $\eta \ge 0$ of the ASAM scaling, as a float."""
    return check_positive(
        "eta", eta, allow_zero=True, hint="eta is the offset of the ASAM scaling |w| + eta."
    )


def check_norm(norm: object) -> str:
    """The neighbourhood's norm, ``"l2"`` or ``"linf"``."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    return norm


def sam_grad_norms(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    foreach: bool = False,
) -> list[Tensor]:
    r"""Per-tensor norms $\|T_w g\|_2$ (combine them with `total_norm`), in each ``g``'s dtype.

    A long float32 tensor on a CPU (more than 65536 numbers) is summed in float64 blocks
    (`sharpgen.linalg._reduce`): torch's float32 ``vector_norm`` there is $1.7\cdot
    10^{-3}$ too small at $3\cdot 10^7$ numbers (GPT-2's embedding has $3.9\cdot 10^7$),
    and the perturbation as much too long. Short tensors use torch's (``foreach``) kernels.
    """
    if adaptive:
        pairs = zip(params, grads, strict=True)
        return [_norm((g * (p.abs() + eta)).reshape(-1)) for p, g in pairs]
    if foreach:
        grads = list(grads)
        short = [i for i, g in enumerate(grads) if not is_long(g)]
        norms = [_norm(g.reshape(-1)) if is_long(g) else g for g in grads]
        if short:
            for i, n in zip(short, torch._foreach_norm([grads[i] for i in short]), strict=True):
                norms[i] = n
        return norms
    return [_norm(g.reshape(-1)) for g in grads]


def _norm(x: Tensor) -> Tensor:
    """``||x||`` of a flat tensor in its dtype: accurate (float64 blocks) where long."""
    return accurate_norm(x).to(x.dtype) if is_long(x) else torch.linalg.vector_norm(x)


def total_norm(norms: Sequence[Tensor]) -> Tensor:
    r"""The global norm $\sqrt{\sum_i n_i^2}$ of per-tensor norms, on the first one's device."""
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def total_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    r"""$\sum_i a_i^\top b_i$ over parallel lists, on the first tensor's device, in its dtype.

    Each $a_i^\top b_i$ is summed accurately (`sharpgen.linalg._reduce.dot`).
    """
    device = a[0].device
    pairs = zip(a, b, strict=True)
    dots = [dot(x.reshape(-1), y.reshape(-1)).to(device) for x, y in pairs]  # float64, accurate
    return torch.stack(dots).sum().to(a[0].dtype)


def _coefficient(
    rho: float,
    grad_norm: float | Tensor | None,
    *,
    norm: str,
    normalize: bool,
    grad_scale: float | None,
) -> float | Tensor:
    r"""The scalar multiplying the direction ($T^2 g$ or $T \operatorname{sign} g$)."""
    if norm == "linf":
        return rho
    if not normalize:
        return rho / (grad_scale if grad_scale is not None else 1.0)
    if grad_norm is None:
        raise ValueError("grad_norm is needed for the normalized l2 perturbation.")
    if isinstance(grad_norm, Tensor):  # no host synchronization (usable under vmap)
        positive = grad_norm > 0
        return torch.where(positive, rho / torch.where(positive, grad_norm, 1.0), 0.0)
    return rho / grad_norm if grad_norm > 0 else 0.0


def _directions(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    norm: str,
    adaptive: bool,
    eta: float,
    foreach: bool,
) -> list[Tensor]:
    r"""$T_w^2 g$ (``l2``; the gradients when not adaptive) or $T_w \operatorname{sign} g$."""
    if norm == "linf":
        if foreach:
            out = list(torch._foreach_sign(list(grads)))
            if adaptive:
                t = torch._foreach_abs(list(params))
                torch._foreach_add_(t, eta)
                torch._foreach_mul_(out, t)
            return out
        if adaptive:
            pairs = zip(params, grads, strict=True)
            return [torch.sign(g).mul_(p.abs().add_(eta)) for p, g in pairs]
        return [torch.sign(g) for g in grads]
    if not adaptive:
        return list(grads)
    if foreach:
        scales = torch._foreach_abs(list(params))
        torch._foreach_add_(scales, eta)
        scaled = torch._foreach_mul(list(grads), scales)
        torch._foreach_mul_(scaled, scales)
        return list(scaled)
    result = []
    for p, g in zip(params, grads, strict=True):
        s = p.abs().add_(eta)
        result.append(g * s * s)
    return result


def _steps(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    grad_norm: float | Tensor | None,
    *,
    norm: str,
    adaptive: bool,
    eta: float,
    normalize: bool,
    grad_scale: float | None,
    foreach: bool,
) -> tuple[list[Tensor], float | Tensor]:
    r"""The directions $d_i$ and the coefficient $c$ of $\varepsilon_i = c\, d_i$."""
    coef = _coefficient(rho, grad_norm, norm=norm, normalize=normalize, grad_scale=grad_scale)
    directions = _directions(params, grads, norm=norm, adaptive=adaptive, eta=eta, foreach=foreach)
    return directions, coef


def sam_perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    rho: float,
    grad_norm: float | Tensor | None,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    normalize: bool = True,
    grad_scale: float | None = None,
    foreach: bool = False,
) -> None:
    r"""Move ``params`` to $w + \varepsilon$ in place (the first half of a SAM step).

    Args:
        params: The tensors $w$ to perturb (modified in place, under `torch.no_grad`).
        grads: Their gradients $g$ (possibly scaled by ``grad_scale``).
        rho: Radius $\rho \ge 0$.
        grad_norm: $\|T_w g\|_2$ over every tensor of the step (`sam_grad_norms` +
            `total_norm`), a float or a 0-dim tensor; only used by the normalized ``l2`` form.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: ASAM scaling $T_w = \operatorname{diag}(|w| + \eta)$.
        eta: $\eta$ of the ASAM scaling.
        normalize: ``False`` for USAM.
        grad_scale: The factor the gradients carry (AMP); only USAM depends on it.
        foreach: Use the multi-tensor ``torch._foreach_*`` kernels.

    Examples:
        >>> import torch
        >>> w, g = [torch.zeros(2)], [torch.tensor([3.0, 4.0])]
        >>> sam_perturb_(w, g, rho=0.5, grad_norm=5.0)
        >>> w[0].tolist()
        [0.30000001192092896, 0.4000000059604645]
    """
    with torch.no_grad():
        directions, coef = _steps(
            params, grads, rho, grad_norm, norm=norm, adaptive=adaptive, eta=eta,
            normalize=normalize, grad_scale=grad_scale, foreach=foreach,
        )  # fmt: skip
        if isinstance(coef, Tensor):  # no host synchronization (usable under vmap)
            directions = [d * coef.to(d.device) for d in directions]
            coef = 1.0
        if foreach:
            torch._foreach_add_(list(params), directions, alpha=coef)
        else:
            for p, d in zip(params, directions, strict=True):
                p.add_(d, alpha=coef)


def sam_perturbation_list(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    rho: float,
    grad_norm: float | Tensor | None,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    normalize: bool = True,
    grad_scale: float | None = None,
) -> list[Tensor]:
    r"""The perturbations $\varepsilon_i$ as new tensors (single-tensor, usable under vmap).

    The arguments are those of `sam_perturb_`; the results have the dtypes of ``params``.

    Examples:
        >>> import torch
        >>> w, g = [torch.zeros(2)], [torch.tensor([3.0, -4.0])]
        >>> sam_perturbation_list(w, g, rho=0.5, grad_norm=None, norm="linf")[0].tolist()
        [0.5, -0.5]
    """
    with torch.no_grad():
        directions, coef = _steps(
            params, grads, rho, grad_norm, norm=norm, adaptive=adaptive, eta=eta,
            normalize=normalize, grad_scale=grad_scale, foreach=False,
        )  # fmt: skip
        return [
            (d * (coef.to(d.device) if isinstance(coef, Tensor) else coef)).to(dtype=p.dtype)
            for p, d in zip(params, directions, strict=True)
        ]
