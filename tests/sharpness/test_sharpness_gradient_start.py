"""The gradient start of top_eigenvalues: planted spectra, fallbacks, determinism."""

from __future__ import annotations

import pytest
import torch

import sharpgen.sharpness._eigen as eigen
from sharpgen.curvature import GGNOperator, HessianOperator
from sharpgen.sharpness import top_eigenvalues

EIGS = [9.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05]


def planted(h, along: int = 0):
    """A quadratic whose gradient at the base point is exactly eigenvector ``along`` of A."""
    model, loss, data, A = h.quadratic_problem(EIGS)
    evals, evecs = torch.linalg.eigh(A)
    with torch.no_grad():
        model.theta.copy_(evecs[:, -1 - along])
    return model, loss, data, A, evals.flip(0)


def test_gradient_start_is_the_unit_gradient_plus_a_random_part(h):
    g = torch.tensor([3.0, 4.0], dtype=h.DT)
    v0 = eigen.gradient_start(g, h.g(0))
    r = v0 - g / 5.0
    assert float(r.norm()) == pytest.approx(eigen.GRADIENT_MIX, rel=1e-12)
    torch.testing.assert_close(v0, eigen.gradient_start(g, h.g(0)), rtol=0, atol=0)
    assert eigen.gradient_start(torch.zeros(2, dtype=h.DT), h.g(0)) is None
    assert eigen.gradient_start(torch.tensor([1.0, float("nan")], dtype=h.DT), h.g(0)) is None


@pytest.mark.parametrize("along", [0, 3])
def test_planted_top5_are_all_found_from_a_gradient_that_is_one_eigenvector(h, along):
    # the worst case of a biased start: the gradient is exactly one eigenvector, so without
    # the random part the Krylov space would see that eigenvalue only
    model, loss, data, A, truth = planted(h, along)
    for bound in ("residual", "gap"):
        res = top_eigenvalues(model, loss, data, k=5, tol=1e-8, start="gradient",
                              bound=bound, generator=h.g(1))  # fmt: skip
        assert res.converged
        torch.testing.assert_close(res.eigenvalues, truth[:5], rtol=1e-6, atol=0)


def test_gradient_along_the_top_eigenvector_needs_fewer_products(h):
    model, loss, data, A, truth = planted(h, 0)
    counts = {}
    for start in ("gradient", "random"):
        res = top_eigenvalues(model, loss, data, k=1, tol=1e-6, start=start, generator=h.g(2))
        assert res.eigenvalues[0].item() == pytest.approx(float(truth[0]), rel=1e-6)
        counts[start] = res.num_matvecs
    assert counts["gradient"] < counts["random"]


def test_auto_is_the_gradient_start_for_the_top_eigenvalue_only(h, monkeypatch):
    model, loss, data, A, truth = planted(h, 2)
    seen = []
    real = eigen.gradient_start

    def spy(g, generator):
        seen.append(g.clone())
        return real(g, generator)

    monkeypatch.setattr(eigen, "gradient_start", spy)
    auto = top_eigenvalues(model, loss, data, k=1, generator=h.g(3))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], A @ model.theta.detach(), rtol=1e-12, atol=1e-14)
    same = top_eigenvalues(model, loss, data, k=1, start="gradient", generator=h.g(3))
    torch.testing.assert_close(auto.eigenvalues, same.eigenvalues, rtol=0, atol=0)
    assert auto.num_matvecs == same.num_matvecs
    seen.clear()
    for kw in ({"k": 2}, {"k": 1, "which": "smallest"}, {"k": 2, "which": "both_ends"},
               {"k": 1, "start": "random"}):  # fmt: skip
        top_eigenvalues(model, loss, data, generator=h.g(3), **kw)
    assert seen == []
    top_eigenvalues(model, loss, data, k=1, which="magnitude", generator=h.g(3))
    assert len(seen) == 1


def test_zero_gradient_falls_back_to_the_random_start(h):
    model, loss, data, A = h.quadratic_problem(EIGS)  # theta = 0: a zero gradient
    a = top_eigenvalues(model, loss, data, k=1, start="gradient", generator=h.g(4))
    b = top_eigenvalues(model, loss, data, k=1, start="random", generator=h.g(4))
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=0)
    assert a.num_matvecs == b.num_matvecs


