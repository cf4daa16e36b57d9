"""XTrace: the exchangeable trace estimator of Epperly, Tropp & Webber (2024)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sharpgen._precision import full_precision_fn
from sharpgen.linalg._checks import check_choice, check_generator, resolve_budget
from sharpgen.linalg._hutchinson import MAX_GROWTH
from sharpgen.linalg._operator import LinearOperator, as_linear_operator
from sharpgen.linalg._probes import DISTRIBUTIONS, draw_probes
from sharpgen.linalg._reduce import gram
from sharpgen.linalg._results import TraceEstimate
from sharpgen.linalg._sketch import extend_basis

__all__ = ["xtrace"]


MAX_GROUPS = 20
"""Most groups for the covariance term of the standard error (one per probe up to 20)."""


def sketch_coordinates(
    Omega: Tensor, Y: Tensor, Q: Tensor, Z: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Everything XTrace needs, in float64 coordinates of the orthonormal basis ``Q``.

    ``Omega`` (n, m) are the probes, ``Y = A Omega``, ``Q`` (n, r) an orthonormal basis of
    ``range(Y)`` and ``Z = A Q``. Returns $H = Q^\top A Q$ (symmetrized),
    $G = Q^\top Y$, $W = Q^\top \Omega$ and the column-wise $\omega_i^\top A \omega_i$,
    $\|\omega_i\|^2$: the only ``O(n m r)`` work; the rest works on ``r x m`` matrices.
    """
    f64 = torch.float64
    H = gram(Q, Z)  # summed accurately: X.T @ Y over n is 7e-2 off at n = 3e7 in float32
    H = (H + H.T) / 2
    G = gram(Q, Y)  # = Z^T Omega for symmetric A
    W = gram(Q, Omega)
    wAw = (Omega * Y).sum(0).to(f64)
    ww = (Omega * Omega).sum(0).to(f64)
    return H, G, W, wAw, ww


def xtrace_samples(
    H: Tensor, G: Tensor, W: Tensor, wAw: Tensor, ww: Tensor, n: int, normalize: bool, eps: float
) -> Tensor:
    r"""The ``m`` leave-one-out estimates $t_i$ of XTrace from `sketch_coordinates`.

    With ``P_i`` the orthogonal projector onto ``range(Y_{-i})`` (``Y`` without column
    ``i``), $t_i = \operatorname{tr}(P_i A P_i) + c_i\,\omega_i^\top (I-P_i) A (I-P_i)\omega_i$,
    where $c_i = (n - \dim P_i)/\|(I-P_i)\omega_i\|^2$ when ``normalize`` (the improved
    estimator) and 1 otherwise.

    If ``G`` has full column rank and is well conditioned (condition number below
    $1/\sqrt{\epsilon}$, ``eps`` the working precision), ``range(Y_{-i})`` is ``range(Q)``
    minus the single direction $Q s_i$, $s_i \propto G^{-\top} e_i$: this is the $O(m^3)$
    downdating. Otherwise `rank_deficient_downdate` does the same from an SVD of $G$.
    """
    f64 = torch.float64
    m = G.shape[1]
    r = G.shape[0]
    trace_h = torch.trace(H)
    sv = torch.linalg.svdvals(G) if r else torch.zeros(0, dtype=f64, device=G.device)
    well_conditioned = r == m and r > 0 and float(sv[-1]) > math.sqrt(eps) * float(sv[0])
    if well_conditioned:
        S = torch.linalg.inv(G).T  # column i is G^{-T} e_i, orthogonal to G_j for j != i
        S = S / torch.linalg.vector_norm(S, dim=0, keepdim=True)
        C = W - S * (S * W).sum(0)  # coordinates of P_i omega_i
        trace_proj = trace_h - (S * (H @ S)).sum(0)
        dims = torch.full((m,), float(r - 1), dtype=f64, device=G.device)
    else:
        C, trace_proj, dims = rank_deficient_downdate(
            H, G, W, 1e3 * eps * (float(sv[0]) if r else 0.0)
        )
    quad = wAw - 2 * (G * C).sum(0) + (C * (H @ C)).sum(0)
    if not normalize:
        return trace_proj + quad
    resid_norm_sq = (ww - (C * C).sum(0)).clamp_min(torch.finfo(f64).tiny)
    return trace_proj + (n - dims) * quad / resid_norm_sq


