"""Hutchinson's stochastic trace estimator."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sharpgen._precision import full_precision_fn
from sharpgen.linalg._checks import (
    check_choice,
    check_generator,
    check_positive_int,
    resolve_budget,
)
from sharpgen.linalg._operator import LinearOperator, as_linear_operator
from sharpgen.linalg._probes import DISTRIBUTIONS, draw_probes
from sharpgen.linalg._reduce import column_dots as accurate_column_dots
from sharpgen.linalg._results import TraceEstimate

__all__ = ["hutchinson_trace"]

#: Samples drawn before the relative-standard-error stopping test is first applied.
MIN_ADAPTIVE_SAMPLES = 10
#: Largest factor by which an ``rtol`` round grows the products spent so far: the last
#: round overshoots the first sufficient budget by at most this factor.
MAX_GROWTH = 1.5


def mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    """Sample mean and its standard error ``std(ddof=1) / sqrt(N)`` (``inf`` if N < 2)."""
    n = samples.numel()
    mean = float(samples.mean())
    if n < 2:
        return mean, math.inf
    return mean, float(samples.std(unbiased=True)) / math.sqrt(n)


def column_dots(X: Tensor, Y: Tensor) -> Tensor:
    r"""$(x_j^\top y_j)_j$ for the columns of two ``(n, k)`` blocks, in their dtype.

    Summed accurately (`sharpgen.linalg._reduce.column_dots`, float64 block sums): the
    quadratic form of a probe, a sum of terms that may share one sign, is what
    ``torch.dot`` gets $10^{-3}$ wrong in float32 at $n = 3\cdot 10^7$. No ``(n, k)`` copy.

    Examples:
        >>> import torch
        >>> column_dots(torch.ones(3, 2), torch.arange(6.0).reshape(3, 2)).tolist()
        [6.0, 9.0]
    """
    return accurate_column_dots(X, Y).to(X.dtype)


def next_round(count: int, stderr: float, target: float, minimum: int = 1) -> int:
    """Samples to add so that ``stderr`` (of ``count`` samples) is predicted to reach ``target``.

    The standard error is taken to fall like ``1/sqrt(count)``; at least ``minimum``, at most
    ``(MAX_GROWTH - 1) * count`` (so the total grows by at most ``MAX_GROWTH``).
    """
    most = max(minimum, math.ceil((MAX_GROWTH - 1) * count))
    if not math.isfinite(stderr) or target <= 0:
        return most
    need = math.ceil(count * (stderr / target) ** 2) - count
    return max(minimum, min(need, most))


@full_precision_fn
def hutchinson_trace(
    A: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    *,
    num_matvecs: int | None = None,
    rtol: float | None = None,
    max_matvecs: int = 1000,
    distribution: str = "rademacher",
    block_size: int = 32,
    generator: torch.Generator | None = None,
    size: int | None = None,
) -> TraceEstimate:
    r"""Hutchinson's estimator of $\operatorname{tr}(A)$ (and of $\|A\|_F^2$ on the side).

    $$
    \widehat{\operatorname{tr}}(A) = \frac{1}{N}\sum_{i=1}^{N} z_i^\top A z_i,
    \qquad
    \widehat{\|A\|_F^2} = \frac{1}{N}\sum_{i=1}^{N} \|A z_i\|^2,
    $$

    with independent probes $z_i$ satisfying $\mathbb{E}[z z^\top] = I$ (Rademacher or
    Gaussian), so both are unbiased. The standard error is the sample standard deviation
    over $\sqrt{N}$. For Rademacher probes the variance is
    $2(\|A\|_F^2 - \sum_i A_{ii}^2)/N$, for Gaussian ones $2\|A\|_F^2/N$.

    Give either a fixed budget ``num_matvecs`` or a target relative standard error
    ``rtol``: then 10 probes are drawn, then rounds sized by the measured standard error
    (the count predicted to reach the target, growing the total by at most 1.5 times, at
    most ``block_size``)
    until ``stderr <= rtol * |value|`` or ``max_matvecs`` products are spent;
    ``converged`` says which happened.

    Args:
        A: Dense symmetric tensor, `LinearOperator` or matvec callable (then pass ``size``).
        num_matvecs: Fixed number of probes (one product each).
        rtol: Target relative standard error, instead of ``num_matvecs``.
        max_matvecs: Cap on products when ``rtol`` is given.
        distribution: ``"rademacher"`` (lower variance, the default) or ``"gaussian"``.
        block_size: Probes per block product (memory ``2 * n * block_size`` numbers: one
            block of probes and its products is alive at a time, and only the per-probe
            estimates are kept).
        generator: Source of all randomness; the global RNG is untouched when given.
        size: Dimension, when ``A`` is a callable.

    Returns:
        A `TraceEstimate` with ``frobenius_sq`` filled in.

    Raises:
        ValueError: On a non-square or non-symmetric dense ``A``, both or neither of
            ``num_matvecs`` / ``rtol``, a non-positive budget, or an unknown distribution.
        TypeError: On a wrongly typed argument.

    Examples:
        >>> import torch
        >>> from sharpgen.linalg import hutchinson_trace
        >>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
        >>> est = hutchinson_trace(A, num_matvecs=8, generator=torch.Generator().manual_seed(0))
        >>> est.value  # exact for a diagonal matrix with Rademacher probes
        6.0

    References:
        M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines", Comm. Statist. Simulation Comput., 1989.
    """
    op = as_linear_operator(A, size=size, check_symmetric=True)
    num_matvecs, rtol, max_matvecs = resolve_budget(
        num_matvecs, rtol, max_matvecs, minimum=1, method="hutchinson_trace"
    )
    distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
    block_size = check_positive_int("block_size", block_size)
    generator = check_generator(generator)

    n = op.shape[0]
    start = op.num_matvecs
    budget = num_matvecs if num_matvecs is not None else max_matvecs
    quad: list[Tensor] = []
    frob: list[Tensor] = []
    drawn = 0
    converged = True
    want = MIN_ADAPTIVE_SAMPLES  # rtol mode: the next round's size, predicted from the stderr
    while drawn < budget:
        b = min(block_size, budget - drawn)
        if rtol is not None:
            b = min(b, want)
        Z = draw_probes(
            n, b, distribution=distribution, generator=generator, dtype=op.dtype, device=op.device
        )
        AZ = op.matmat(Z)
        quad.append(column_dots(Z, AZ))
        frob.append(column_dots(AZ, AZ))
        del Z, AZ  # before the next block is drawn: one block alive at a time
        drawn += b
        if rtol is not None and drawn >= MIN_ADAPTIVE_SAMPLES:
            value, stderr = mean_and_stderr(torch.cat(quad))
            if stderr <= rtol * abs(value):
                break
            want = next_round(drawn, stderr, rtol * abs(value))
    else:
        if rtol is not None:
            value, stderr = mean_and_stderr(torch.cat(quad))
            converged = stderr <= rtol * abs(value)

    samples = torch.cat(quad)
    value, stderr = mean_and_stderr(samples)
    frob_value, frob_stderr = mean_and_stderr(torch.cat(frob))
    return TraceEstimate(
        value=value,
        stderr=stderr,
        num_matvecs=op.num_matvecs - start,
        method="hutchinson",
        samples=samples.detach(),
        converged=converged,
        rtol=rtol,
        frobenius_sq=frob_value,
        frobenius_sq_stderr=frob_stderr,
    )