def test_gradient_start_on_a_trained_like_mlp_against_the_dense_hessian(h, state_check):
    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    dense = h.dense_hessian(model, h.mse, x, y)
    top = torch.linalg.eigvalsh(dense)[-1].item()
    check = state_check(model)
    rng = torch.get_rng_state()
    runs = [top_eigenvalues(model, h.mse, (x, y), k=1, tol=1e-8, generator=h.g(5))
            for _ in range(2)]  # fmt: skip
    assert torch.equal(torch.get_rng_state(), rng)
    check()
    for res in runs:
        assert res.converged and res.eigenvalues[0].item() == pytest.approx(top, rel=1e-7)
    torch.testing.assert_close(runs[0].eigenvectors, runs[1].eigenvectors, rtol=0, atol=0)


def test_start_is_checked(h):
    model, loss, data, A = h.quadratic_problem(EIGS)
    with pytest.raises(ValueError, match="start"):
        top_eigenvalues(model, loss, data, k=1, start="gradients")
    ggn = GGNOperator(model, loss, data)
    with pytest.raises(ValueError, match="start='random'"):
        top_eigenvalues(ggn, k=1, start="gradient")
    # a ready Hessian operator takes the gradient start; another operator a random one
    H = HessianOperator(model, loss, data)
    assert top_eigenvalues(H, k=1, start="gradient", generator=h.g(0)).converged
    assert top_eigenvalues(ggn, k=1, generator=h.g(0)).converged


def test_warm_start_from_the_top_eigenvector_needs_fewer_products(h):
    model, loss, data, A = h.quadratic_problem(EIGS)
    evals, evecs = torch.linalg.eigh(A)
    counts = {}
    for name, start in (("warm", evecs[:, -1]), ("random", "random")):
        res = top_eigenvalues(model, loss, data, k=1, tol=1e-6, start=start, generator=h.g(2))
        assert res.converged
        assert res.eigenvalues[0].item() == pytest.approx(float(evals[-1]), rel=1e-6)
        counts[name] = res.num_matvecs
    assert counts["warm"] < counts["random"]


def test_warm_start_along_the_second_eigenvector_still_finds_the_top_five(h):
    # the random part keeps every eigenvector in the Krylov space
    model, loss, data, A = h.quadratic_problem(EIGS)
    evals, evecs = torch.linalg.eigh(A)
    res = top_eigenvalues(model, loss, data, k=5, tol=1e-8, start=evecs[:, -2].float(),
                          generator=h.g(3))  # fmt: skip
    torch.testing.assert_close(res.eigenvalues, evals.flip(0)[:5], rtol=1e-7, atol=0)


def test_warm_start_is_drawn_from_the_generator_only(h):
    model, loss, data, A = h.quadratic_problem(EIGS)
    u = torch.linspace(1.0, 2.0, len(EIGS), dtype=h.DT)
    v0 = eigen.warm_start(u, len(EIGS), h.g(0))
    torch.testing.assert_close(v0, eigen.gradient_start(u, h.g(0)), rtol=0, atol=0)
    rng = torch.get_rng_state()
    a = top_eigenvalues(model, loss, data, k=1, start=u, generator=h.g(4))
    b = top_eigenvalues(model, loss, data, k=1, start=u, generator=h.g(4))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs


@pytest.mark.parametrize(
    ("start", "error", "match"),
    [
        (torch.ones(3, dtype=torch.float64), ValueError, r"shape \(14,\)"),
        (torch.ones(14, 1, dtype=torch.float64), ValueError, r"eigenvectors\[:, 0\]"),
        (torch.ones(14, dtype=torch.int64), TypeError, "floating-point"),
        (torch.zeros(14, dtype=torch.float64), ValueError, "finite nonzero"),
        (torch.full((14,), float("nan"), dtype=torch.float64), ValueError, "finite nonzero"),
    ],
)
def test_a_warm_start_is_checked_before_any_forward_pass(h, start, error, match):
    model, loss, data, A = h.quadratic_problem(EIGS)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(error, match=match):
        top_eigenvalues(model, loss, data, k=1, start=start, generator=h.g(0))
    assert calls == []
