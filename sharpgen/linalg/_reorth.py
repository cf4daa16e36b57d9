r"""Partial reorthogonalization of Lanczos (Simon 1984) and the bound it leaves to certify.

`Partial` holds what a Lanczos step needs besides the basis: the two latest basis rows
(so an ordinary step never reads the basis), Simon's estimates $\omega$ of the loss of
orthogonality, and the defect of the Lanczos relation that the reorthogonalizations
introduce (`Partial.numerators` turns it into residual bounds).

**The step.** $w = A v_j - \beta_{j-1} v_{j-1}$, $\alpha_j = v_j^\top w$,
$w \leftarrow w - \alpha_j v_j$, $\beta_j = \|w\|$, the dot product and the norm
summed accurately (`sharpgen.linalg._reduce`): a few passes over one vector.

**The estimate.** With $\Omega_{jk} \approx v_j^\top v_k$ and $T$ the projected matrix
(tridiagonal, with the arrow row of a thick restart), symmetry of $A$ gives Simon's
recurrence, $O(j)$ numbers per step:

$$
\beta_j\,\omega_{j+1,k} = (T\omega_j)_k - \beta_{j-1}\,\omega_{j-1,k}
  - \alpha_j\,\omega_{j,k} \pm \epsilon\,\|A\|, \qquad k < j,
$$

with $\omega_{j+1,j} = \epsilon\,\|A v_j\|/\beta_j$ (local rounding). When
$\max_k|\omega_{j+1,k}|$ passes $\sqrt{\epsilon}$ (Simon), or `LEAK_SHARE` of the smallest
stopping threshold over $\|A\|$ where that is lower (a Ritz vector of the basis leaks about
$\|A\|\,\omega$ into its residual: small eigenvalues of float32 operators: without it
13 of 200 random trials that converged with ``reorth="full"`` did not), or when the components a
reorthogonalization would remove, about $\beta_j\|\omega_{j+1}\|_1$, pass `DEFECT_SHARE` of
the smallest stopping threshold (the certificate below must absorb them), the product is
orthogonalized against the whole basis (`sharpgen.linalg._basis.Basis.orthogonalize`) at
this step and the next (Simon's rule: $\omega_j$ is large too and would pass it on), and
both estimates are reset to $\epsilon$. So the basis stays *semi-orthogonal*, $|v_j^\top
v_k| \lesssim \sqrt{\epsilon}$, which is enough for the Ritz values of $T$ to be those of an
orthonormal basis of the same space to $O(\epsilon\|A\|)$ (Simon 1984, Theorem 4) and keeps
spurious copies of converged eigenvalues away (Paige 1976/1980, Parlett 1998, ch. 13). On a
diagonal of $2\cdot 10^6$ float32 numbers the estimate stayed 3-15 times above the measured
$\max_k|v_{j+1}^\top v_k|$ (with torch's own float32 reductions it fell 10-100 times below:
hence `sharpgen.linalg._reduce`).

**The defect.** A reorthogonalization removes components $h_i$ along old rows that the
tridiagonal $T$ does not hold, so the computed quantities satisfy, to working precision,
$A V = V (T + D) + w\,e_m^\top + E$, with $D$ the coefficients actually used minus
those of $T$ (nonzero only in the columns of reorthogonalized steps, above the diagonal)
and $E$ what thick restarts carried over from earlier bases (columns of known bounded
norm). For a Ritz pair $T s = \theta s$, $x = V s$, since every row of $V$ has unit norm:

$$
\|A x - \theta x\| \le \beta\,|s_m| + \|D s\|_1 + \textstyle\sum_r c_r |s_r|,
$$

with $c_r$ the bound of $E$'s column $r$. `Partial.numerators` returns this for every Ritz
vector; `sharpgen.linalg.lanczos` divides it by $\|x\|$ for the unit vector.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from sharpgen.linalg._basis import Basis
from sharpgen.linalg._reduce import column_norms, dot, norm, sub_dot, sub_norm
from sharpgen.linalg._ritz import convergence_threshold, error_bounds

__all__ = ["REORTH", "Full", "Partial", "explicit", "unit_bounds", "verify"]

REORTH = ("auto", "partial", "full")
#: Share of the smallest stopping threshold that the estimated defect may reach.
DEFECT_SHARE = 0.05
#: Share of (threshold / ||A||) below which omega is kept (small wanted eigenvalues).
LEAK_SHARE = 0.3
#: The rounding of the Lanczos relation, in units of eps ||A|| (`Partial.rounding`).
ROUNDING = 100.0


class Full:
    r"""Full reorthogonalization: every product against the whole basis (CGS twice).

    The interface of `Partial`, with nothing to track: the basis stays orthonormal to
    working precision and the relation $A V = V T + w e_m^\top$ holds to it.
    """

    exact = True  # the estimate beta |s_m| is the residual

    def __init__(self) -> None:
        self.count = 0

    def step(self, op: object, V: Basis, T: np.ndarray, j: int) -> tuple[Tensor, float]:
        """Multiply row ``j`` (read from the basis), orthogonalize; fills ``T``'s row ``j``."""
        w, h = V.orthogonalize(op.matvec(V.row(j)), j + 1)  # type: ignore[attr-defined]
        row = _host(h, w)  # the row of T and ||w|| in one transfer
        T[j, : j + 1] = row[:-1]
        self.count += 1
        return w, float(row[-1])

    def tune(self, scale: float, need: float, weight: float) -> None:
        """Nothing to tune."""

    def reset(self, j: int) -> None:
        """Nothing to reset."""

    def advance(self, new: Tensor, beta: float) -> None:
        """Rows are read from the basis."""

    def attach(self, V: Basis, j: int) -> None:
        """Rows are read from the basis."""

    def release(self) -> None:
        """Nothing held."""

    def restart(self, T: np.ndarray, S: np.ndarray, m: int, beta: float, new: Tensor) -> None:
        """The arrow row comes from the next step's orthogonalization."""


