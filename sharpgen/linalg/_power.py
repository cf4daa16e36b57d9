"""Power iteration: a baseline for the dominant eigenvalue (use `lanczos` in practice)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sharpgen._precision import full_precision_fn
from sharpgen.linalg._checks import check_generator, check_positive_float, check_positive_int
from sharpgen.linalg._lanczos import convergence_threshold
from sharpgen.linalg._operator import LinearOperator, as_linear_operator
from sharpgen.linalg._probes import random_unit_vector
from sharpgen.linalg._reduce import dot, norm
from sharpgen.linalg._results import EigenResult

__all__ = ["power_iteration"]


@full_precision_fn
def power_iteration(
    A: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    *,
    tol: float = 1e-3,
    max_iter: int = 1000,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    size: int | None = None,
) -> EigenResult:
    r"""The eigenvalue of largest magnitude by power iteration — a baseline only.

    $v \leftarrow Av/\|Av\|$ with the Rayleigh quotient $\theta = v^\top A v$, stopped by
    the same rigorous residual test as `lanczos`:
    $\|Av - \theta v\| \le \mathrm{tol}\,|\theta|/(1+\mathrm{tol})$. Convergence is linear
    with rate $|\lambda_2/\lambda_1|$, so with a close gap it needs many more products than
    `lanczos`, which is the method to use; power iteration is here for comparisons (it is
    what PyHessian's ``eigenvalues`` does, with a weaker stop rule).

    Args:
        A: Dense symmetric tensor, `LinearOperator` or matvec callable (then pass ``size``).
        tol: Relative tolerance of the residual test.
        max_iter: Cap on iterations (one product each).
        v0: Start vector of shape ``(n,)``; random Gaussian (from ``generator``) if None.
        generator: Source of randomness; the global RNG is untouched when given.
        size: Dimension, when ``A`` is a callable.

    Returns:
        An `EigenResult` with one eigenpair (``which="magnitude"``).

    Raises:
        ValueError: On ``tol <= 0``, ``max_iter < 1``, a bad ``v0``, or a non-square or
            non-symmetric dense ``A``.
        TypeError: On a wrongly typed argument.

    Examples:
        >>> import torch
        >>> from sharpgen.linalg import power_iteration
        >>> A = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))
        >>> res = power_iteration(A, tol=1e-8, generator=torch.Generator().manual_seed(0))
        >>> round(float(res), 6), res.converged
        (4.0, True)
    """
    op = as_linear_operator(A, size=size, check_symmetric=True)
    tol = check_positive_float("tol", tol, hint="pass a relative tolerance such as 1e-3.")
    max_iter = check_positive_int("max_iter", max_iter)
    generator = check_generator(generator)
    n = op.shape[0]
    if v0 is None:
        v = random_unit_vector(n, generator=generator, dtype=op.dtype, device=op.device)
    else:
        if not isinstance(v0, Tensor) or v0.shape != (n,):
            raise ValueError(f"v0 must be a tensor of shape ({n},).")
        v = v0.detach().to(dtype=op.dtype, device=op.device)
        length = norm(v)
        if not torch.isfinite(length) or length == 0:
            raise ValueError("v0 must be a finite nonzero vector; pass v0=None for a random one.")
        v = v / length.to(v.dtype)
    start = op.num_matvecs
    converged = False
    it = 0
    while it < max_iter:
        it += 1
        w = op.matvec(v)
        theta = dot(v, w).to(v.dtype)  # accurate: a sum of n terms, maybe of one sign
        resid = norm(w - theta * v).to(v.dtype)
        value = float(theta)
        if float(resid) <= convergence_threshold(value, abs(value), tol, op.dtype):
            converged = True
            break
        length = norm(w)
        if length == 0:  # v in the null space: theta = 0 is exact
            converged = True
            break
        v = w / length.to(w.dtype)
    return EigenResult(
        eigenvalues=theta.reshape(1),
        eigenvectors=v.reshape(n, 1),
        residuals=resid.reshape(1),
        converged=converged,
        num_matvecs=op.num_matvecs - start,
        num_iterations=it,
        method="power_iteration",
        which="magnitude",
        tol=tol,
    )
