"""Lanczos with full reorthogonalization and thick restart, for a few extreme eigenpairs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sharpgen._precision import full_precision_fn
from sharpgen.linalg._basis import STORAGES, Basis
from sharpgen.linalg._checks import (
    check_choice,
    check_generator,
    check_positive_float,
    check_positive_int,
)
from sharpgen.linalg._operator import LinearOperator, as_linear_operator
from sharpgen.linalg._probes import random_unit_vector
from sharpgen.linalg._results import EigenResult

__all__ = ["lanczos"]

WHICH = ("largest", "smallest", "both_ends", "magnitude")
BOUNDS = ("residual", "gap")


def wanted_order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of all Ritz values, most wanted first."""
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    if which == "magnitude":
        return np.argsort(-np.abs(theta), kind="stable")
    asc = np.argsort(theta, kind="stable")
    out = np.empty_like(asc)
    m = asc.size
    out[0::2] = asc[::-1][: (m + 1) // 2]
    out[1::2] = asc[: m // 2]
    return out


def output_order(theta: np.ndarray, which: str) -> np.ndarray:
    """Order in which the selected Ritz values are returned."""
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    if which == "magnitude":
        return np.argsort(-np.abs(theta), kind="stable")
    return np.argsort(-theta, kind="stable")


def orthogonalize(w: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt twice against the ROWS of ``V``: ``(w_perp, V w)``."""
    Vt = V.T
    h = V @ w
    w = torch.addmv(w, Vt, h, alpha=-1.0)  # w - V^T h in one call
    h2 = V @ w
    return torch.addmv(w, Vt, h2, alpha=-1.0), h + h2


def convergence_threshold(value: float, scale: float, tol: float, dtype: torch.dtype) -> float:
    r"""The residual threshold $\mathrm{tol}\,\max(|\theta|, \sqrt{\epsilon}\,s)/(1+\mathrm{tol})$.

    ``value`` is the Ritz value $\theta$, ``scale`` the largest $|\theta_j|$ ($s$) and
    $\epsilon$ the machine epsilon of ``dtype``.
    """
    floor = math.sqrt(torch.finfo(dtype).eps) * scale
    return tol * max(abs(value), floor) / (1.0 + tol)


def error_bounds(
    theta: Sequence[float], resid: Sequence[float], bound: str, idx: Sequence[int] | None = None
) -> list[float]:
    r"""The error bounds of the Ritz values ``idx`` (default: all) that the stopping rule uses.

    ``"residual"``: $\|r_i\|$, a distance to the spectrum that holds for any symmetric
    $A$. ``"gap"``: $\min(\|r_i\|, \|r_i\|^2/\delta_i)$ with the gap estimate
    $\delta_i = \min_{j \ne i} (|\theta_i - \theta_j| - \|r_j\|)$ (the residual bound
    when $\delta_i \le \|r_i\|$): the quadratic bound for an isolated eigenvalue
    (Kato-Temple), with the gap read from the other Ritz values, each moved towards
    $\theta_i$ by its own residual.

    The projected problem is a few dozen numbers, handled as Python floats: between two
    products, each NumPy call on them cost several times its own arithmetic.
    """
    m = len(theta)
    out = []
    for i in range(m) if idx is None else idx:
        r = resid[i]
        if bound == "gap" and m > 1:
            delta = min(abs(theta[i] - theta[j]) - resid[j] for j in range(m) if j != i)
            if delta > r:  # then delta > 0 and r**2 / delta < r: no overflow
                r = r * r / delta
        out.append(r)
    return out


def _wanted(theta: list[float], which: str) -> list[int]:
    """`wanted_order` for ascending Ritz values as a list (no NumPy call)."""
    m = len(theta)
    if which == "largest":
        return list(range(m - 1, -1, -1))
    if which == "smallest":
        return list(range(m))
    return wanted_order(np.asarray(theta), which).tolist()


def check_basis_dtype(basis_dtype: object, dtype: torch.dtype) -> torch.dtype | None:
    """None, or a floating dtype no wider than the operator's ``dtype``."""
    if basis_dtype is None:
        return None
    if not isinstance(basis_dtype, torch.dtype) or not basis_dtype.is_floating_point:
        raise TypeError(
            f"basis_dtype must be None or a floating torch.dtype such as torch.float16, got "
            f"{basis_dtype!r}."
        )
    if torch.finfo(basis_dtype).bits > torch.finfo(dtype).bits:
        raise ValueError(
            f"basis_dtype={basis_dtype} is wider than the operator's dtype {dtype}; pass "
            f"basis_dtype=None (the operator's dtype) or a narrower one."
        )
    return basis_dtype


@full_precision_fn
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
) -> EigenResult:
    r"""A few extreme eigenpairs of a symmetric operator by Lanczos.

    Each step multiplies the newest basis vector by $A$ and orthogonalizes the product
    against the **whole** basis with classical Gram-Schmidt applied twice, so the basis
    stays orthonormal to working precision and no spurious copies of converged eigenvalues
    appear. The projected matrix $T = V^\top A V$ satisfies
    $A V_m = V_m T_m + w_m e_m^\top$, so a Ritz pair $(\theta, x = V_m s)$ has residual
    $\|A x - \theta x\| = \|w_m\|\,|s_m|$ at no extra product.

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
    ``max_basis=40``, and besides it about three working vectors (the product, its
    orthogonalized copy, the next basis vector). When the basis is full the iteration is
    thick-restarted (Wu & Simon 2000): the ``k + (m - k) // 2`` most wanted Ritz vectors
    are kept, rotated into the basis in place (column chunks, no second basis), and the
    iteration continues from the residual. Restarting keeps the certificate; a small
    basis only costs products (a ``k=1`` run with ``max_basis=4`` typically needs 1.2-2x
    the products of an unrestarted one). ``basis_storage="host"`` keeps the rows in host
    memory (for GPU users; streamed to the device in chunks), ``"disk"`` in a temporary
    file read and written explicitly (three passes over the file per step).

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
        on_finish: Called once after the last product of ``A``, before the ``k`` Ritz
            vectors are formed (with a rounded basis: after their checking products), e.g.
            to free what the products held (a kept gradient graph).

    Returns:
        An `EigenResult`: ``eigenvalues`` in descending order (ascending for
        ``"smallest"``, descending magnitude for ``"magnitude"``), unit-norm
        ``eigenvectors`` as columns, Ritz ``residuals`` $\|A x_i - \theta_i x_i\|$ (equal
        to the explicitly computed ones up to rounding), ``converged``, matvecs, steps and
        restarts.

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
        B. N. Parlett, *The Symmetric Eigenvalue Problem*, 1998 (residual bounds).
    """
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
    else:
        if not isinstance(v0, Tensor):
            raise TypeError(f"v0 must be a torch.Tensor of shape ({n},), got {type(v0).__name__}.")
        if v0.shape != (n,):
            raise ValueError(f"v0 must have shape ({n},), got {tuple(v0.shape)}.")
        v = v0.detach().to(dtype=dtype, device=device)
        del v0  # a start handed over (no other reference) is freed once in the basis
        norm = torch.linalg.vector_norm(v)
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError("v0 must be a finite nonzero vector; pass v0=None for a random one.")
        v = v / norm

    start = op.num_matvecs
    V = Basis(max_basis, n, dtype=dtype, device=device, storage=basis_storage,
              store_dtype=basis_dtype, directory=basis_dir)  # fmt: skip
    try:
        V.write(0, v)
        del v
        state = _iterate(op, V, k, which, tol, max_iter, bound, generator, on_finish)
    finally:
        V.close()
    theta, resid, X, converged, steps, restarts = state
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
    on_finish: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, Tensor, bool, int, int]:
    """The Lanczos iteration on the basis ``V`` (``on_finish``: see `lanczos`).

    Returns ``(theta, resid, X, converged, steps, restarts)`` for the wanted Ritz pairs
    (``X`` unit columns, in the order of ``theta``, most wanted first).
    """
    n, dtype, device = V.n, V.dtype, V.device
    max_basis = V.capacity
    T = np.zeros((max_basis, max_basis))
    j = steps = restarts = breakdowns = 0
    converged = False
    eps = torch.finfo(dtype).eps
    shrink = 1.0  # a lossy basis whose estimate was refuted asks the estimate for more
    checked: tuple[np.ndarray, np.ndarray, Tensor] | None = None
    while True:
        w = op.matvec(V.row(j))
        steps += 1
        w, h = V.orthogonalize(w, j + 1)
        # the new row of T and ||w|| reach the host in one transfer; eigh reads the lower
        # triangle of T only
        row = torch.cat((h, torch.linalg.vector_norm(w).reshape(1)))
        row64 = row.to(dtype=torch.float64, device="cpu").numpy()
        beta = float(row64[-1])
        T[j, : j + 1] = row64[:-1]
        m = j + 1
        theta, S = np.linalg.eigh(T[:m, :m])  # ascending
        ritz, last = theta.tolist(), S[m - 1].tolist()
        scale = max(abs(ritz[0]), abs(ritz[-1]))
        invariant = beta <= 100 * eps * max(scale, eps) * math.sqrt(n)
        # an exactly invariant Krylov space sees one copy of each eigenvalue: extend it once
        # with a fresh random vector before accepting convergence (finds double eigenvalues)
        if m >= k and (not invariant or breakdowns > 0 or m == n):
            wanted = _wanted(ritz, which)[:k]
            resid = [beta * abs(x) for x in last]
            errors = error_bounds(ritz, resid, bound, wanted)
            if all(e <= shrink * convergence_threshold(ritz[i], scale, tol, dtype)
                   for e, i in zip(errors, wanted, strict=True)):  # fmt: skip
                if not V.lossy:
                    converged = True
                    break
                checked = _explicit(op, V, S[:, wanted], m)
                if all(r <= convergence_threshold(t, scale, tol, dtype)
                       for t, r in zip(*checked[:2], strict=True)):  # fmt: skip
                    converged = True
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
            new = r / torch.linalg.vector_norm(r)
        else:
            new = w.div_(beta)  # w is this step's own tensor
        del w
        if m == max_basis:
            keep = wanted_order(theta, which)[: k + (m - k) // 2]
            V.rotate(torch.from_numpy(S[:, keep]).to(dtype=dtype, device=device), m)
            T[:] = 0.0
            T[: keep.size, : keep.size] = np.diag(theta[keep])
            j = keep.size
            restarts += 1
        else:
            j = m
        V.write(j, new)
        del new
    del w  # the last product: not held while the Ritz vectors are formed

    m = j + 1
    idx = wanted_order(theta, which)[: min(k, m)]
    if V.lossy and checked is None:  # the estimate is no bound for rounded rows: explicit
        checked = _explicit(op, V, S[:, idx], m)
    if on_finish is not None:
        on_finish()
    if checked is not None:
        return (*checked, converged, steps, restarts)
    resid = beta * np.abs(S[m - 1, :])
    X = V.combine(torch.from_numpy(S[:, idx]).to(dtype=dtype, device=device), m)
    X.div_(torch.linalg.vector_norm(X, dim=0, keepdim=True))  # in place: k vectors, not 2k
    return theta[idx], resid[idx], X, converged, steps, restarts


def _explicit(
    op: LinearOperator, V: Basis, S: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray, Tensor]:
    r"""Rayleigh quotients and explicit residuals of the Ritz vectors, one product each.

    For the unit vectors $x \propto V^\top s$: $x^\top A x$ and $\|Ax - (x^\top A x)\,x\|$.

    For any unit $x$ and symmetric $A$ some eigenvalue lies within the residual of the
    Rayleigh quotient, whatever the basis was: the certificate of a rounded basis.
    """
    S_t = torch.from_numpy(S).to(dtype=V.dtype, device=V.device)
    X = V.combine(S_t, m)
    X.div_(torch.linalg.vector_norm(X, dim=0, keepdim=True))
    theta, resid = [], []
    for i in range(X.shape[1]):
        x = X[:, i]
        Ax = op.matvec(x)
        t = torch.dot(x, Ax)
        r = torch.linalg.vector_norm(Ax.sub_(x, alpha=float(t)))
        theta.append(float(t))
        resid.append(float(r))
    return np.asarray(theta), np.asarray(resid), X
