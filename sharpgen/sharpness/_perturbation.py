r"""The first-order worst-case perturbation of SAM and its variants, and the projections.

Pure functions on dictionaries of tensors (no model): they take the gradient $g$ and the
parameters $w$ as ``{name: Tensor}`` and return a perturbation $\varepsilon$ with the same
keys as the parameters. They are shared by the SAM-family optimizers (`sharpgen.optim`) and by
the worst-case sharpness measure (`sharpgen.sharpness`).

Notation. All norms are global, over the concatenation of every tensor of the dict. The
*adaptive* scaling of ASAM (Kwon et al., 2021) is the diagonal operator
$T_w = \operatorname{diag}(|w| + \eta)$; without ``adaptive`` $T_w = I$. The neighbourhood is
$\{\varepsilon : \|T_w^{-1}\varepsilon\|_p \le \rho\}$ with $p = 2$ (``norm="l2"``) or
$p = \infty$ (``norm="linf"``). When ``eta == 0`` a zero weight has $T_i = 0$ and the
neighbourhood is read in the limit sense: $\varepsilon_i = 0$ for every such coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from sharpgen._validation import check_rho, check_tensor_dict
from sharpgen.sharpness._sam_kernel import (
    check_eta,
    check_norm,
    sam_grad_norms,
    sam_perturbation_list,
    total_norm,
)

__all__ = ["project_perturbation", "sam_perturbation"]


def _check_dicts(
    first: Mapping[str, Tensor | None],
    params: Mapping[str, Tensor],
    first_name: str,
) -> None:
    if not isinstance(first, Mapping):
        raise TypeError(
            f"{first_name} must be a dict {{name: Tensor}}, got {type(first).__name__}."
        )
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict {{name: Tensor}}, got {type(params).__name__}.")
    hint = "pass the matching parameter dict (for example dict(model.named_parameters()))."
    check_tensor_dict(
        first_name, first, params, what="in params", hint=hint, reference_name="params"
    )


def _scaling(w: Tensor, adaptive: bool, eta: float) -> Tensor | None:
    """The diagonal of $T_w$ for one tensor, or None for the identity."""
    if not adaptive:
        return None
    return w.detach().abs().add(eta)


# -- the perturbation -----------------------------------------------------------------------
def sam_perturbation(
    grads: Mapping[str, Tensor | None],
    params: Mapping[str, Tensor],
    rho: float,
    *,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    normalize: bool = True,
    check_finite: bool = True,
) -> dict[str, Tensor]:
    r"""The first-order worst-case perturbation $\varepsilon$ used by SAM, ASAM and USAM.

    It maximizes the linearized loss increase $g^\top\varepsilon$ over the neighbourhood
    $\|T_w^{-1}\varepsilon\|_p \le \rho$, with $T_w = \operatorname{diag}(|w| + \eta)$ when
    ``adaptive`` (ASAM) and $T_w = I$ otherwise:

    $$
    \varepsilon_{\ell_2} = \rho\,\frac{T_w^2\, g}{\|T_w\, g\|_2}, \qquad
    \varepsilon_{\ell_\infty} = \rho\, T_w \operatorname{sign}(g).
    $$

    (Substituting $u = T_w^{-1}\varepsilon$ turns the problem into maximizing
    $(T_w g)^\top u$ over $\|u\|_p \le \rho$, whose maximizers are $u = \rho\,T_w g /
    \|T_w g\|_2$ and $u = \rho \operatorname{sign}(T_w g)$.) With ``normalize=False``
    (unnormalized SAM, USAM, Andriushchenko & Flammarion 2022) the step is a plain gradient
    ascent step $\varepsilon = \rho\, T_w^2\, g$; it is only defined for ``norm="l2"``.

    Edge cases: a zero gradient (or $\|T_w g\| = 0$) gives a zero perturbation, never NaN;
    a parameter whose gradient is missing or ``None`` gets a zero perturbation (it does not
    enter the norm); ``rho=0`` gives zeros. The function has no data-dependent Python control
    flow when ``check_finite=False``, so it can be used under `torch.func.vmap`.

    Args:
        grads: Gradients ``{name: Tensor | None}``; keys must be a subset of ``params``.
        params: The parameters $w$ ``{name: Tensor}`` (read only for ``adaptive``; they fix the
            keys, shapes, dtypes and devices of the result).
        rho: Radius $\rho \ge 0$ of the neighbourhood.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: Use the ASAM scaling $T_w = \operatorname{diag}(|w| + \eta)$.
        eta: Offset $\eta \ge 0$ of the adaptive scaling (ignored unless ``adaptive``).
        normalize: ``False`` for USAM ($\varepsilon = \rho T_w^2 g$, ``norm="l2"`` only).
        check_finite: Raise `FloatingPointError` when a gradient is NaN or Inf (one device
            synchronization). Set to ``False`` under `torch.func.vmap` and check the result.

    Returns:
        ``{name: eps}`` with the keys (in order), shapes, dtypes and devices of ``params``;
        the tensors are detached from any autograd graph.

    Raises:
        ValueError: ``rho < 0``, ``eta < 0``, an unknown ``norm``, ``normalize=False`` with
            ``norm="linf"``, keys of ``grads`` not in ``params`` or mismatched shapes.
        TypeError: ``grads``/``params`` not dicts of tensors, ``rho`` not a number.
        FloatingPointError: a non-finite gradient (when ``check_finite``).

    Examples:
        >>> import torch
        >>> from sharpgen.sharpness import sam_perturbation
        >>> g = {"w": torch.tensor([3.0, 4.0])}
        >>> sam_perturbation(g, {"w": torch.zeros(2)}, rho=0.5)["w"].tolist()
        [0.30000001192092896, 0.4000000059604645]
        >>> sam_perturbation(g, {"w": torch.zeros(2)}, rho=0.5, norm="linf")["w"].tolist()
        [0.5, 0.5]

    References:
        Foret, Kleiner, Mobahi & Neyshabur (2021), *Sharpness-Aware Minimization for
        Efficiently Improving Generalization*, ICLR. Kwon, Kim, Park & Choi (2021), *ASAM:
        Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
        Networks*, ICML. Andriushchenko & Flammarion (2022), *Towards Understanding
        Sharpness-Aware Minimization*, ICML.
    """
    rho = check_rho(rho)
    norm = check_norm(norm)
    eta = check_eta(eta)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}.")
    if not normalize and norm != "l2":
        raise ValueError(
            f"normalize=False (unnormalized SAM) is a gradient-ascent step and is only defined "
            f"for norm='l2', got norm={norm!r}; use normalize=True with norm='linf'."
        )
    _check_dicts(grads, params, "grads")
    eps, _ = _perturbation_and_norm(
        grads, params, rho, norm=norm, adaptive=adaptive, eta=eta, normalize=normalize,
        check_finite=check_finite,
    )  # fmt: skip
    return eps


def _perturbation_and_norm(
    grads: Mapping[str, Tensor | None],
    params: Mapping[str, Tensor],
    rho: float,
    *,
    norm: str,
    adaptive: bool,
    eta: float,
    normalize: bool,
    check_finite: bool,
) -> tuple[dict[str, Tensor], Tensor | None]:
    r"""`sam_perturbation` without argument checks; also returns $\|T_w g\|_2$ (or None).

    The norm is None when no parameter has a gradient.
    """
    with torch.no_grad():
        present = {k: g.detach() for k, g in grads.items() if g is not None}
        if check_finite and present:
            finite = torch.stack(
                [torch.isfinite(g).all().to(_first_device(present)) for g in present.values()]
            )
            if not bool(finite.all()):
                bad = [k for k, g in present.items() if not bool(torch.isfinite(g).all())]
                raise FloatingPointError(
                    f"non-finite gradient for {bad[:5]}; the SAM perturbation is undefined "
                    "(check the loss, or lower the learning rate)."
                )
        keys = list(present)
        ps, gs = [params[k] for k in keys], [present[k] for k in keys]
        total = None
        if present:
            total = total_norm(sam_grad_norms(ps, gs, adaptive=adaptive, eta=eta))
        moved = sam_perturbation_list(
            ps, gs, rho=rho, grad_norm=total, norm=norm, adaptive=adaptive, eta=eta,
            normalize=normalize,
        )  # fmt: skip
        by_key = dict(zip(keys, moved, strict=True))
        eps: dict[str, Tensor] = {}
        for k, w in params.items():
            e = by_key.get(k)
            if e is None:
                e = torch.zeros_like(w, memory_format=torch.preserve_format).detach()
            eps[k] = e
    return eps, total


def _first_device(d: Mapping[str, Tensor]) -> torch.device:
    return next(iter(d.values())).device


# -- projections ----------------------------------------------------------------------------
def project_perturbation(
    eps: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    rho: float,
    *,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
) -> dict[str, Tensor]:
    r"""Euclidean projection of $\varepsilon$ onto the set $\|T_w^{-1}\varepsilon\|_p \le \rho$.

    Returns $\operatorname{argmin}_x \|x - \varepsilon\|_2$ over the closed set
    $C = \{x : \|T_w^{-1} x\|_p \le \rho\}$ (the same neighbourhood as `sam_perturbation`), with
    the plain, unweighted Euclidean distance, exactly:

    * ``norm="l2"``, not adaptive (ball): $x = \varepsilon \min(1, \rho / \|\varepsilon\|_2)$.
    * ``norm="linf"`` (box, adaptive or not): $x_i = \operatorname{clip}(\varepsilon_i,
      -\rho t_i, \rho t_i)$ with $t_i = |w_i| + \eta$ (or $1$), which is separable.
    * ``norm="l2"``, adaptive (axis-aligned ellipsoid): if $\varepsilon \in C$ it is returned;
      otherwise the KKT conditions give

      $$
      x_i(\lambda) = \frac{t_i^2\, \varepsilon_i}{t_i^2 + \lambda}, \qquad
      \phi(\lambda) = \sum_i \frac{t_i^2 \varepsilon_i^2}{(t_i^2 + \lambda)^2} = \rho^2,
      $$

      and the multiplier $\lambda > 0$ is found by Newton's method on the secular equation
      $\phi(\lambda)^{-1/2} = \rho^{-1}$ started at $\lambda = 0$. The left-hand side is
      increasing and concave in $\lambda$, so the iterates increase monotonically to the root
      (quadratic convergence, no overshoot); the loop runs to float64 precision and a final
      rescaling by $\min(1, \rho/\|T_w^{-1}x\|_2)$ removes the last rounding so that
      $x \in C$ always holds.

    Coordinates with $t_i = 0$ (zero weight with ``eta=0``) must be zero in $C$ and are set to
    zero; with $\eta > 0$ every $t_i > 0$ and the ellipsoid is non-degenerate.

    Args:
        eps: The point to project ``{name: Tensor}``; keys must be a subset of ``params``.
        params: The parameters $w$ (read only for ``adaptive``).
        rho: Radius $\rho \ge 0$ (``rho=0`` projects onto $\{0\}$).
        norm: ``"l2"`` or ``"linf"``.
        adaptive: Use the ASAM scaling $T_w = \operatorname{diag}(|w| + \eta)$.
        eta: Offset $\eta \ge 0$ of the adaptive scaling (ignored unless ``adaptive``).

    Returns:
        ``{name: x}`` with the keys of ``eps`` (new tensors, detached).

    Raises:
        ValueError: ``rho < 0``, ``eta < 0``, an unknown ``norm``, keys or shapes that do not
            match ``params``.
        TypeError: inputs that are not dicts of tensors.
        FloatingPointError: a non-finite entry in ``eps``.

    Examples:
        >>> import torch
        >>> from sharpgen.sharpness import project_perturbation
        >>> x = project_perturbation({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}, 1.0)
        >>> x["w"].tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    rho = check_rho(rho)
    norm = check_norm(norm)
    eta = check_eta(eta)
    _check_dicts(eps, params, "eps")
    for k, v in eps.items():
        if v is None:
            raise TypeError(f"eps[{k!r}] is None; pass a tensor (zeros for no perturbation).")
    with torch.no_grad():
        e = {k: v.detach() for k, v in eps.items()}
        if e and not all(bool(torch.isfinite(v).all()) for v in e.values()):
            raise FloatingPointError("eps contains NaN or Inf; cannot project it.")
        t = {k: _scaling(params[k], adaptive, eta) for k in e}
        if norm == "linf":
            out = {}
            for k, v in e.items():
                scale = t[k]
                if scale is None:
                    out[k] = v.clamp(-rho, rho)
                else:
                    bound = scale * rho
                    out[k] = torch.minimum(torch.maximum(v, -bound), bound)
            return out
        if not adaptive:
            total = _global_norm(e.values())
            factor = 1.0 if total <= rho else rho / total
            return {k: v * factor for k, v in e.items()}
        return _project_ellipsoid(e, t, rho)  # type: ignore[arg-type]


