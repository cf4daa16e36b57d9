"""Partial reorthogonalization of Lanczos: dense float64 truth, ghosts, the certificate."""

import numpy as np
import pytest
import torch

import sharpgen.linalg._reorth as reorth_module
from sharpgen.linalg import as_linear_operator, lanczos
from sharpgen.linalg._lanczos import convergence_threshold
from sharpgen.linalg._reduce import dot, norm


def with_spectrum(lam, seed):
    g = torch.Generator().manual_seed(seed)
    n = lam.numel()
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def _bulk(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _spectrum(name, n=150):
    top = {
        "separated": [50.0, 30.0, 20.0, 15.0, 12.0, 10.0],
        "clustered": [10.0, 9.9, 9.8, 9.7, 9.6, 9.5],
    }[name]
    return torch.cat([torch.tensor(top, dtype=torch.float64), _bulk(n - len(top), -1.0, 1.0, 5)])


def _nearest(values, lam):
    return (values[:, None] - lam[None, :]).abs().min(dim=1).values


@pytest.mark.parametrize("name", ["separated", "clustered"])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("storage", ["device", "disk"])
def test_partial_equals_dense_truth(name, k, small, storage, tmp_path):
    lam = _spectrum(name)
    A = with_spectrum(lam, seed=1)
    exact = torch.linalg.eigvalsh(A)
    truth = torch.sort(lam, descending=True).values[:k]
    tol = 1e-3
    for seed in range(3):
        runs = {
            mode: lanczos(
                A,
                k,
                tol=tol,
                max_basis=k + 3 if small else None,
                reorth=mode,
                basis_storage=storage,
                basis_dir=str(tmp_path),
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
            for mode in ("partial", "full")
        }
        res = runs["partial"]
        assert res.converged
        assert (_nearest(res.eigenvalues, exact) <= tol * res.eigenvalues.abs()).all()
        if name == "separated":
            assert float(((res.eigenvalues - truth).abs() / truth).max()) <= tol
        else:
            # eigenvalues 1% apart at tol=1e-3: a Krylov space may stop before it has seen
            # one of them (here 9.8, in one seed); full reorthogonalization stops alike
            full = runs["full"].eigenvalues
            assert float(((res.eigenvalues - full).abs() / full).max()) <= 2 * tol
        if small:
            assert res.num_restarts > 0
        # the reported residuals bound the true ones of the unit Ritz vectors
        X = res.eigenvectors
        explicit = torch.linalg.vector_norm(A @ X - X * res.eigenvalues, dim=0)
        assert (res.residuals >= explicit * (1 - 1e-6) - 1e-12).all()
        assert not list(tmp_path.iterdir())  # the disk basis removed its file


def test_partial_and_full_give_the_same_values_and_products():
    A = with_spectrum(_spectrum("separated"), seed=2)
    for k in (1, 5):
        for seed in range(3):
            runs = {
                mode: lanczos(
                    A, k, tol=1e-6, reorth=mode, generator=torch.Generator().manual_seed(seed)
                )  # fmt: skip
                for mode in ("full", "partial")
            }
            full, partial = runs["full"], runs["partial"]
            assert full.num_reorth == full.num_iterations
            assert partial.num_matvecs == full.num_matvecs
            torch.testing.assert_close(partial.eigenvalues, full.eigenvalues, rtol=1e-6, atol=0)
            # full reorthogonalization: the residuals are the true ones
            X = full.eigenvectors
            explicit = torch.linalg.vector_norm(A @ X - X * full.eigenvalues, dim=0)
            torch.testing.assert_close(full.residuals, explicit, rtol=1e-6, atol=1e-12)


GHOST_LAMBDA = torch.cat(
    [torch.tensor([100.0, 50.0, 20.0, 10.0, 5.0], dtype=torch.float64), _bulk(395, 0.0, 1.0, 9)]
)


def test_without_reorthogonalization_ghosts_appear(monkeypatch):
    # the spectrum of the ghost test does make ghosts: with the estimate switched off (no
    # reorthogonalization at all) a copy of the converged top eigenvalue is returned
    monkeypatch.setattr(reorth_module.Partial, "estimate", lambda *args: False)
    A = with_spectrum(GHOST_LAMBDA, seed=3)
    res = lanczos(A, 5, tol=1e-10, max_basis=300, max_iter=300, reorth="partial",
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    vals = res.eigenvalues
    assert res.num_reorth == 0
    assert float((vals[1:] - vals[:-1]).abs().min()) < 1e-6 * 100  # a duplicate


@pytest.mark.parametrize("small", [False, True])
def test_partial_has_no_ghosts(small):
    A = with_spectrum(GHOST_LAMBDA, seed=3)
    truth = GHOST_LAMBDA[:5]
    for seed in range(3):
        res = lanczos(A, 5, tol=1e-10, max_basis=10 if small else 300, max_iter=2000,
                      reorth="partial", generator=torch.Generator().manual_seed(seed))  # fmt: skip
        assert res.converged
        torch.testing.assert_close(res.eigenvalues, truth, rtol=1e-9, atol=0)
        assert 0 < res.num_reorth < res.num_iterations


def test_reorthogonalization_counter():
    A = with_spectrum(_spectrum("separated"), seed=4)
    short = lanczos(A, 1, tol=1e-3, generator=torch.Generator().manual_seed(0))
    assert short.converged and short.num_reorth == 0 and short.num_iterations > 5
    B = with_spectrum(100 / torch.arange(1, 401, dtype=torch.float64), seed=4)
    long = lanczos(B, 5, tol=1e-10, max_basis=300, reorth="partial",
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert long.converged and long.num_restarts == 0
    assert 0 < long.num_reorth < long.num_iterations / 2
    full = lanczos(B, 5, tol=1e-10, max_basis=300, reorth="full",
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert full.num_reorth == full.num_iterations


def _random_spectrum(g, n):
    kind = int(torch.randint(4, (1,), generator=g))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if kind == 0:  # uniform
        return 10 * u - 2
    if kind == 1:  # power law
        return 100 / torch.arange(1, n + 1, dtype=torch.float64) ** (0.5 + 2 * float(u[0]))
    if kind == 2:  # a cluster on top of a bulk
        top = 10 + 1e-2 * torch.rand(4, generator=g, dtype=torch.float64)
        return torch.cat([top, u[4:]])
    return torch.cat([torch.tensor([20.0, -15.0, 8.0], dtype=torch.float64), u[3:] * 4 - 2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converged_means_within_tol_on_random_spectra(dtype):
    g = torch.Generator().manual_seed(123)
    checked = 0
    for trial in range(40):
        n = int(torch.randint(40, 200, (1,), generator=g))
        lam = _random_spectrum(g, n)
        A64 = with_spectrum(lam, seed=trial)
        A = A64.to(dtype)
        exact = torch.linalg.eigvalsh(A.double())  # the truth of the matrix used
        k = int(torch.randint(1, 6, (1,), generator=g))
        which = ["largest", "smallest", "magnitude"][trial % 3]
        tol = [1e-3, 1e-5][trial % 2] if dtype == torch.float64 else 1e-3
        res = lanczos(A, k, which=which, tol=tol, max_basis=[None, k + 3][trial % 2],
                      reorth="partial", generator=torch.Generator().manual_seed(trial))  # fmt: skip
        if not res.converged:
            continue
        checked += 1
        vals = res.eigenvalues.double()
        scale = float(exact.abs().max())  # the floor is relative to the largest |Ritz value|
        for v, d in zip(vals.tolist(), _nearest(vals, exact).tolist(), strict=True):
            # the guarantee: within tol relative (the floor sqrt(eps) * scale below)
            assert d <= convergence_threshold(v, scale, tol, dtype) * (1 + tol) * 1.01 + 1e-12
        X = res.eigenvectors.double()
        X = X / torch.linalg.vector_norm(X, dim=0)
        explicit = torch.linalg.vector_norm(A.double() @ X - X * vals, dim=0)
        # an upper bound, up to the rounding of the products (eps ||A|| times the steps: the
        # Lanczos relation holds to that, with "full" as well; trial 34 in float32, two
        # eigenvalues near 1e-3 of a matrix of norm 100, has 4e-4 = 36 eps ||A||)
        floor = 100 * torch.finfo(dtype).eps * scale
        assert (res.residuals.double() >= explicit * (1 - 1e-6) - floor).all()
    assert checked >= 36


@pytest.mark.parametrize("store", [torch.float16, torch.bfloat16])
def test_rounded_basis_with_partial(store, tmp_path):
    A = with_spectrum(_spectrum("separated"), seed=6).to(torch.float32)
    truth = torch.linalg.eigvalsh(A.double()).flip(0)[:3]
    res = lanczos(A, 3, tol=1e-3 if store == torch.float16 else 1e-2, basis_dtype=store,
                  reorth="partial",
                  max_basis=8, basis_storage="disk", basis_dir=str(tmp_path),
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert res.converged and res.num_reorth > 0
    X = res.eigenvectors.double()
    explicit = torch.linalg.vector_norm(A.double() @ X - X * res.eigenvalues.double(), dim=0)
    # rounded rows: the residuals reported are the explicit ones
    torch.testing.assert_close(res.residuals.double(), explicit, rtol=1e-3, atol=1e-5)
    tol = 1e-3 if store == torch.float16 else 1e-2
    assert float(((res.eigenvalues.double() - truth).abs() / truth).max()) <= tol


def test_accurate_reductions_of_long_float32_vectors():
    g = torch.Generator().manual_seed(0)
    n = 2_000_003  # not a multiple of the block
    x = torch.rand(n, generator=g)
    x[:5] = 300.0  # a few large entries: torch's float32 sums drift most here
    y = torch.rand(n, generator=g)
    ref = float(torch.dot(x.double(), y.double()))
    assert abs(float(dot(x, y)) - ref) <= 1e-6 * ref
    ref_norm = float(torch.linalg.vector_norm(x.double()))
    assert abs(float(norm(x)) - ref_norm) <= 1e-6 * ref_norm
    assert dot(x, y).dtype == torch.float64


def test_reorth_is_checked_and_auto_is_partial_for_one_eigenvalue():
    A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="reorth"):
        lanczos(A, 1, reorth="selective")
    B = with_spectrum(100 / torch.arange(1, 201, dtype=torch.float64), seed=8)
    one = lanczos(B, 1, tol=1e-3, generator=torch.Generator().manual_seed(0))
    assert one.num_reorth < one.num_iterations  # partial
    five = lanczos(B, 5, tol=1e-3, generator=torch.Generator().manual_seed(0))
    assert five.num_reorth == five.num_iterations  # full


def test_estimate_bounds_the_measured_loss_of_orthogonality(monkeypatch):
    # Simon's estimate, recorded each step, against the true v_{j+1}' v_k of the basis
    # (no reorthogonalization: the estimate only watches)
    recorded = []
    original = reorth_module.Partial.estimate

    def watch(self, T, j, alpha, beta):
        original(self, T, j, alpha, beta)
        recorded.append(float(np.abs(self.omega[: j + 1]).max()))
        return False

    monkeypatch.setattr(reorth_module.Partial, "estimate", watch)
    kept = {}
    original_close = reorth_module.Basis.close

    def close(self):
        kept["V"] = self.V.clone()
        original_close(self)

    monkeypatch.setattr(reorth_module.Basis, "close", close)
    A = with_spectrum(100 / torch.arange(1, 301, dtype=torch.float64), seed=7)
    lanczos(A, 1, tol=1e-14, max_iter=30, max_basis=40, reorth="partial",
            generator=torch.Generator().manual_seed(0))  # fmt: skip
    V = kept["V"][:30]
    G = (V @ V.T).abs()
    for j, est in enumerate(recorded[:29]):
        true = float(G[j + 1, : j + 1].max())
        if true < 1e-3:  # where it matters (before the loss is total)
            assert est >= true / 3, (j, est, true)


@pytest.mark.parametrize("reorth", ["partial", "full"])
def test_small_beta_of_a_long_float32_vector_is_no_invariant_subspace(reorth):
    # 10 + a spread of 1e-2: the Lanczos coefficients beta are about 5e-4 of ||A||; the
    # invariance test took beta below 100 eps ||A|| sqrt(n) (5e-3 ||A|| at n = 2e5) for
    # an invariant subspace and restarted from random vectors
    n = 200_000
    g = torch.Generator().manual_seed(0)
    d = 10 + 1e-2 * torch.rand(n, generator=g)
    d[0] = 10.02
    op = as_linear_operator(lambda x: d * x, size=n, dtype=torch.float32)
    res = lanczos(op, 1, tol=1e-7, reorth=reorth, generator=torch.Generator().manual_seed(1))
    assert res.converged
    assert abs(float(res.eigenvalues[0]) - 10.02) <= 1e-6 * 10.02
    calls = []
    original = torch.randn

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    import sharpgen.linalg._probes as probes

    probes.torch.randn = spy
    try:
        lanczos(op, 1, tol=1e-7, reorth=reorth, generator=torch.Generator().manual_seed(1))
    finally:
        probes.torch.randn = original
    assert len(calls) == 1  # the start vector only: no breakdown
