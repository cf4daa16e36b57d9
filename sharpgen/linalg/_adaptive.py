r"""Adaptive trace estimation: Hutchinson or Hutch++, decided from the probes already bought.

The first probes are Rademacher vectors $\Omega = [\omega_1, \dots, \omega_s]$ with
$Y = A\Omega$. They serve twice: $\omega_i^\top y_i$ are Hutchinson samples, and $Y$ is the
range sketch Hutch++ would deflate with. From them alone (no further products):

* $v_H$, the sample variance of the $\omega_i^\top y_i$: the per-probe variance of
  Rademacher Hutchinson;
* $F = \frac1s \sum_i \|y_i\|^2$, unbiased for $\|A\|_F^2$;
* $F_\perp = \frac1s \sum_i \|(I - P_{-i})\, y_i\|^2$, $P_{-i}$ the projector onto the other
  columns of $Y$: unbiased for $\mathbb{E}\,\|(I - P)A\|_F^2$ with a sketch of $s - 1$ probes
  (the leave-one-out idea of Persson, Cortinovis & Kressner 2022 and of XTrace).

With Rademacher probes the remainder of Hutch++ has per-probe variance
$2(\|R\|_F^2 - \sum_j R_{jj}^2) \le 2\|(I-P)A\|_F^2$, $R = (I-P)A(I-P)$, so $2F_\perp$ is a
pessimistic prediction of it. Hutch++ (the sketch, $AQ$ and the remainder) is chosen only when
its predicted variance is below Hutchinson's at the same number of products; otherwise the
sketch probes simply count as Hutchinson samples and nothing was wasted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sharpgen.linalg._hutchinson import MIN_ADAPTIVE_SAMPLES, mean_and_stderr, next_round
from sharpgen.linalg._hutchpp import _HutchppState
from sharpgen.linalg._operator import LinearOperator
from sharpgen.linalg._probes import draw_probes
from sharpgen.linalg._results import TraceEstimate
from sharpgen.linalg._sketch import extend_basis

__all__ = ["adaptive_trace", "doubling_factor", "loo_residual_sq"]

#: Sketch probes drawn before the first decision in ``rtol`` mode.
PILOT_PROBES = 16


def loo_residual_sq(Y: Tensor) -> Tensor:
    r"""$\|(I - P_{-i})\, y_i\|^2$ for every column $y_i$ of ``Y`` (``P_{-i}``: the others).

    With $Y = QR$, the residual of column $i$ against the other columns has squared norm
    $1 / [(R^\top R)^{-1}]_{ii} = 1/\|R^{-\top} e_i\|^2$. Columns that are numerically in the
    span of the others get 0 (a tiny pivot is replaced by a tiny number, not inverted).
    """
    s = Y.shape[1]
    if s < 2:
        return (Y * Y).sum(0)
    R = torch.linalg.qr(Y.to(torch.float64), mode="r").R
    scale = float(R.abs().max()) if R.numel() else 0.0
    floor = max(1e3 * torch.finfo(Y.dtype).eps * scale, torch.finfo(torch.float64).tiny)
    diag = R.diagonal()
    safe = torch.where(diag.abs() < floor, torch.full_like(diag, floor), diag)
    R = R - torch.diag(diag) + torch.diag(safe)
    eye = torch.eye(s, dtype=R.dtype, device=R.device)
    Rinv_t = torch.linalg.solve_triangular(R.T, eye, upper=False)  # R^{-T}
    return 1.0 / (Rinv_t * Rinv_t).sum(0)


class _Pilot:
    """Rademacher sketch probes, their products and the statistics the decision needs."""

    def __init__(self, op: LinearOperator, generator: torch.Generator | None) -> None:
        self.op = op
        self.generator = generator
        n = op.shape[0]
        self.Omega = torch.empty(n, 0, dtype=op.dtype, device=op.device)
        self.Y = self.Omega

    def draw(self, k: int) -> Tensor:
        return draw_probes(
            self.op.shape[0], k, distribution="rademacher", generator=self.generator,
            dtype=self.op.dtype, device=self.op.device,
        )  # fmt: skip

    def grow(self, k: int) -> None:
        Om = self.draw(k)
        self.Y = torch.cat([self.Y, self.op.matmat(Om)], dim=1)
        self.Omega = torch.cat([self.Omega, Om], dim=1)

    @property
    def size(self) -> int:
        return self.Omega.shape[1]

    def samples(self) -> Tensor:
        return (self.Omega * self.Y).sum(0).to(torch.float64)

    def variances(self, cols: int | None = None) -> tuple[float, float]:
        """Per-probe variance of Hutchinson and predicted per-probe variance of the remainder."""
        cols = self.size if cols is None else cols
        h = self.samples()[:cols]
        v_h = float(h.var(unbiased=True)) if cols > 1 else math.inf
        v_d = 2.0 * float(loo_residual_sq(self.Y[:, :cols]).mean())
        return v_h, v_d


def _hutchinson_result(samples: Tensor, spent: int, converged: bool, rtol: float | None):
    value, stderr = mean_and_stderr(samples)
    return TraceEstimate(
        value=value, stderr=stderr, num_matvecs=spent, method="hutchinson",
        samples=samples, converged=converged, rtol=rtol,
    )  # fmt: skip


def _run_hutchinson(pilot: _Pilot, rtol: float | None, budget: int, start: int) -> TraceEstimate:
    op = pilot.op
    samples = pilot.samples()
    if rtol is None:
        extra = budget - (op.num_matvecs - start)
        if extra > 0:
            Z = pilot.draw(extra)
            samples = torch.cat([samples, (Z * op.matmat(Z)).sum(0).to(torch.float64)])
        return _hutchinson_result(samples, op.num_matvecs - start, True, None)
    while True:
        value, stderr = mean_and_stderr(samples)
        if samples.numel() >= MIN_ADAPTIVE_SAMPLES and stderr <= rtol * abs(value):
            return _hutchinson_result(samples, op.num_matvecs - start, True, rtol)
        left = budget - (op.num_matvecs - start)
        if left <= 0:
            return _hutchinson_result(samples, op.num_matvecs - start, False, rtol)
        k = min(left, next_round(samples.numel(), stderr, rtol * abs(value), 1))
        Z = pilot.draw(k)
        samples = torch.cat([samples, (Z * op.matmat(Z)).sum(0).to(torch.float64)])


def _run_hutchpp(
    pilot: _Pilot, rtol: float | None, budget: int, start: int, first_round: int
) -> TraceEstimate:
    """Hutch++ deflating with the pilot's sketch; the remainder probes are fresh Rademacher."""
    op = pilot.op
    state = _HutchppState(op, "rademacher", pilot.generator)
    scale = float(torch.linalg.vector_norm(pilot.Y, dim=0).max())
    state.Q = extend_basis(state.Q, pilot.Y, scale)
    state.Z = op.matmat(state.Q) if state.Q.shape[1] else state.Z
    state.Y = pilot.Y
    state.scale = scale
    converged = True
    if rtol is None:
        state.grow(0, budget - (op.num_matvecs - start))
    else:
        converged = _grow_to_rtol(state, rtol, budget, start, first_round)
    trace_q, samples = state.estimate()
    mean, stderr = mean_and_stderr(samples)
    return TraceEstimate(
        value=trace_q + mean, stderr=stderr, num_matvecs=op.num_matvecs - start,
        method="hutchpp", samples=samples.detach(), converged=converged, rtol=rtol,
    )  # fmt: skip