def _global_norm(tensors) -> float:
    acc = 0.0
    for v in tensors:
        acc += float(torch.linalg.vector_norm(v.to(torch.float64)) ** 2)
    return math.sqrt(acc)


def _project_ellipsoid(e: dict[str, Tensor], t: dict[str, Tensor], rho: float) -> dict[str, Tensor]:
    r"""Exact Euclidean projection onto $\{x : \sum_i (x_i / t_i)^2 \le \rho^2\}$."""
    # zero the degenerate coordinates (t_i = 0 forces x_i = 0)
    e = {k: torch.where(t[k] > 0, v, torch.zeros_like(v)) for k, v in e.items()}
    if not e:
        return {}
    # float64 copies of a_i = (t_i e_i)^2 and d_i = t_i^2 on the positive-t coordinates
    d = torch.cat([t[k].to(torch.float64).reshape(-1) ** 2 for k in e])
    ev = torch.cat([e[k].to(torch.float64).reshape(-1) for k in e])
    keep = d > 0
    d, ev = d[keep], ev[keep]
    a = d * ev * ev

    def phi(lam: float) -> Tensor:
        return (a / (d + lam) ** 2).sum()

    # feasibility in the metric of T^{-1}: sum e_i^2 / t_i^2
    inside = float((ev * ev / d).sum()) if d.numel() else 0.0
    if inside <= rho * rho:
        return e
    if rho == 0.0:
        return {k: torch.zeros_like(v) for k, v in e.items()}
    lam = 0.0
    for _ in range(200):
        p = phi(lam)
        dp = -2.0 * (a / (d + lam) ** 3).sum()
        psi = float(p.rsqrt()) - 1.0 / rho
        if psi >= 0.0:
            break
        dpsi = float(-0.5 * p.pow(-1.5) * dp)
        step = -psi / dpsi
        if not step > lam * 1e-16:
            break
        lam += step
    out = {}
    for k, v in e.items():
        t2 = t[k].to(torch.float64) ** 2
        shrink = torch.where(t2 > 0, t2 / (t2 + lam), torch.zeros_like(t2))
        out[k] = (v.to(torch.float64) * shrink).to(v.dtype)
    # remove the last rounding so that the result is feasible
    ratio = math.sqrt(
        sum(
            float(
                (torch.where(t[k] > 0, out[k] / t[k], torch.zeros_like(out[k])).double() ** 2).sum()
            )
            for k in out
        )
    )
    if ratio > rho:
        out = {k: v * (rho / ratio) for k, v in out.items()}
    return out