class Partial:
    """The state of partial reorthogonalization on a basis of ``capacity`` rows.

    Args:
        capacity: Rows of the basis.
        eps: Machine epsilon of the operator's dtype.
        v0: The start vector (row 0), held as the current row.
    """

    def __init__(self, capacity: int, eps: float, v0: Tensor) -> None:
        self.eps, self.limit = eps, math.sqrt(eps)
        self.capacity, self.need, self.weight = capacity, math.inf, 1.0
        self.prev: Tensor | None = None
        self.cur = v0
        self.beta_prev = 0.0
        self.omega_prev = np.zeros(capacity + 1)
        self.omega = np.zeros(capacity + 1)
        self.omega[0] = 1.0
        self.D = np.zeros((capacity, capacity))
        # what thick restarts carried over: bounds of the norms of E's columns, and of ||E||_2
        self.carry = np.zeros(capacity)
        self.carry2 = 0.0
        self.defect = False  # D or E nonzero
        self.pending = False  # Simon's rule: the step after a reorthogonalization
        self.arrow = -1  # the first step after a thick restart
        self.anorm = 0.0  # a lower estimate of ||A||: the largest ||A v_j|| and |theta|
        self.count = 0  # full orthogonalizations of a product
        self.exact = False  # the residual needs the defect and the norms (`unit_bounds`)
        self._local = eps  # the estimate of v_{j+1}' v_j after the local step

    def tune(self, scale: float, need: float, weight: float) -> None:
        r"""Update $\|A\|$, the smallest stopping threshold ``need`` and ``weight``.

        ``weight``: the largest $|s_m|$ of the wanted Ritz vectors, the weight their
        residual bounds give a defect in the next columns (see `estimate`).
        """
        self.anorm = max(self.anorm, scale)
        self.need, self.weight = need, weight
        # a Ritz vector of a basis this far from orthogonal leaks about ||A|| omega into its
        # residual: small eigenvalues (need << ||A|| tol) need the basis closer
        wanted = LEAK_SHARE * need / max(self.anorm, self.eps)
        self.limit = min(math.sqrt(self.eps), max(wanted, ROUNDING * self.eps))

    def attach(self, V: Basis, j: int) -> None:
        """Row ``j`` was just written: hold a view of it where the basis is in memory."""
        if V.fast:
            self.cur = V.row(j)

    def release(self) -> None:
        """Drop the held rows (before the Ritz vectors are formed)."""
        self.prev = None
        self.cur = torch.empty(0)

    def full_step(self, j: int) -> bool:
        """Whether step ``j`` orthogonalizes against the whole basis from the start."""
        return self.pending or j == self.arrow

    def local(self, w: Tensor) -> tuple[Tensor, float, float]:
        r"""The three-term step on the product ``w`` of the current row: ``(w, alpha, beta)``."""
        v, prev = self.cur, self.prev
        base = w.untyped_storage().data_ptr()
        if any(t is not None and t.untyped_storage().data_ptr() == base for t in (v, prev)):
            w = w.clone()  # a product that is a view of a row is not updated in place
        # accurate at any length, each half one pass over w (`sharpgen.linalg._reduce`)
        alpha_t = sub_dot(w, prev, self.beta_prev, v)  # w -= beta_prev v_{j-1}; v_j . w
        beta_t = sub_norm(w, v, alpha_t)  # w -= alpha v_j; ||w||
        alpha, beta = torch.stack((alpha_t, beta_t)).cpu().tolist()  # one transfer
        gamma = math.sqrt(alpha * alpha + beta * beta + self.beta_prev**2)  # ~ ||A v_j||
        self.anorm = max(self.anorm, gamma)
        self._local = min(1.0, self.eps * gamma / beta) if beta > 0 else self.eps
        return w, alpha, beta

    def step(self, op: object, V: Basis, T: np.ndarray, j: int) -> tuple[Tensor, float]:
        """One Lanczos step from the current row ``j``: fills row ``j`` of ``T``, ``(w, beta)``."""
        w = op.matvec(self.cur)  # type: ignore[attr-defined]
        if self.full_step(j):  # the arrow row after a restart, or Simon's second step
            w, h = V.orthogonalize(w, j + 1)
            row = _host(h, w)
            if j != self.arrow and j > 0:
                T[j, j - 1] = self.beta_prev
            T[j, j] = row[j]
            self.record(j, row[:j], T)
            self.anorm = max(self.anorm, float(np.linalg.norm(row)))
            self.count += 1
            self.pending = False
            self.reset(j)
            return w, float(row[-1])
        w, alpha, beta = self.local(w)
        if j > 0:
            T[j, j - 1] = self.beta_prev
        T[j, j] = alpha
        if self.estimate(T, j, alpha, beta):
            w, h = V.orthogonalize(w, j + 1)
            row = _host(h, w)
            T[j, j] = alpha + row[j]
            used = row[:j].copy()
            if j > 0:
                used[j - 1] += self.beta_prev
            self.record(j, used, T)
            self.count += 1
            self.pending = True
            self.reset(j)
            beta = float(row[-1])
        return w, beta

    def estimate(self, T: np.ndarray, j: int, alpha: float, beta: float) -> bool:
        r"""Simon's $\omega_{j+1}$ after an ordinary step ``j``; True: reorthogonalize.

        True when $\max_k|\omega_{j+1,k}| > \sqrt\epsilon$ (Simon), or when the defect the
        components would leave, $\beta_j\|\omega_{j+1}\|_1$, passes `DEFECT_SHARE` of
        the smallest stopping threshold (set by `tune`): the certificate must absorb it.

        ``T`` is the projected matrix (lower triangle) with row ``j`` filled in.
        """
        new = np.zeros_like(self.omega)
        if j > 0:
            Tm = T[: j + 1, : j + 1]
            sym = Tm + Tm.T - np.diag(np.diag(Tm))
            val = sym[:, :j].T @ self.omega[: j + 1]
            val -= self.beta_prev * self.omega_prev[:j] + alpha * self.omega[:j]
            val += np.copysign(self.eps * self.anorm, val)
            new[:j] = val / max(beta, self.eps * max(self.anorm, 1.0))
        new[j], new[j + 1] = self._local, 1.0
        self.omega_prev, self.omega = self.omega, new
        if np.abs(new[: j + 1]).max() > self.limit:
            return True
        # the defect a reorthogonalization leaves is about beta ||omega||_1 (at the step
        # before a restart: ||A|| ||omega||_1, the arrow's), weighted in the wanted
        # residual bounds by their components |s_j| on this row (about |s_m| now)
        size = self.anorm if j == self.capacity - 1 else beta
        defect = size * float(np.abs(new[:j]).sum()) * self.weight
        return defect > max(DEFECT_SHARE * self.need, self.rounding())

    def reset(self, j: int) -> None:
        r"""Step ``j`` was orthogonalized against the whole basis: $\omega_{j+1} = \epsilon$."""
        new = np.full_like(self.omega, self.eps)
        new[j + 1 :] = 0.0
        new[j + 1] = 1.0
        self.omega_prev, self.omega = self.omega, new

    def record(self, j: int, used: np.ndarray, T: np.ndarray) -> None:
        """The coefficients ``used`` (length ``j``) of a full step beside ``T``'s row ``j``."""
        d = used - T[j, :j]
        if np.any(d):
            self.D[:j, j] = d
            self.defect = True

    def advance(self, new: Tensor, beta: float) -> None:
        """The next row ``new`` (coupled by ``beta``) becomes the current one."""
        self.prev, self.cur, self.beta_prev = self.cur, new, beta

    def restart(self, T: np.ndarray, S: np.ndarray, m: int, beta: float, new: Tensor) -> None:
        r"""A thick restart to the Ritz vectors ``V S`` (``S`` is ``(m, q)``), ``new`` the next row.

        Sets ``T``'s arrow row ``q``: the coupling $\beta\,S_{m-1,:}$. The old basis's
        defect moves into $E' = E S + V D S$: column $i$ of it has norm at most
        $\min(\sum_r |S_{ri}|\,c_r,\ \|E\|_2) + \|D S e_i\|_1$ (rows of unit norm), and
        $\|E'\|_2 \le \|E\|_2 + \|V D S\|_F$. The estimate of the new row against the
        kept vectors is $S^\top \omega$.
        """
        q = S.shape[1]
        if self.defect:
            DS = np.abs(self.D[:m, :m] @ S).sum(axis=0)  # ||D S e_i||_1
            carry = np.minimum(self.carry[:m] @ np.abs(S), self.carry2) + DS
            self.carry2 = min(self.carry2 + float(np.linalg.norm(DS)), float(np.linalg.norm(carry)))
            self.carry[:] = 0.0
            self.carry[:q] = carry
        self.D[:] = 0.0
        self.defect = self.carry2 > 0.0
        omega = np.zeros_like(self.omega)
        omega[:q] = S.T @ self.omega[:m]
        omega[q] = 1.0
        self.omega_prev, self.omega = np.zeros_like(omega), omega
        self.prev, self.cur, self.beta_prev = None, new, 0.0
        self.arrow, self.pending = q, False
        T[q, :q] = beta * S[m - 1, :]

    def rounding(self) -> float:
        r"""$100\,\epsilon\,\|A\|$: the rounding of the products and of the coefficients.

        The Lanczos relation holds only to it in either mode (the products themselves are
        rounded); ``reorth="full"`` leaves its coefficients' rounding of this size out of
        the estimate too. A defect below it is not counted, and not chased.
        """
        return ROUNDING * self.eps * self.anorm

    def numerators(self, S: np.ndarray, beta: float, m: int) -> np.ndarray:
        r"""$\beta|s_m| + (\|D s\|_1 + \min(\sum_r c_r|s_r|, \|E\|_2) - \rho)_+$, unit columns.

        $\rho$ is `rounding`: below it the defect is the relation's own rounding.
        """
        out = beta * np.abs(S[m - 1, :])
        if self.defect:
            carried = np.minimum(self.carry[:m] @ np.abs(S), self.carry2)
            defect = np.abs(self.D[:m, :m] @ S).sum(axis=0) + carried
            out = out + np.maximum(defect - self.rounding(), 0.0)
        return out


