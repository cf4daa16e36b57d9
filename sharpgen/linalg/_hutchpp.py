"""Hutch++: low-rank deflation plus Hutchinson on the remainder."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sharpgen._precision import full_precision_fn
from sharpgen.linalg._checks import check_choice, check_generator, resolve_budget
from sharpgen.linalg._hutchinson import MAX_GROWTH, MIN_ADAPTIVE_SAMPLES, mean_and_stderr
from sharpgen.linalg._operator import LinearOperator, as_linear_operator
from sharpgen.linalg._probes import DISTRIBUTIONS, draw_probes
from sharpgen.linalg._reduce import gram
from sharpgen.linalg._results import TraceEstimate
from sharpgen.linalg._sketch import extend_basis

__all__ = ["hutchpp_trace"]


class _HutchppState:
    """Sketch basis ``Q``, ``Z = A Q``, Hutchinson probes ``G`` and ``A G``, grown in rounds.

    ``Y`` keeps the sketch products $A S$ in the order drawn (nested sub-sketches of its
    first columns lie in the span of ``Q``).
    """

    def __init__(self, op: LinearOperator, distribution: str, generator: torch.Generator | None):
        self.op = op
        self.distribution = distribution
        self.generator = generator
        n = op.shape[0]
        empty = torch.empty(n, 0, dtype=op.dtype, device=op.device)
        self.Q, self.Z, self.G, self.AG, self.Y = empty, empty, empty, empty, empty
        self.scale = 0.0

    def _draw(self, k: int) -> Tensor:
        return draw_probes(
            self.op.shape[0],
            k,
            distribution=self.distribution,
            generator=self.generator,
            dtype=self.op.dtype,
            device=self.op.device,
        )

    def grow(self, num_sketch: int, num_hutch: int) -> None:
        n = self.op.shape[0]
        num_sketch = min(num_sketch, n - self.Q.shape[1])
        if num_sketch > 0:
            Y = self.op.matmat(self._draw(num_sketch))
            self.Y = torch.cat([self.Y, Y], dim=1)
            self.scale = max(self.scale, float(torch.linalg.vector_norm(Y, dim=0).max()))
            Q_add = extend_basis(self.Q, Y, self.scale)
            if Q_add.shape[1]:
                self.Z = torch.cat([self.Z, self.op.matmat(Q_add)], dim=1)
                self.Q = torch.cat([self.Q, Q_add], dim=1)
        if num_hutch > 0:
            G = self._draw(num_hutch)
            self.AG = torch.cat([self.AG, self.op.matmat(G)], dim=1)
            self.G = torch.cat([self.G, G], dim=1)

    def estimate(self) -> tuple[float, Tensor]:
        return deflated_samples(self.Q, self.Z, self.G, self.AG)


def deflated_samples(Q: Tensor, Z: Tensor, G: Tensor, AG: Tensor) -> tuple[float, Tensor]:
    r"""$\operatorname{tr}(Q^\top A Q)$ and the samples $g^\top (I-QQ^\top) A (I-QQ^\top) g$.

    ``Z`` is $AQ$ and ``AG`` is $AG$ (for the columns $g$ of ``G``): no product is needed.
    """
    # products over n summed accurately (`gram`): Q^T A Q holds quadratic forms
    H = gram(Q, Z)
    H = (H + H.T) / 2
    C = gram(Q, G)
    # g^T (I - QQ^T) A (I - QQ^T) g = g^T A g - 2 (Z^T g)^T (Q^T g) + (Q^T g)^T H (Q^T g)
    quad = (G * AG).sum(0).to(torch.float64)
    samples = quad - 2 * (gram(Z, G) * C).sum(0) + (C * (H @ C)).sum(0)
    return float(torch.trace(H)), samples.to(G.dtype)


def next_total(total: int, stderr: float, target: float) -> int:
    """Budget of the next ``rtol`` round: at least 3 more products, at most 1.5 times as many.

    The error is predicted to fall like ``1/m`` (the fast end of Hutch++'s range, reached
    on decaying spectra), so the prediction undershoots rather than overshoots; the cap
    bounds the overshoot of the last round.
    """
    most = max(total + 3, math.ceil(MAX_GROWTH * total))
    if not math.isfinite(stderr) or target <= 0:
        return most
    return max(total + 3, min(most, math.ceil(total * stderr / target)))


@full_precision_fn
def hutchpp_trace(
    A: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    *,
    num_matvecs: int | None = None,
    rtol: float | None = None,
    max_matvecs: int = 1000,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    size: int | None = None,
) -> TraceEstimate:
    r"""Hutch++ estimator of $\operatorname{tr}(A)$ (Meyer, Musco, Musco & Woodruff 2021).

    A third of the budget sketches the range, $Q = \operatorname{orth}(A S)$; a third
    computes $A Q$ for the exact trace of the dominant part; the rest runs Hutchinson on
    the deflated remainder with probes $G$ independent of $S$:

    $$
    \widehat{\operatorname{tr}}(A) = \operatorname{tr}(Q^\top A Q)
    + \frac{1}{N}\sum_{i=1}^{N} g_i^\top (I - QQ^\top) A (I - QQ^\top) g_i .
    $$

    The standard error is that of the remainder samples (the first term is exact given
    $Q$). For a budget $m$: ``m // 3`` sketch probes and ``m - 2 * (m // 3)`` remainder
    probes. With ``rtol`` the three parts grow together from 30 products, each round's
    budget predicted from the error so far as if it fell like $1/m$ (so rounds undershoot
    rather than overshoot) and at most 1.5 times the last (the remainder products $A G$
    are kept, so earlier products are reused when the sketch grows), until
    ``stderr <= rtol * |value|`` or ``max_matvecs``.

    A numerically rank-deficient sketch gives a smaller $Q$ and fewer products
    (``num_matvecs`` reports what was spent). On a flat spectrum Hutch++ is no better
    than Hutchinson; with a few dominant eigenvalues it is much better.

    Args:
        A: Dense symmetric tensor, `LinearOperator` or matvec callable (then pass ``size``).
        num_matvecs: Fixed budget, at least 3.
        rtol: Target relative standard error, instead of ``num_matvecs``.
        max_matvecs: Cap on products when ``rtol`` is given.
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        generator: Source of all randomness; the global RNG is untouched when given.
        size: Dimension, when ``A`` is a callable.

    Returns:
        A `TraceEstimate` (``samples``: the remainder samples; ``stderr`` is ``inf`` when
        there is only one).

    Raises:
        ValueError: On a budget below 3, both or neither of ``num_matvecs`` / ``rtol``, an
            unknown distribution, or a non-square or non-symmetric dense ``A``.
        TypeError: On a wrongly typed argument.

    Examples:
        >>> import torch
        >>> from sharpgen.linalg import hutchpp_trace
        >>> A = torch.diag(torch.tensor([100.0, 1.0, 0.5], dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> est = hutchpp_trace(A, num_matvecs=9, distribution="gaussian", generator=g)
        >>> round(est.value, 6)  # 3 sketch vectors span R^3: exact
        101.5

    References:
        R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal stochastic trace
        estimation", SOSA 2021.
    """
    op = as_linear_operator(A, size=size, check_symmetric=True)
    num_matvecs, rtol, max_matvecs = resolve_budget(
        num_matvecs, rtol, max_matvecs, minimum=3, method="hutchpp_trace"
    )
    distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
    generator = check_generator(generator)

    start = op.num_matvecs
    state = _HutchppState(op, distribution, generator)
    converged = True
    if num_matvecs is not None:
        third = num_matvecs // 3
        state.grow(third, num_matvecs - 2 * third)
        trace_q, samples = state.estimate()
    else:
        assert rtol is not None  # resolve_budget: exactly one of num_matvecs and rtol
        target = min(max(3 * MIN_ADAPTIVE_SAMPLES, 30), max_matvecs)
        while True:
            spent = op.num_matvecs - start
            third = (target - spent) // 3
            state.grow(third, target - spent - 2 * third)
            trace_q, samples = state.estimate()
            mean, stderr = mean_and_stderr(samples)
            if stderr <= rtol * abs(trace_q + mean):
                break
            if target >= max_matvecs or op.num_matvecs - start >= max_matvecs:
                converged = False
                break
            target = min(next_total(target, stderr, rtol * abs(trace_q + mean)), max_matvecs)
    mean, stderr = mean_and_stderr(samples)
    return TraceEstimate(
        value=trace_q + mean,
        stderr=stderr,
        num_matvecs=op.num_matvecs - start,
        method="hutchpp",
        samples=samples.detach(),
        converged=converged,
        rtol=rtol,
    )
