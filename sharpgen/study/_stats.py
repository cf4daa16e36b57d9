r"""Rank statistics of a study: pure functions of a measure, a target and the hyperparameters.

Every function takes ``x`` (the measure, one value per model), ``y`` (the target, e.g. the
generalization gap) and, where it needs them, ``codes``: the hyperparameters as an integer
array ``(n_models, n_axes)`` (each axis' values coded ``0, 1, ...``). An optional ``index``
(model indices, possibly repeated) evaluates the statistic on a bootstrap resample: pairs of
two copies of the same model are left out, so a resample is a sample of *pairs of distinct
models*, as the statistics are defined.

References:
    Jiang, Neyshabur, Mobahi, Krishnan & Bengio (2020), "Fantastic Generalization Measures
    and Where to Find Them", ICLR, arXiv:1912.02178, Sec. 5 (Kendall's $\tau$, granulated
    $\psi$, $\Psi$) and Sec. 6 (conditional mutual information).
    Dziugaite, Drouin, Neal, Rajkumar, Caballero, Wang, Mitliagkas & Roy (2020), "In Search
    of Robust Measures of Generalization", NeurIPS, arXiv:2010.11924, Sec. 3 (sign-error
    over coupled environments).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SignErrors",
    "conditional_mutual_information",
    "granulated_kendall",
    "kendall_tau",
    "sign_errors",
]


def _index(n: int, index: np.ndarray | None) -> np.ndarray:
    return np.arange(n) if index is None else np.asarray(index)


def _signs(v: np.ndarray) -> np.ndarray:
    return np.sign(v[:, None] - v[None, :])


def kendall_tau(x: np.ndarray, y: np.ndarray, index: np.ndarray | None = None) -> float:
    r"""Kendall's rank correlation as Jiang et al. (2020, eq. 3) define it.

    .. math::
        \tau = \frac{1}{|T|(|T|-1)} \sum_{i \ne j}
            \operatorname{sign}(x_i - x_j)\, \operatorname{sign}(y_i - y_j)

    over ordered pairs of distinct models; a tie in either variable contributes 0 (this is
    $\tau_a$; without ties it equals scipy's $\tau_b$).

    Args:
        x: The measure, shape ``(n,)``.
        y: The target, shape ``(n,)``.
        index: Optional resample of model indices (pairs of one model with itself are
            left out).

    Returns:
        $\tau \in [-1, 1]$, ``nan`` with fewer than two distinct models.

    Example:
        >>> kendall_tau(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.3, 0.2]))
        0.3333333333333333
    """
    r = _index(len(x), index)
    prod = _signs(np.asarray(x, float)[r]) * _signs(np.asarray(y, float)[r])
    mask = r[:, None] != r[None, :]
    return float(prod[mask].mean()) if mask.any() else float("nan")


def granulated_kendall(
    x: np.ndarray, y: np.ndarray, codes: np.ndarray, axis: int, index: np.ndarray | None = None
) -> float:
    r"""Jiang et al.'s granulated Kendall coefficient $\psi_k$ of one hyperparameter axis.

    Models are grouped by the values of every *other* axis; within a group only axis ``k``
    varies. $\psi_k$ is the mean over groups of Kendall's $\tau$ within the group (Jiang et
    al. 2020, eq. 4), taken over the pairs of models whose values of axis ``k`` differ
    (groups without such a pair are left out):

    .. math::
        \psi_k = \frac{1}{m_k} \sum_{\theta_{-k}}
            \tau\bigl(\{(\mu(\theta), g(\theta)) : \theta_{-k} \text{ fixed}\}\bigr).

    Args:
        x: The measure, ``(n,)``.
        y: The target, ``(n,)``.
        codes: Integer-coded hyperparameters, ``(n, n_axes)``.
        axis: The axis $k$ (column of ``codes``).
        index: Optional bootstrap resample of model indices.

    Returns:
        $\psi_k$, ``nan`` if no group has two models that differ in axis ``k``.

    Example:
        >>> codes = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
        >>> granulated_kendall(np.array([1., 2, 3, 4]), np.array([1., 2, 4, 3]), codes, 0)
        0.0
    """
    r = _index(len(x), index)
    c = np.asarray(codes)[r]
    others = np.delete(c, axis, axis=1)
    same_others = (others[:, None, :] == others[None, :, :]).all(-1)
    valid = same_others & (c[:, None, axis] != c[None, :, axis]) & (r[:, None] != r[None, :])
    prod = _signs(np.asarray(x, float)[r]) * _signs(np.asarray(y, float)[r])
    _, group = np.unique(others, axis=0, return_inverse=True)
    group = group.reshape(-1)
    taus = []
    for gid in np.unique(group):
        rows = group == gid
        sub = valid[np.ix_(rows, rows)]
        if sub.any():
            taus.append(prod[np.ix_(rows, rows)][sub].mean())
    return float(np.mean(taus)) if taus else float("nan")


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _joint_codes(*cols: np.ndarray) -> np.ndarray:
    """One integer per row for the tuple of (non-negative integer) columns, mixed radix."""
    out = np.zeros(len(cols[0]), dtype=np.int64)
    for c in cols:
        out = out * (int(c.max()) + 1) + c
    return out


def conditional_mutual_information(
    x: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    subset: tuple[int, ...] = (),
    index: np.ndarray | None = None,
) -> float:
    r"""Jiang et al.'s normalized conditional mutual information $\hat I(V_\mu, V_g \mid U_S)$.

    Over ordered pairs $(i, j)$ of distinct models with $g_i \ne g_j$:
    $V_g = \operatorname{sign}(g_i - g_j) \in \{\pm 1\}$,
    $V_\mu = \operatorname{sign}(\mu_i - \mu_j) \in \{-1, 0, 1\}$ and
    $U_S = (\theta_{i,S}, \theta_{j,S})$, the values of the hyperparameters in $S$ of both
    models (Jiang et al. 2020, Sec. 6). With the empirical distribution of the pairs,

    .. math::
        \hat I = \frac{I(V_\mu; V_g \mid U_S)}{H(V_g \mid U_S)},\quad
        I(V_\mu; V_g \mid U_S) = H(V_\mu, U_S) + H(V_g, U_S) - H(V_\mu, V_g, U_S) - H(U_S),

    in $[0, 1]$: 1 when the measure's order determines the target's within every value of
    $U_S$, 0 when it carries no information beyond $U_S$.

    Args:
        x: The measure, ``(n,)``.
        y: The target, ``(n,)``.
        codes: Integer-coded hyperparameters, ``(n, n_axes)``.
        subset: The conditioning axes $S$ (columns of ``codes``); ``()`` gives the plain
            normalized mutual information.
        index: Optional bootstrap resample of model indices.

    Returns:
        $\hat I$, ``nan`` when $H(V_g \mid U_S) = 0$ or no pair has $g_i \ne g_j$.

    Example:
        >>> codes = np.zeros((3, 1), dtype=int)
        >>> conditional_mutual_information(np.array([1., 2, 3]), np.array([1., 2, 3]), codes)
        1.0
    """
    r = _index(len(x), index)
    xs, ys = np.asarray(x, float)[r], np.asarray(y, float)[r]
    i, j = np.nonzero((r[:, None] != r[None, :]) & (ys[:, None] != ys[None, :]))
    if len(i) == 0:
        return float("nan")
    vg = (ys[i] > ys[j]).astype(np.int64)
    vm = (np.sign(xs[i] - xs[j]) + 1).astype(np.int64)
    c = np.asarray(codes)[r][:, list(subset)]
    u = _joint_codes(*c[i].T, *c[j].T) if subset else np.zeros(len(i), dtype=int)

    def h(*cols: np.ndarray) -> float:
        return _entropy(np.unique(_joint_codes(*cols), return_counts=True)[1])

    h_u = h(u)
    h_g_given_u = h(vg, u) - h_u
    if h_g_given_u <= 1e-12:
        return float("nan")
    info = h(vm, u) + h(vg, u) - h(vm, vg, u) - h_u
    return float(min(max(info / h_g_given_u, 0.0), 1.0))


def min_cmi(
    x: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    max_size: int = 2,
    index: np.ndarray | None = None,
) -> tuple[float, tuple[int, ...]]:
    r"""$\min_{|S| \le 2} \hat I(V_\mu, V_g \mid U_S)$ (Jiang et al. 2020, Sec. 6) and the $S$."""
    best, best_s = float("nan"), tuple[int, ...]()
    for size in range(max_size + 1):
        for s in itertools.combinations(range(codes.shape[1]), size):
            v = conditional_mutual_information(x, y, codes, s, index)
            if not np.isnan(v) and (np.isnan(best) or v < best):
                best, best_s = v, s
    return best, best_s


@dataclass(frozen=True)
class SignErrors:
    r"""Dziugaite et al.'s sign-errors, one per environment.

    Attributes:
        values: The sign-error of each environment, ``(n_env,)``.
        axes: The axis that varies in each environment (column of ``codes``).
        pairs: ``(setting a, setting b)`` model indices of each environment's first pair.
    """

    values: np.ndarray
    axes: np.ndarray
    pairs: tuple[tuple[int, int], ...]


def sign_errors(
    x: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray,
    seed_axis: int | None = None,
    min_gap_diff: float = 0.0,
) -> SignErrors:
    r"""The sign-error of the measure in every environment (Dziugaite et al. 2020, Sec. 3).

    An environment is a pair of hyperparameter settings $(\omega, \omega')$ that differ in
    exactly one axis (the seed axis, if any, does not count as a hyperparameter: models of
    one environment are *coupled* by their seed, i.e. compared only with the model of the
    other setting trained with the same seed). Its sign-error is the mean over the coupled
    pairs of

    .. math::
        \tfrac12\bigl(1 - \operatorname{sign}(\mu(\omega) - \mu(\omega'))\,
            \operatorname{sign}(g(\omega) - g(\omega'))\bigr),

    1 when the measure orders the pair against the target, 0 when with it, 1/2 for a tie
    of the measure. Pairs with $|g(\omega) - g(\omega')| \le$ ``min_gap_diff`` are left out
    (Dziugaite et al. filter out pairs whose difference is within noise); an environment
    without pairs is left out.

    Args:
        x: The measure, ``(n,)``.
        y: The target, ``(n,)``.
        codes: Integer-coded hyperparameters, ``(n, n_axes)``.
        seed_axis: The column of ``codes`` that holds the seed, or None.
        min_gap_diff: Smallest target difference a pair must have.

    Returns:
        A `SignErrors`.

    Example:
        >>> codes = np.array([[0, 0], [1, 0], [0, 1]])
        >>> sign_errors(np.array([1., 2, 3]), np.array([1., 0, 2]), codes).values
        array([0., 1.])
    """
    x, y, codes = np.asarray(x, float), np.asarray(y, float), np.asarray(codes)
    hp = [a for a in range(codes.shape[1]) if a != seed_axis]
    settings, setting_of = np.unique(codes[:, hp], axis=0, return_inverse=True)
    setting_of = setting_of.reshape(-1)
    seed = codes[:, seed_axis] if seed_axis is not None else np.zeros(len(x), dtype=int)
    values, axes, pairs = [], [], []
    for a, b in itertools.combinations(range(len(settings)), 2):
        differ = np.nonzero(settings[a] != settings[b])[0]
        if len(differ) != 1:
            continue
        errs, first = [], None
        for i in np.nonzero(setting_of == a)[0]:
            for j in np.nonzero((setting_of == b) & (seed == seed[i]))[0]:
                if abs(y[i] - y[j]) <= min_gap_diff:
                    continue
                errs.append(0.5 * (1 - np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])))
                first = first or (int(i), int(j))
        if errs and first is not None:
            values.append(float(np.mean(errs)))
            axes.append(hp[int(differ[0])])
            pairs.append(first)
    return SignErrors(np.array(values), np.array(axes, dtype=int), tuple(pairs))