def unit_bounds(V: Basis, P: Partial, S: np.ndarray, beta: float, idx: list[int]) -> np.ndarray:
    r"""Residual bounds of a semi-orthogonal basis: `Partial.numerators` over $\|V s_i\|$.

    The norms of the ``idx`` Ritz vectors take one pass over the basis (`Basis.norms`);
    the other entries (read by ``bound="gap"`` only) are the unit-basis bounds.
    """
    m = S.shape[0]
    out = P.numerators(S, beta, m)
    S_t = torch.from_numpy(S[:, idx]).to(dtype=V.dtype, device=V.device)
    out[idx] = out[idx] / V.norms(S_t, m).cpu().numpy()
    return out


def verify(
    op: object,
    V: Basis,
    P: Full | Partial,
    theta: np.ndarray,
    S: np.ndarray,
    beta: float,
    wanted: list[int],
    bound: str,
    tol: float,
) -> tuple[bool, tuple[np.ndarray, np.ndarray, Tensor] | None, np.ndarray]:
    r"""The certificate once the estimate $\beta|s_m|$ passed the stopping test.

    A semi-orthogonal basis (`Partial`): the stopping test on `unit_bounds`; a rounded basis,
    or where that test fails: the explicit residuals (`explicit`, one product each). For a
    semi-orthogonal basis these pass at `Partial.rounding` too: a residual of rounded
    products goes no lower (float32 eigenvalues below about 1% of $\|A\|$ at
    ``tol=1e-3``), and ``reorth="full"`` stops on its estimate there alike.
    Returns ``(passed, checked, unit)``: ``checked`` the explicit pairs or None, ``unit``
    the unit bounds (empty for a rounded basis).
    """
    m, dtype = S.shape[0], V.dtype
    scale = float(np.abs(theta).max())
    ritz = theta.tolist()
    unit = np.empty(0)
    floor = 0.0
    if isinstance(P, Partial) and not V.lossy:
        floor = P.rounding()
        unit = unit_bounds(V, P, S, beta, wanted)
        errors = error_bounds(ritz, unit.tolist(), bound, wanted)
        if all(e <= convergence_threshold(ritz[i], scale, tol, dtype)
               for e, i in zip(errors, wanted, strict=True)):  # fmt: skip
            return True, None, unit
    checked = explicit(op, V, S[:, wanted], m)
    ok = all(r <= max(convergence_threshold(t, scale, tol, dtype), floor)
             for t, r in zip(*checked[:2], strict=True))  # fmt: skip
    return ok, checked, unit


def _host(h: Tensor, w: Tensor) -> np.ndarray:
    """``h`` and ``||w||`` on the host in float64, in one transfer."""
    row = torch.cat((h.to(torch.float64), norm(w).reshape(1)))
    return row.to(dtype=torch.float64, device="cpu").numpy()


def explicit(op: object, V: Basis, S: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, Tensor]:
    r"""Rayleigh quotients and explicit residuals of the Ritz vectors, one product each.

    For the unit vectors $x \propto V^\top s$: $x^\top A x$ and $\|Ax - (x^\top A x)\,x\|$.

    For any unit $x$ and symmetric $A$ some eigenvalue lies within the residual of the
    Rayleigh quotient, whatever the basis was: the certificate of a rounded basis.
    """
    S_t = torch.from_numpy(S).to(dtype=V.dtype, device=V.device)
    X = V.combine(S_t, m)
    X.div_(column_norms(X))
    theta, resid = [], []
    for i in range(X.shape[1]):
        x = X[:, i]
        Ax = op.matvec(x)  # type: ignore[attr-defined]
        t = dot(x, Ax)
        r = norm(Ax.sub_(x, alpha=float(t)))
        theta.append(float(t))
        resid.append(float(r))
    return np.asarray(theta), np.asarray(resid), X
