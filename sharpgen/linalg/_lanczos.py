"""Lanczos with partial (or full) reorthogonalization and thick restart, for extreme eigenpairs."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from sharpgen._precision import full_precision
from sharpgen.linalg._basis import STORAGES, Basis
from sharpgen.linalg._checks import (
    check_choice,
    check_generator,
    check_positive_float,
    check_positive_int,
)
from sharpgen.linalg._operator import LinearOperator, as_linear_operator
from sharpgen.linalg._probes import random_unit_vector
from sharpgen.linalg._reduce import column_norms, norm
from sharpgen.linalg._reorth import REORTH, Full, Partial, explicit, unit_bounds, verify
from sharpgen.linalg._results import EigenResult
from sharpgen.linalg._ritz import (
    check_basis_dtype,
    convergence_threshold,
    error_bounds,
    output_order,
    wanted_list,
    wanted_order,
)

__all__ = [
    "BOUNDS",
    "WHICH",
    "check_basis_dtype",
    "convergence_threshold",
    "error_bounds",
    "lanczos",
]

WHICH = ("largest", "smallest", "both_ends", "magnitude")
BOUNDS = ("residual", "gap")


def lanczos(
    A: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    k: int = 1,
    *,
    which: str = "largest",
    tol: float = 1e-3,
    max_iter: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_basis: int | None = None,
    size: int | None = None,
    bound: str = "residual",
    basis_storage: str = "device",
    basis_dtype: torch.dtype | None = None,
    basis_dir: str | None = None,
    on_finish: Callable[[], None] | None = None,
    reorth: str = "auto",
) -> EigenResult:
    r"""A few extreme eigenpairs of a symmetric operator by Lanczos.

    Each step multiplies the newest basis vector $v_j$ by $A$ and, with ``reorth="partial"``
    (Simon 1984; the default for ``k=1``), applies the three-term recurrence $w = A v_j -
    \beta_{j-1} v_{j-1} - \alpha_j v_j$ against the two latest rows, held in memory: a few
    passes over one vector, and the basis is written, never read. Simon's recurrence for
    $\omega_{jk} \approx v_j^\top v_k$ ($O(j)$ numbers a step) tells when the basis is about
    to lose orthogonality; then, and at the next step, the product is orthogonalized against
    the **whole** basis (classical Gram-Schmidt twice), as after a thick restart (the
    coupling to the kept Ritz vectors). The basis stays *semi-orthogonal*, which keeps
    spurious copies of converged eigenvalues away (Paige 1976/1980; Parlett 1998, ch. 13);
    the trigger is $\sqrt\epsilon$, lower for eigenvalues small against $\|A\|$, or earlier
    where the components it would remove (the defect below) pass 5% of the stopping
    threshold (see `sharpgen.linalg._reorth`). Dot products and norms of long vectors are
    summed in blocks (`sharpgen.linalg._reduce`: torch's float32 ones are 1% off at $n =
    10^8$ on a CPU). ``reorth="full"`` (the default for ``k > 1``) orthogonalizes every
    product against the whole basis (the basis orthonormal to working precision). The
    projected matrix $T$ satisfies $A V_m = V_m T_m + w_m e_m^\top$ (to working precision
    with ``"full"``), so a Ritz pair $(\theta, x = V_m s)$ has residual $\|A x - \theta x\|
    = \|w_m\|\,|s_m|$ at no extra product.

    **Certificate of a semi-orthogonal basis.** With ``"partial"`` the relation is $A V =
    V(T + D) + w e_m^\top + E$: $D$ holds the components that the reorthogonalizations
    removed (known numbers) and $E$ what thick restarts carried over ($\|E\|_2$ bounded by
    the $D$ of earlier bases), and $x = V s$ is a unit vector only to $O(\sqrt\epsilon)$.
    Once $\|w_m\|\,|s_m|$ passes the stopping rule, the bound $(\|w_m\|\,|s_m| + \|D s\|_1 +
    \|E\|_2)/\|V s\|$ of the unit vector's residual (rows of unit norm; $\|V s\|$ computed,
    one pass over the basis) must pass it too; where it does not, the wanted Ritz vectors
    are checked explicitly, one product each (passing at $100\epsilon\|A\|$ too, the
    rounding of the products, below which ``"full"`` stops on its estimate alike), and the
    iteration continues if those fail. ``residuals`` are these bounds (equal to the true
    residuals up to the defect). So ``converged=True`` keeps its meaning below.

    **Default** (``reorth="auto"``): ``"partial"`` for ``k=1``, ``"full"`` otherwise. In
    ``benchmarks/bench_reorth.py`` (5 seeds) both modes took the same products for ``k=1``
    on the test spectra (float64 and float32) and on the models of
    ``benchmarks/bench_topk.py``; for ``k=5`` the same on the test spectra, but on the
    float32 models 134/68/84 products with ``"full"`` against 144/95/92 with ``"partial"``,
    which left 2 of 5 runs unconverged on two of them: the Ritz vectors of the fifth value
    in a semi-orthogonal float32 basis had residuals 1.3-5x the threshold where the
    estimate was below it (the values themselves within ``tol``).

    **Stopping rule.** The iteration stops when every wanted Ritz value satisfies

    $$
    \|A x_i - \theta_i x_i\| \le \frac{\mathrm{tol}}{1+\mathrm{tol}}
    \max\bigl(|\theta_i|,\ \sqrt{\epsilon}\,\max_j|\theta_j|\bigr),
    $$

    with $\epsilon$ the machine epsilon of the operator's dtype (``bound="residual"``, the
    default; ``bound="gap"`` puts the quadratic error bound in place of the residual, see
    below). For symmetric $A$ there is
    an eigenvalue $\lambda$ with $|\lambda - \theta_i| \le \|A x_i - \theta_i x_i\|$
    (and even $\le \|r_i\|^2/\mathrm{gap}_i$), so with ``converged=True`` every returned
    value is within ``tol`` relative of an eigenvalue of $A$ — unless it is below
    $\sqrt{\epsilon}$ times the largest Ritz value in magnitude (about $10^{-8}$ in float64,
    $3\cdot 10^{-4}$ in float32), where relative accuracy is replaced by that floor.
    As for every Krylov method, the guarantee is about *an* eigenvalue: a start vector
    (almost) orthogonal to an eigenvector, or a repeated eigenvalue, can hide it. When the
    Krylov space becomes exactly invariant ($\|w_m\| \approx 0$) the iteration continues
    with a fresh random vector orthogonal to the basis, and convergence is only accepted
    after at least one such extension, so double eigenvalues are found.

    **Quadratic bound.** For an eigenvalue separated from the rest of the spectrum by a gap
    $\delta$, $|\lambda - \theta_i| \le \|r_i\|^2/\delta$ (Kato-Temple), far smaller
    than the residual once $\theta_i$ has settled: with ``bound="gap"`` the rule stops on
    $\min(\|r_i\|, \|r_i\|^2/\delta_i)$, where $\delta_i$ is the distance from
    $\theta_i$ to the nearest other Ritz value less that value's own residual. This is an
    error *estimate*, not a certificate (the Ritz values need not bracket the next
    eigenvalue), that stopped 1-5 products earlier at a true error below ``tol`` on every
    model of ``benchmarks/bench_topk.py``; ``residuals`` still reports $\|r_i\|$.

    **Memory.** The basis is ``max_basis`` vectors of length $n$ (`Basis`):
    $\mathrm{max\_basis}\cdot n\cdot b$ bytes with $b$ the stored element size (4 in
    float32), e.g. 1.6 GB for a 10-million-parameter model at the default
    ``max_basis=40``, and besides it three working vectors (the two latest rows, held
    in memory with ``"partial"`` where the basis is elsewhere, and the product, which
    becomes the next row in place). When the basis is full the iteration is
    thick-restarted (Wu & Simon 2000): the ``k + (m - k) // 2`` most wanted Ritz vectors
    are kept, rotated into the basis in place (column chunks, no second basis), and the
    iteration continues from the residual. Restarting keeps the certificate; a small
    basis only costs products (a ``k=1`` run with ``max_basis=4`` typically needs 1.2-2x
    the products of an unrestarted one). ``basis_storage="host"`` keeps the rows in host
    memory (for GPU users; streamed to the device in chunks), ``"disk"`` in a temporary
    file read and written explicitly: with ``"partial"`` one sequential row write per
    step, the file read at restarts, reorthogonalizations and the end (with ``"full"``
    three passes over the file per step).

    **Rounded basis.** With ``basis_dtype=torch.float16`` (or ``bfloat16``) the rows are
    stored rounded, so the Lanczos relation, and with it the residual estimate
    $\|w_m\|\,|s_m|$, holds only to the stored precision. When the estimate passes, the
    wanted Ritz vectors $x$ are then formed and checked explicitly, one product each:
    the result reports the Rayleigh quotients $x^\top A x$ and the explicit residuals
    $\|Ax - (x^\top A x)\,x\|$, and ``converged`` only when those pass the stopping rule,
    so the guarantee above is unchanged (the iteration continues, asking the estimate for
    ten times more, when they do not, and giving up with ``converged=False`` after two
    refutations). float16 rows hold about 3 decimal digits: enough for ``tol=1e-3`` on the
    matrices of the tests; bfloat16 rows (2 digits) often are not.

    Args:
        A: Dense symmetric tensor, `LinearOperator` or matvec callable (then pass ``size``).
        k: Number of eigenpairs, ``1 <= k < n``.
        which: ``"largest"`` (algebraic, the default), ``"smallest"``, ``"both_ends"``
            (``ceil(k/2)`` largest and ``floor(k/2)`` smallest) or ``"magnitude"``.
        tol: Relative tolerance of the stopping rule above.
        max_iter: Cap on Lanczos steps (one product each), restarts included; default
            ``max(500, 20 * max_basis)``.
        v0: Start vector of shape ``(n,)``; random Gaussian (from ``generator``) if None.
        generator: Source of randomness (start vector, restarts after an invariant
            subspace); the global RNG is untouched when given.
        max_basis: Basis vectors kept in memory, ``min(n, k + 2) <= max_basis <= n``;
            default ``min(n, max(2 * k + 20, 40))``.
        size: Dimension, when ``A`` is a callable.
        bound: ``"residual"`` (default: the guarantee above) or ``"gap"`` (the quadratic
            estimate, fewer products).
        basis_storage: ``"device"`` (default, the operator's device), ``"host"`` (CPU
            memory, pinned under CUDA) or ``"disk"`` (a temporary file).
        basis_dtype: Stored dtype of the basis (default: the operator's); a narrower one
            such as ``torch.float16`` is certified by explicit residuals (see above).
        basis_dir: Directory of the ``"disk"`` file (default: the system's temporary one).
        reorth: ``"auto"`` (default: ``"partial"`` for ``k=1``, else ``"full"``),
            ``"partial"`` (Simon's partial reorthogonalization, see above) or ``"full"``
            (every product against the whole basis).
        on_finish: Called once after the last product of ``A``, before the ``k`` Ritz
            vectors are formed (with a rounded basis: after their checking products), e.g.
            to free what the products held (a kept gradient graph).

    Returns:
        An `EigenResult`: ``eigenvalues`` in descending order (ascending for
        ``"smallest"``, descending magnitude for ``"magnitude"``), unit-norm
        ``eigenvectors`` as columns, Ritz ``residuals`` $\|A x_i - \theta_i x_i\|$ (equal
        to the explicitly computed ones up to rounding with ``"full"``; upper bounds of
        them with ``"partial"``), ``converged``, matvecs, steps, restarts and
        ``num_reorth`` (the steps orthogonalized against the whole basis).

    Raises:
        ValueError: On ``k`` outside ``[1, n)``, ``tol <= 0``, an unknown ``which``, a bad
            ``max_basis``/``max_iter``/``v0``, or a non-square or non-symmetric dense ``A``.
        TypeError: On a wrongly typed argument.

    Examples:
        >>> import torch
        >>> from sharpgen.linalg import lanczos
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> res = lanczos(A, k=2, generator=torch.Generator().manual_seed(0))
        >>> [round(v, 6) for v in res.eigenvalues.tolist()], res.converged
        ([10.0, 9.0], True)

    References:
        C. Lanczos, 1950. K. Wu and H. Simon, "Thick-restart Lanczos method for large
        symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2), 2000.
        H. D. Simon, "The Lanczos algorithm with partial reorthogonalization", Math.
        Comp. 42, 1984. C. C. Paige, "Error analysis of the Lanczos algorithm for
        tridiagonalizing a symmetric matrix", J. Inst. Maths Applics 18, 1976, and
        "Accuracy and effectiveness of the Lanczos algorithm for the symmetric
        eigenproblem", Linear Algebra Appl. 34, 1980. R. M. Larsen, PROPACK, 1998.
        B. N. Parlett, *The Symmetric Eigenvalue Problem*, 1998 (residual bounds).
    """
    # a context in the body, not a decorator: a wrapper's frame would hold v0 (a start
    # handed over, freed here once it is in the basis) for the whole run
    with full_precision():
        op = as_linear_operator(A, size=size, check_symmetric=True)
        n = op.shape[0]
        k = check_positive_int("k", k)
        if k >= n:
            raise ValueError(
                f"k must be smaller than the dimension n={n}, got k={k}; for all eigenvalues "
                "use torch.linalg.eigvalsh on the dense matrix (A.to_dense())."
            )
        which = check_choice("which", which, WHICH)
        tol = check_positive_float("tol", tol, hint="pass a relative tolerance such as 1e-3.")
        generator = check_generator(generator)
        bound = check_choice("bound", bound, BOUNDS)
        reorth = check_choice("reorth", reorth, REORTH)
        if reorth == "auto":
            reorth = "partial" if k == 1 else "full"
        basis_storage = check_choice("basis_storage", basis_storage, STORAGES)
        basis_dtype = check_basis_dtype(basis_dtype, op.dtype)
        if max_basis is None:
            max_basis = min(n, max(2 * k + 20, 40))
        max_basis = check_positive_int("max_basis", max_basis, minimum=min(n, k + 2))
        if max_basis > n:
            raise ValueError(
                f"max_basis must be <= the dimension n={n}, got {max_basis}; pass max_basis={n}."
            )
        if max_iter is None:
            max_iter = max(500, 20 * max_basis)
        max_iter = check_positive_int("max_iter", max_iter)

        dtype, device = op.dtype, op.device
        if v0 is None:
            v = random_unit_vector(n, generator=generator, dtype=dtype, device=device)
            v.div_(norm(v).to(dtype))  # torch's float32 norm is 1% off at n = 1e8 (`_reduce`)
        else:
            if not isinstance(v0, Tensor):
                raise TypeError(
                    f"v0 must be a torch.Tensor of shape ({n},), got {type(v0).__name__}."
                )
            if v0.shape != (n,):
                raise ValueError(f"v0 must have shape ({n},), got {tuple(v0.shape)}.")
            v = v0.detach().to(dtype=dtype, device=device)
            del v0  # a start handed over (no other reference) is freed once in the basis
            length = norm(v)
            if not torch.isfinite(length) or length == 0:
                raise ValueError(
                    "v0 must be a finite nonzero vector; pass v0=None for a random one."
                )
            v = v / length.to(dtype)

        start = op.num_matvecs
        V = Basis(max_basis, n, dtype=dtype, device=device, storage=basis_storage,
                  store_dtype=basis_dtype, directory=basis_dir)  # fmt: skip
        try:
            V.write(0, v)
            P = Full() if reorth == "full" else Partial(max_basis, torch.finfo(dtype).eps, v)
            P.attach(V, 0)
            del v
            state = _iterate(op, V, k, which, tol, max_iter, bound, generator, on_finish, P)
            del P
        finally:
            V.close()
        theta, resid, X, converged, steps, restarts, reorths = state
        del state
        idx = output_order(theta, which)
        if np.array_equal(idx, np.arange(idx.size)):  # already in order: no copy of k vectors
            vectors = X
        else:
            vectors = X[:, torch.from_numpy(idx).to(device)]
        del X
        return EigenResult(
            eigenvalues=torch.from_numpy(theta[idx]).to(dtype=dtype, device=device),
            eigenvectors=vectors,
            residuals=torch.from_numpy(resid[idx]).to(dtype=dtype, device=device),
            converged=converged,
            num_matvecs=op.num_matvecs - start,
            num_iterations=steps,
            method="lanczos",
            which=which,
            tol=tol,
            num_restarts=restarts,
            num_reorth=reorths,
        )


def _iterate(
    op: LinearOperator,
    V: Basis,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    bound: str,
    generator: torch.Generator | None,
    on_finish: Callable[[], None] | None,
    P: Full | Partial,
) -> tuple[np.ndarray, np.ndarray, Tensor, bool, int, int, int]:
    """The Lanczos iteration on the basis ``V`` (``on_finish``: see `lanczos`).

    ``P``: the reorthogonalization (`Full`, or `Partial` holding the start row). Returns
    ``(theta, resid, X, converged, steps, restarts, reorth)`` for the wanted Ritz pairs
    (``X`` unit columns, in the order of ``theta``, most wanted first).
    """
    n, dtype, device = V.n, V.dtype, V.device
    max_basis = V.capacity
    T = np.zeros((max_basis, max_basis))
    j = steps = restarts = breakdowns = 0
    converged = False
    eps = torch.finfo(dtype).eps
    shrink = 1.0  # a refuted estimate (rounded or semi-orthogonal basis) is asked for more
    checked: tuple[np.ndarray, np.ndarray, Tensor] | None = None
    unit = np.empty(0)  # the residual bounds of a semi-orthogonal basis's unit vectors
    while True:
        steps += 1
        w, beta = P.step(op, V, T, j)  # fills row j of T (eigh reads the lower triangle)
        m = j + 1
        theta, S = np.linalg.eigh(T[:m, :m])  # ascending
        ritz, last = theta.tolist(), S[m - 1].tolist()
        scale = max(abs(ritz[0]), abs(ritz[-1]))
        # sqrt(n) capped at 10: uncapped, a float32 basis of 1e7 numbers took any step
        # with beta below 4% of ||A|| for an invariant subspace (13% at GPT-2's 1.24e8)
        invariant = beta <= 100 * eps * max(scale, eps) * min(math.sqrt(n), 10.0)
        wanted = wanted_list(ritz, which)[:k]
        need = [shrink * convergence_threshold(ritz[i], scale, tol, dtype) for i in wanted]
        P.tune(scale, min(need), max(abs(last[i]) for i in wanted))
        # an exactly invariant Krylov space sees one copy of each eigenvalue: extend it once
        # with a fresh random vector before accepting convergence (finds double eigenvalues)
        if m >= k and (not invariant or breakdowns > 0 or m == n):
            errors = error_bounds(ritz, [beta * abs(x) for x in last], bound, wanted)
            if all(e <= t for e, t in zip(errors, need, strict=True)):
                if P.exact and not V.lossy:
                    converged = True
                    break
                converged, checked, unit = verify(op, V, P, theta, S, beta, wanted, bound, tol)
                if converged:
                    break
                checked, shrink = None, shrink / 10
                if shrink < 0.05:  # refuted twice: the rounding is the limit
                    break
        if steps >= max_iter or m == n:
            break
        # the next basis vector: the residual direction, or a fresh random one at an
        # invariant subspace (then the coupling to the old basis is zero)
        if invariant:
            breakdowns += 1
            r = random_unit_vector(n, generator=generator, dtype=dtype, device=device)
            r, _ = V.orthogonalize(r, m)
            new, beta, scale = r, 0.0, 1.0 / float(norm(r))
            P.reset(j)  # orthogonal to the whole basis
        else:
            new, scale = w, 1.0 / beta  # w is this step's own tensor
        del w
        if m == max_basis:
            keep = wanted_order(theta, which)[: k + (m - k) // 2]
            V.rotate(torch.from_numpy(S[:, keep]).to(dtype=dtype, device=device), m)
            T[:] = 0.0
            T[: keep.size, : keep.size] = np.diag(theta[keep])
            j = keep.size
            restarts += 1
            P.restart(T, S[:, keep], m, beta, new)
        else:
            j = m
            P.advance(new, beta)
        V.write_scaled(j, new, scale)  # new / its norm, in one pass
        del new
        P.attach(V, j)
    del w  # the last product: not held while the Ritz vectors are formed

    m = j + 1
    idx = wanted_order(theta, which)[: min(k, m)]
    resid = beta * np.abs(S[m - 1, :])
    P.release()
    if isinstance(P, Partial) and not V.lossy:
        resid = unit if converged else unit_bounds(V, P, S, beta, idx.tolist())
    if V.lossy and checked is None:  # the estimate is no bound for rounded rows: explicit
        checked = explicit(op, V, S[:, idx], m)
    if on_finish is not None:
        on_finish()
    if checked is not None:
        return (*checked, converged, steps, restarts, P.count)
    X = V.combine(torch.from_numpy(S[:, idx]).to(dtype=dtype, device=device), m)
    X.div_(column_norms(X))  # in place: k vectors, not 2k
    return theta[idx], resid[idx], X, converged, steps, restarts, P.count