def rank_deficient_downdate(
    H: Tensor, G: Tensor, W: Tensor, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Leave-one-out projections for a rank-deficient or ill-conditioned ``G`` in $O(m^3)$.

    With the thin SVD $G = U \Sigma V^\top$ truncated to the singular values above ``tol``
    ($k$ of them), removing column $i$ either keeps $\operatorname{range}(U)$ or removes
    exactly the direction $s_i \propto U \Sigma^{-1} V^\top e_i$, the only direction of
    $\operatorname{range}(U)$ orthogonal to every other column. It is removed when it is
    numerically orthogonal to them, i.e. when
    $\|G_{-i}^\top s_i\| = \sqrt{h_i (1 - h_i)} / \|\Sigma^{-1} V^\top e_i\| \le$ ``tol``,
    $h_i = \|V^\top e_i\|^2$ the leverage of column $i$ (so $h_i = 1$: the column is needed
    for the rank; $1 - h_i$ is computed from the complement of $V$, without cancellation).
    Returns the coordinates ``C`` of $P_i \omega_i$, $\operatorname{tr}(P_i
    A P_i)$ and $\dim P_i$ for every $i$.
    """
    U, sigma, Vh = torch.linalg.svd(G, full_matrices=True)
    k = int((sigma > tol).sum())
    U, sigma, V = U[:, :k], sigma[:k], Vh[:k].T
    lev = (V * V).sum(1)
    lev_c = (Vh[k:] ** 2).sum(0)  # 1 - lev without cancellation
    inv = V / sigma  # row i is (Sigma^{-1} V^T e_i)^T
    inv_norm = torch.linalg.vector_norm(inv, dim=1).clamp_min(torch.finfo(G.dtype).tiny)
    drop = (lev > 0.5) & ((lev * lev_c).sqrt() / inv_norm <= tol)
    S = (U @ (inv / inv_norm.unsqueeze(1)).T) * drop  # columns s_i, zero when not dropped
    C = U @ (U.T @ W)
    C = C - S * (S * C).sum(0)
    HU = H @ U
    trace_proj = (U * HU).sum() - (S * (H @ S)).sum(0)
    dims = U.shape[1] - drop.to(G.dtype)
    return C, trace_proj, dims


def xtrace_stderr(
    samples: Tensor,
    H: Tensor,
    G: Tensor,
    W: Tensor,
    wAw: Tensor,
    ww: Tensor,
    n: int,
    normalize: bool,
    eps: float,
) -> float:
    r"""Standard error of the XTrace mean: the spread of the $t_i$ plus their covariance.

    Write $e_i = t_i - \operatorname{tr}(A)$. The $t_i$ are exchangeable with variance
    $\sigma^2$ and pairwise covariance $c$, so
    $\operatorname{Var}(\bar t) = \sigma^2/m + (1 - 1/m)\,c$, while the sample variance
    $s^2$ of the $t_i$ has expectation $\sigma^2 - c$. Hence

    $$
    \operatorname{Var}(\bar t) = \mathbb{E}\bigl[s^2/m\bigr] + c ,
    $$

    the paper's estimate $s^2/m$ plus the covariance it leaves out. The covariance has an
    exact representation: let $t_i^{(-J)}$ be the leave-one-out estimate of probe $i$ built
    with the probes of a group $J \not\ni i$ removed from the sketch. It does not depend
    on $\omega_j$ ($j \in J$), and $\mathbb{E}[e_j \mid \omega_k, k \ne j] = 0$ (the
    projector of $t_j$ does not depend on $\omega_j$), so
    $\mathbb{E}[t_i^{(-J)} e_j] = 0$ and

    $$
    c = \operatorname{Cov}(e_i, e_j)
      = \mathbb{E}\bigl[(t_i - t_i^{(-J)})\, e_j\bigr] .
    $$

    The probes are split into $g = \min(m, 20)$ contiguous groups; $\hat c$ averages
    $(t_i - t_i^{(-J)})(t_j - \bar t)$ over all pairs $i \notin J$, $j \in J$ (the centring
    at $\bar t$ instead of the unknown trace leaves a bias of relative order $1/m$).
    Returns $\sqrt{s^2/m + \tilde c}$, $\tilde c$ = `shrunk_covariance` (0 when $\hat c$ is
    not positive beyond its own noise); ``inf`` below 2 probes.

    No products with $A$ are needed: $Y$ without group $J$ spans $Q U_J$ for an
    orthonormal $U_J$ of the $r \times m$ matrix $Q^\top Y$ without those columns, and
    $A Q U_J = (AQ) U_J$; each group costs $O(m^3)$ on small matrices.
    """
    m = G.shape[1]
    if m < 2:
        return math.inf
    spread_sq = float(samples.var(unbiased=True)) / m
    g = min(m, MAX_GROUPS)
    bounds = [(j * m) // g for j in range(g + 1)]
    scale = float(torch.linalg.vector_norm(G, dim=0).max()) if G.numel() else 0.0
    dev = samples - samples.mean()
    terms, pairs = [], []
    for j in range(g):
        keep = torch.cat([torch.arange(bounds[j]), torch.arange(bounds[j + 1], m)]).to(G.device)
        Gk = G[:, keep]
        U, s, _ = torch.linalg.svd(Gk, full_matrices=False)
        U = U[:, s > 1e3 * eps * scale]
        left_out = xtrace_samples(
            U.T @ H @ U, U.T @ Gk, U.T @ W[:, keep], wAw[keep], ww[keep], n, normalize, eps
        )
        influence = float((samples[keep] - left_out).sum())
        terms.append(influence * float(dev[bounds[j] : bounds[j + 1]].sum()))
        pairs.append(keep.numel() * (bounds[j + 1] - bounds[j]))
    return math.sqrt(spread_sq + shrunk_covariance(terms, pairs))


def shrunk_covariance(terms: list[float], pairs: list[int]) -> float:
    r"""The pooled covariance $\hat c = \sum_J T_J / \sum_J p_J$, shrunk toward 0 by its noise.

    $T_J$ is group $J$'s sum of products over its $p_J$ pairs. The groups give nearly
    independent terms, so the standard error of the ratio $\hat c$ is
    $\mathrm{se} = \sqrt{\tfrac{g}{g-1}\sum_J (T_J - p_J \hat c)^2} / \sum_J p_J$.
    Returned: $\hat c\,(1 - \mathrm{se}^2/\hat c^2)$ for $\hat c > \mathrm{se}$, else 0
    (positive-part shrinkage: $\hat c^2 - \mathrm{se}^2$ is unbiased for $c^2$). A
    well-determined $\hat c$ is nearly unchanged; a $\hat c$ lost in its own noise, as just
    past a rank edge where dropping a group from the sketch loses part of the dominant range
    and the influences $t_i - t_i^{(-J)}$ become heavy-tailed, counts as 0.
    """
    g = len(terms)
    T = torch.tensor(terms, dtype=torch.float64)
    P = torch.tensor(pairs, dtype=torch.float64)
    c = float(T.sum() / P.sum())
    if g < 2 or c <= 0:
        return 0.0
    se_sq = g / (g - 1) * float(((T - P * c) ** 2).sum()) / float(P.sum()) ** 2
    return max(0.0, c - se_sq / c)


def next_probes(probes: int, stderr: float, target: float) -> int:
    """Probes for the next ``rtol`` round (at least 2 more, at most 1.5 times as many).

    The error is predicted to fall like ``1/m`` (the fast end of XTrace's range), so the
    prediction undershoots instead of overshooting; the cap bounds the overshoot of the
    last round to 1.5 times the probes at which the target was first met.
    """
    most = max(probes + 2, math.ceil(MAX_GROWTH * probes))
    if not math.isfinite(stderr) or target <= 0:
        return most
    return max(probes + 2, min(most, math.ceil(probes * stderr / target)))


@full_precision_fn
def xtrace(
    A: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    *,
    num_matvecs: int | None = None,
    rtol: float | None = None,
    max_matvecs: int = 1000,
    distribution: str = "gaussian",
    generator: torch.Generator | None = None,
    size: int | None = None,
) -> TraceEstimate:
    r"""XTrace: the exchangeable trace estimator (Epperly, Tropp & Webber 2024).

    With $m$ probes $\Omega = [\omega_1, \dots, \omega_m]$ and $Y = A\Omega$, every probe
    plays both roles of Hutch++: for each $i$ the range of $Y$ without column $i$ deflates
    $A$ (projector $P_i$) and $\omega_i$ probes the remainder,

    $$
    t_i = \operatorname{tr}(P_i A P_i)
    + \omega_i^\top (I - P_i) A (I - P_i)\, \omega_i ,
    \qquad
    \widehat{\operatorname{tr}}(A) = \frac{1}{m}\sum_{i=1}^{m} t_i ,
    $$

    which is unbiased because $P_i$ does not depend on $\omega_i$. The products are $A\Omega$
    and $AQ$ for an orthonormal basis $Q$ of $\operatorname{range}(Y)$: $2m$ matvecs. All
    $m$ projectors come from $Q$ by a rank-one downdate ($O(n m^2 + m^3)$ work beyond the
    products).

    The reported ``stderr`` estimates the standard deviation of the estimate over the
    probes. The paper's $\sqrt{\sum_i (t_i - \widehat{\operatorname{tr}})^2 / (m(m-1))}$
    treats the $t_i$ as independent; they are not (they share the deflation basis, and are
    positively correlated), so alone it is optimistic (0.5–0.9 times the true RMSE in the
    calibration benchmark). Their covariance is estimated from an exact identity, reusing
    the stored products (`xtrace_stderr`): with $t_i^{(-J)}$ the estimate of probe $i$ with
    a group $J$ of other probes left out of the sketch,
    $\operatorname{Cov}(t_i, t_j) = \mathbb{E}[(t_i - t_i^{(-J)})(t_j -
    \operatorname{tr} A)]$ for $j \in J$, and

    $$
    \mathrm{stderr}^2 = \frac{1}{m(m-1)}\sum_{i}(t_i - \widehat{\operatorname{tr}})^2
    + \hat c ,
    $$

    $\hat c$ the average of $(t_i - t_i^{(-J)})(t_j - \widehat{\operatorname{tr}})$ over
    $g = \min(m, 20)$ groups, shrunk toward 0 by its own standard error (positive-part
    shrinkage; it only matters when $\hat c$ is lost in its noise, as just past a rank
    edge). It is neither a bound nor a blend of two wrong estimates: an estimate of
    $\operatorname{Var}(\widehat{\operatorname{tr}})$, unbiased up to the centring at
    $\widehat{\operatorname{tr}}$ and the shrinkage; see the calibration benchmark on the
    linalg API page for ``stderr / RMSE``. The group recomputations cost $O(g\,m^3)$ work on
    small matrices and no products.

    With Gaussian probes (the default) the remainder probe is normalized as in the paper's
    improved estimator: $(I-P_i)\omega_i$ is rescaled to length $\sqrt{n - m + 1}$, which
    keeps $t_i$ unbiased (the direction is uniform in the complement) and lowers the
    variance. Rademacher probes are used unnormalized (normalization would bias them).

    Departures from the paper: an odd ``num_matvecs`` is rounded down to an even budget
    (``num_matvecs`` in the result is what was spent); with ``rtol``, 8 probes first, then
    rounds sized by the error so far (predicted to fall like $1/m$, so rounds undershoot
    rather than overshoot; at most 1.5 times the probes so far), reusing all earlier
    products, until
    ``stderr <= rtol * |value|`` or ``max_matvecs``.

    Args:
        A: Dense symmetric tensor, `LinearOperator` or matvec callable (then pass ``size``).
        num_matvecs: Fixed budget, at least 4 (``num_matvecs // 2`` probes, at most ``n``).
        rtol: Target relative standard error, instead of ``num_matvecs``.
        max_matvecs: Cap on products when ``rtol`` is given.
        distribution: ``"gaussian"`` (default, normalized) or ``"rademacher"``.
        generator: Source of all randomness; the global RNG is untouched when given.
        size: Dimension, when ``A`` is a callable.

    Returns:
        A `TraceEstimate` whose ``samples`` are the $t_i$ (their mean is ``value``; the
        ``stderr`` includes their covariance, so it is not their plain standard error).

    Raises:
        ValueError: On a budget below 4 or above ``2n``, both or neither of
            ``num_matvecs`` / ``rtol``, an unknown distribution, or a non-square or
            non-symmetric dense ``A``.
        TypeError: On a wrongly typed argument.

    Examples:
        >>> import torch
        >>> from sharpgen.linalg import xtrace
        >>> A = torch.diag(torch.tensor([100.0, 10.0, 1.0, 0.0, 0.0], dtype=torch.float64))
        >>> est = xtrace(A, num_matvecs=10, generator=torch.Generator().manual_seed(0))
        >>> round(est.value, 8), est.stderr < 1e-8  # rank 3 < 5 - 1 probes: exact
        (111.0, True)

    References:
        E. N. Epperly, J. A. Tropp, R. J. Webber, "XTrace: Making the most of every sample
        in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024.
        E. N. Epperly, J. A. Tropp, "Efficient error and variance estimation for randomized
        matrix computations", SIAM J. Sci. Comput. 46(1), 2024 (leave-one-out reuse of the
        sketch).
    """
    op = as_linear_operator(A, size=size, check_symmetric=True)
    num_matvecs, rtol, max_matvecs = resolve_budget(
        num_matvecs, rtol, max_matvecs, minimum=4, method="xtrace"
    )
    distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
    generator = check_generator(generator)
    n = op.shape[0]
    if num_matvecs is not None and num_matvecs // 2 > n:
        raise ValueError(
            f"xtrace uses num_matvecs // 2 probes, at most the dimension n={n}; got "
            f"num_matvecs={num_matvecs}. For that budget compute the exact trace with n "
            "products (e.g. A.to_dense().trace())."
        )
    normalize = distribution == "gaussian"
    start = op.num_matvecs
    Omega = torch.empty(n, 0, dtype=op.dtype, device=op.device)
    Y, Q, Z = Omega, Omega, Omega
    scale = 0.0

    def grow(num_probes: int) -> None:
        nonlocal Omega, Y, Q, Z, scale
        Om = draw_probes(
            n, num_probes, distribution=distribution, generator=generator,
            dtype=op.dtype, device=op.device,
        )  # fmt: skip
        Yn = op.matmat(Om)
        scale = max(scale, float(torch.linalg.vector_norm(Yn, dim=0).max()))
        Q_add = extend_basis(Q, Yn, scale)
        if Q_add.shape[1]:
            Z = torch.cat([Z, op.matmat(Q_add)], dim=1)
            Q = torch.cat([Q, Q_add], dim=1)
        Omega = torch.cat([Omega, Om], dim=1)
        Y = torch.cat([Y, Yn], dim=1)

    eps = torch.finfo(op.dtype).eps

    def estimate() -> tuple[Tensor, float]:
        coords = sketch_coordinates(Omega, Y, Q, Z)
        samples = xtrace_samples(*coords, n, normalize, eps)
        return samples, xtrace_stderr(samples, *coords, n, normalize, eps)

    converged = True
    if num_matvecs is not None:
        grow(num_matvecs // 2)
        samples, stderr = estimate()
    else:
        assert rtol is not None  # resolve_budget: exactly one of num_matvecs and rtol
        max_probes = min(max_matvecs // 2, n)
        probes = min(8, max_probes)
        while True:
            grow(probes - Omega.shape[1])
            samples, stderr = estimate()
            target = rtol * abs(float(samples.mean()))
            if stderr <= target:
                break
            if probes >= max_probes:
                converged = False
                break
            probes = min(next_probes(probes, stderr, target), max_probes)
    return TraceEstimate(
        value=float(samples.mean()),
        stderr=stderr,
        num_matvecs=op.num_matvecs - start,
        method="xtrace",
        samples=samples.to(op.dtype).detach(),
        converged=converged,
        rtol=rtol,
    )