def _grow_to_rtol(
    state: _HutchppState, rtol: float, budget: int, start: int, first_round: int
) -> bool:
    """Add remainder probes (or double the sketch, when predicted to pay) until ``rtol``."""
    op = state.op
    state.grow(0, max(1, min(budget - (op.num_matvecs - start), first_round)))
    while True:
        trace_q, samples = state.estimate()
        mean, stderr = mean_and_stderr(samples)
        target = rtol * abs(trace_q + mean)
        count = samples.numel()
        if count >= MIN_ADAPTIVE_SAMPLES and stderr <= target:
            return True
        left = budget - (op.num_matvecs - start)
        if left <= 0:
            return False
        if _doubling_pays(state, count, stderr, target, left):
            state.grow(state.Y.shape[1], 0)
            continue
        k = next_round(count, stderr, target, 1)
        if count < MIN_ADAPTIVE_SAMPLES:
            k = max(k, MIN_ADAPTIVE_SAMPLES - count)
        state.grow(0, min(left, k))


def _remainder_frobenius(Q: Tensor, Z: Tensor, G: Tensor, AG: Tensor) -> float:
    r"""$\frac1N \sum_j \|R g_j\|^2$, unbiased for $\|R\|_F^2$, $R = (I-QQ^\top)A(I-QQ^\top)$.

    $R g = (I - QQ^\top)(Ag - Z Q^\top g)$ with ``Z`` $= AQ$: no product is needed.
    """
    W = AG - Z @ (Q.T @ G)
    W = W - Q @ (Q.T @ W)
    return float((W * W).sum(0).mean())


