"""Lanczos and power iteration against dense float64 eigendecompositions."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharpgen.linalg import as_linear_operator, lanczos, power_iteration

N = 200


def random_orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def with_spectrum(lam, seed=0):
    Q = random_orthogonal(lam.numel(), seed)
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, Q


def _bulk(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def spectra():
    i = torch.arange(1, N + 1, dtype=torch.float64)
    close = torch.cat(
        [torch.tensor([10.0, 9.7, 5.0, 4.0, 3.0], dtype=torch.float64), _bulk(N - 5, 0.0, 1.0, 1)]
    )
    outliers = torch.cat(
        [
            torch.tensor([50.0, 30.0, 20.0, 15.0, 12.0, -10.0, -20.0], dtype=torch.float64),
            _bulk(N - 7, -2.0, 2.0, 2),
        ]
    )
    return {
        "close_gap": close,
        "outliers_negative": outliers,
        "power_1": 100 / i,
        "power_2": 100 / i**2,
    }


SPECTRA = spectra()


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("k", [1, 5])
def test_top_k_within_tol_whenever_converged(name, k):
    lam = SPECTRA[name]
    A, _ = with_spectrum(lam, seed=10)
    truth = torch.sort(lam, descending=True).values[:k]
    tol = 1e-3
    ok = conv = 0
    seeds = 40
    for seed in range(seeds):
        res = lanczos(A, k, tol=tol, generator=torch.Generator().manual_seed(seed))
        conv += res.converged
        err = ((res.eigenvalues - truth).abs() / truth.abs()).max()
        ok += bool(res.converged and err <= tol)
        # the residual bound holds whatever the convergence flag
        X = res.eigenvectors
        explicit = torch.linalg.vector_norm(A @ X - X * res.eigenvalues, dim=0)
        # with partial reorthogonalization: an upper bound, within the tolerance of it
        assert (res.residuals >= explicit * (1 - 1e-6) - 1e-12).all()
        assert (res.residuals <= explicit + tol * res.eigenvalues.abs()).all()
    assert conv >= 0.9 * seeds
    assert ok >= 0.95 * conv


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("largest", [50.0, 30.0, 20.0]),
        ("smallest", [-20.0, -10.0]),
        ("both_ends", [50.0, 30.0, -10.0, -20.0]),
        ("magnitude", [50.0, 30.0, -20.0]),
    ],
)
def test_which_variants(which, expected):
    A, Q = with_spectrum(SPECTRA["outliers_negative"], seed=3)
    k = len(expected)
    res = lanczos(A, k, which=which, tol=1e-8, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.which == which
    if which == "magnitude":  # -20 and 20 tie in magnitude: rounding picks either
        assert abs(abs(float(res.eigenvalues[2])) - 20.0) <= 20.0 * 1e-8
        expected = [*expected[:2], 20.0 if float(res.eigenvalues[2]) > 0 else -20.0]
    torch.testing.assert_close(
        res.eigenvalues, torch.tensor(expected, dtype=torch.float64), rtol=1e-8, atol=0
    )
    # eigenvectors: orthonormal, and aligned with the true eigenvectors
    X = res.eigenvectors
    torch.testing.assert_close(X.T @ X, torch.eye(k, dtype=torch.float64), atol=1e-8, rtol=0)
    lam = SPECTRA["outliers_negative"]
    for j, value in enumerate(expected):
        u = Q[:, int(torch.argmin((lam - value).abs()))]
        assert abs(float(u @ X[:, j])) > 1 - 1e-6


def test_guarantee_is_a_relative_residual_bound():
    A, _ = with_spectrum(SPECTRA["power_1"], seed=4)
    for tol in [1e-2, 1e-4, 1e-8]:
        res = lanczos(A, 3, tol=tol, generator=torch.Generator().manual_seed(1))
        assert res.converged
        assert bool((res.residuals <= tol * res.eigenvalues.abs() / (1 + tol)).all())
        truth = torch.tensor([100.0, 50.0, 100 / 3], dtype=torch.float64)
        assert float(((res.eigenvalues - truth).abs() / truth).max()) <= tol


def test_thick_restart_with_a_small_basis():
    A, _ = with_spectrum(SPECTRA["close_gap"], seed=5)
    res = lanczos(A, 5, tol=1e-6, max_basis=12, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.num_restarts > 0
    truth = torch.tensor([10.0, 9.7, 5.0, 4.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, truth, rtol=1e-6, atol=0)
    assert res.num_matvecs == res.num_iterations


def test_max_iter_gives_honest_non_convergence():
    A, _ = with_spectrum(SPECTRA["close_gap"], seed=6)
    res = lanczos(A, 1, tol=1e-12, max_iter=5, generator=torch.Generator().manual_seed(0))
    assert not res.converged and res.num_matvecs == 5
    X = res.eigenvectors
    explicit = torch.linalg.vector_norm(A @ X - X * res.eigenvalues, dim=0)
    torch.testing.assert_close(res.residuals, explicit, rtol=1e-6, atol=1e-12)
    # the residual still bounds the distance to the spectrum
    lam = SPECTRA["close_gap"]
    assert float((lam - res.eigenvalues[0]).abs().min()) <= float(res.residuals[0]) + 1e-12


def test_invariant_subspace_restarts_with_a_fresh_vector():
    # v0 is an eigenvector: the Krylov space closes after one step
    lam = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    A = torch.diag(lam)
    v0 = torch.zeros(6, dtype=torch.float64)
    v0[2] = 1.0
    res = lanczos(A, 2, tol=1e-10, v0=v0, generator=torch.Generator().manual_seed(0))
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, lam[:2])


def test_few_distinct_eigenvalues_and_small_n():
    lam = torch.tensor([3.0] * 20 + [1.0] * 20 + [-1.0] * 10, dtype=torch.float64)
    A, _ = with_spectrum(lam, seed=7)
    res = lanczos(A, 2, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 3.0], dtype=torch.float64))
    B = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    res = lanczos(B, 2, tol=1e-12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 1.0], dtype=torch.float64))


def test_callable_float32_and_operator_inputs():
    A, _ = with_spectrum(SPECTRA["power_2"], seed=8)
    A32 = A.float()
    op32 = as_linear_operator(lambda v: A32 @ v, size=N, dtype=torch.float32)
    res = lanczos(op32, 2, tol=1e-3, generator=torch.Generator().manual_seed(0))
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.shape == (N, 2)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([100.0, 25.0]), rtol=1e-3, atol=0)
    op = as_linear_operator(A)
    res = lanczos(op, 1, generator=torch.Generator().manual_seed(0))
    assert op.num_matvecs == res.num_matvecs > 0


def test_power_iteration_baseline_needs_more_products_on_a_close_gap():
    A, _ = with_spectrum(SPECTRA["close_gap"], seed=9)
    pw = power_iteration(A, tol=1e-4, max_iter=5000, generator=torch.Generator().manual_seed(0))
    lz = lanczos(A, 1, tol=1e-4, generator=torch.Generator().manual_seed(0))
    assert pw.converged and lz.converged
    assert abs(float(pw) - 10.0) <= 1e-4 * 10.0
    assert pw.method == "power_iteration" and pw.num_matvecs > 5 * lz.num_matvecs
    pw_cap = power_iteration(A, tol=1e-12, max_iter=7, generator=torch.Generator().manual_seed(0))
    assert not pw_cap.converged and pw_cap.num_matvecs == 7


def test_generator_isolation_and_determinism():
    A, _ = with_spectrum(SPECTRA["power_1"], seed=11)
    state = torch.get_rng_state()
    a = lanczos(A, 3, tol=1e-6, generator=torch.Generator().manual_seed(123))
    b = lanczos(A, 3, tol=1e-6, generator=torch.Generator().manual_seed(123))
    p = power_iteration(A, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    assert p.num_matvecs > 0


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 30),
    seed=st.integers(0, 10_000),
    k=st.integers(1, 3),
    which=st.sampled_from(["largest", "smallest", "both_ends", "magnitude"]),
)
def test_property_converged_means_close_to_an_eigenvalue(n, seed, k, which):
    k = min(k, n - 1)
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = (M + M.T) / 2
    tol = 1e-6
    res = lanczos(A, k, which=which, tol=tol, generator=g)
    lam = torch.linalg.eigvalsh(A)
    scale = float(lam.abs().max())
    for theta in res.eigenvalues.tolist():
        dist = float((lam - theta).abs().min())
        if res.converged:
            assert dist <= tol * max(abs(theta), math.sqrt(2.2e-16) * scale) + 1e-12
    assert res.eigenvalues.numel() == k


def test_eigen_result_repr_names_the_subclass():
    from sharpgen.linalg import EigenResult

    class MyEigenResult(EigenResult):
        pass

    fields = dict(
        eigenvalues=torch.tensor([2.0, 1.0]),
        eigenvectors=torch.eye(2),
        residuals=torch.tensor([1e-9, 3e-9]),
        converged=True,
        num_matvecs=4,
        num_iterations=2,
    )
    assert repr(EigenResult(**fields)).startswith("EigenResult(eigenvalues=[2, 1], ")
    text = repr(MyEigenResult(**fields))
    assert text.startswith("MyEigenResult(eigenvalues=[2, 1], which='largest'")
    assert "max_residual=3e-09" in text


def test_error_bounds_closed_form():
    from sharpgen.linalg._lanczos import error_bounds

    theta = np.array([10.0, 4.0, 3.5])
    resid = np.array([0.1, 0.2, 2.0])
    assert error_bounds(theta, resid, "residual") == resid.tolist()
    assert error_bounds(theta, resid, "gap", [2, 0]) == [2.0, 0.1**2 / 4.5]
    gap = error_bounds(theta, resid, "gap")
    # theta_0: nearest other Ritz value moved by its residual: min(6 - 0.2, 6.5 - 2) = 4.5
    assert math.isclose(float(gap[0]), 0.1**2 / 4.5, rel_tol=1e-12)
    # theta_1: min(6 - 0.1, 0.5 - 2.0) < 0 -> no separation: the residual itself
    assert float(gap[1]) == 0.2 and float(gap[2]) == 2.0
    one = error_bounds(theta[:1], resid[:1], "gap")
    assert np.array_equal(one, resid[:1])


@pytest.mark.parametrize("name", ["power_1", "close_gap", "outliers_negative"])
@pytest.mark.parametrize("which", ["largest", "both_ends"])
def test_gap_bound_stops_earlier_within_tol(name, which):
    lam = SPECTRA[name]
    A, _ = with_spectrum(lam, seed=7)
    k, tol = 3, 1e-4
    order = torch.sort(lam, descending=True).values
    truth = order[:k] if which == "largest" else torch.cat([order[:2], order[-1:]])
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        res = lanczos(A, k, which=which, tol=tol, bound="gap", generator=gen)
        ref = lanczos(A, k, which=which, tol=tol, generator=torch.Generator().manual_seed(seed))
        assert res.converged and res.num_matvecs <= ref.num_matvecs
        got = torch.sort(res.eigenvalues, descending=True).values
        want = torch.sort(truth, descending=True).values
        assert float(((got - want).abs() / want.abs()).max()) <= tol


def test_unknown_bound_is_refused():
    with pytest.raises(ValueError, match="bound"):
        lanczos(torch.eye(4, dtype=torch.float64), 1, bound="cheap")