def doubling_factor(state: _HutchppState) -> float:
    r"""Predicted factor on Hutch++'s remainder variance if its sketch of $s$ probes doubled.

    The remainder probes $g_j$ already drawn measure $F_c = \|R_c\|_F^2$, the Frobenius norm
    of the remainder left by the nested sketch of the first $c$ sketch products, for
    $c \in \{s/2, 3s/4, s\}$ ($A Q_c = Z Q^\top Q_c$, since $Q_c$ lies in the span of $Q$:
    no products). Each $c < s$ gives the power-law extrapolation
    $(F_s / F_c)^{\log 2 / \log(s/c)}$; the larger is returned (at most 1). So a one-off
    drop across a rank edge, which a larger sketch does not repeat, is not extrapolated once
    the sketch is a third past it. The Frobenius norms, averages of $n$-dimensional squared
    norms, are far less noisy than the sample variances of a few quadratic forms. (The
    leave-one-out residual the first decision uses cannot serve here: just past a rank edge
    it overstates the remainder several times, since the other columns carry noise into the
    projection.)
    """
    s = state.Y.shape[1]
    if state.G.shape[1] < 1:
        return 1.0
    f_s = _remainder_frobenius(state.Q, state.Z, state.G, state.AG)
    empty = state.Q[:, :0]
    factors = []
    for c in sorted({s // 2, (3 * s) // 4}):
        if c < 2 or c >= s:
            continue
        Q_c = extend_basis(empty, state.Y[:, :c], state.scale)
        f_c = _remainder_frobenius(Q_c, state.Z @ (state.Q.T @ Q_c), state.G, state.AG)
        if f_c > 0:
            factors.append(min(1.0, f_s / f_c) ** (math.log(2) / math.log(s / c)))
    return max(factors, default=1.0)


def _doubling_pays(
    state: _HutchppState, count: int, stderr: float, target: float, left: int
) -> bool:
    """Is doubling the sketch ($2s$ products) predicted to cost less than staying with it?"""
    s = state.Y.shape[1]
    n = state.op.shape[0]
    if count < 2 or 2 * s > left or state.Q.shape[1] + s > n or not target > 0:
        return False
    need = count * (stderr / target) ** 2  # remainder samples the current sketch needs
    if need - count <= 2 * s:
        return False
    grown = 2 * s + max(0.0, need * doubling_factor(state) - count)
    return grown < need - count


def _fixed_budget(pilot: _Pilot, budget: int, start: int) -> TraceEstimate:
    n = pilot.op.shape[0]
    sketch = min(budget // 3, n)
    if sketch < 2:
        pilot.grow(budget)
        return _run_hutchinson(pilot, None, budget, start)
    pilot.grow(sketch)
    v_h, v_d = pilot.variances()
    remainder = budget - 2 * sketch
    if remainder > 0 and v_d / remainder < v_h / budget:
        return _run_hutchpp(pilot, None, budget, start, remainder)
    return _run_hutchinson(pilot, None, budget, start)


def _target_budget(pilot: _Pilot, rtol: float, max_matvecs: int, start: int) -> TraceEstimate:
    """``rtol`` mode: grow the sketch while that is predicted to pay, then pick the cheaper."""
    op = pilot.op
    n = op.shape[0]
    pilot.grow(min(PILOT_PROBES, max_matvecs, n))
    while True:
        s = pilot.size
        value = float(pilot.samples().mean())
        target_var = (rtol * value) ** 2 if value != 0 else math.inf
        v_h, v_d = pilot.variances()
        cost_h = v_h / target_var  # products Hutchinson needs in all
        cost_d = 2 * s + v_d / target_var  # sketch + AQ + remainder
        # power-law extrapolation of the remainder variance to a sketch twice as large, from
        # its local decay between 3s/4 and s probes (a sketch that already holds the
        # dominant range, e.g. just past a rank edge, predicts no further gain)
        prev = max(2, (3 * s) // 4)
        _, v_prev = pilot.variances(prev)
        decay = min(1.0, v_d / v_prev) if v_prev > 0 else 1.0
        ratio = decay ** (math.log(2) / math.log(s / prev)) if s > prev else 1.0
        cost_2d = 4 * s + v_d * ratio / target_var
        if cost_d < cost_h and 2 * s < max_matvecs:
            # the first round at most s probes: v_d overstates the remainder near a rank edge
            first = max(MIN_ADAPTIVE_SAMPLES, min(s, math.ceil(v_d / target_var / 2)))
            return _run_hutchpp(pilot, rtol, max_matvecs, start, first)
        room = 4 * s <= max_matvecs and 2 * s <= n
        if room and cost_2d < cost_h and cost_h > s:
            pilot.grow(s)
            continue
        return _run_hutchinson(pilot, rtol, max_matvecs, start)


def adaptive_trace(
    op: LinearOperator,
    *,
    num_matvecs: int | None,
    rtol: float | None,
    max_matvecs: int,
    generator: torch.Generator | None,
) -> TraceEstimate:
    r"""Hutchinson or Hutch++ with Rademacher probes, chosen from the first probes' statistics.

    Fixed budget $m$: $s = \lfloor m/3 \rfloor$ sketch probes; Hutch++ (remainder of
    $m - 2s$ probes) is used when $2F_\perp/(m - 2s) < v_H/m$, else the sketch probes are the
    first $s$ of $m$ Hutchinson probes (see the module docstring for $v_H$ and $F_\perp$).

    Target ``rtol``: 16 sketch probes. Hutch++ is run when its predicted cost (with the
    pessimistic $2F_\perp$) is below Hutchinson's; otherwise the sketch is doubled while a
    sketch twice as large is predicted to make Hutch++ the cheaper (remainder variance
    extrapolated as a power of the sketch size from its local decay between the first
    $3s/4$ probes and all $s$), and Hutchinson is run when it never is. Both add probes in
    rounds sized by the measured standard error (growing the samples by at most 1.5 times
    per round) until ``stderr <= rtol * |value|`` or ``max_matvecs``. Hutch++'s first
    round is at most $s$ remainder probes; before each further round it doubles its sketch
    instead when `doubling_factor`, measured on the remainder probes already drawn,
    predicts that this costs fewer products in all. The arguments are validated by
    `sharpgen.linalg.trace`.

    The returned ``method`` is ``"hutchinson"`` or ``"hutchpp"``; both report the standard
    error of independent samples. The decision uses the first probes, which the Hutchinson
    branch also averages; its effect on the bias is of second order and below the
    statistical tests' resolution.
    """
    start = op.num_matvecs
    pilot = _Pilot(op, generator)
    if num_matvecs is not None:
        return _fixed_budget(pilot, num_matvecs, start)
    assert rtol is not None
    return _target_budget(pilot, rtol, max_matvecs, start)
