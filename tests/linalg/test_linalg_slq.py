"""Stochastic Lanczos quadrature and the result dataclasses."""

import dataclasses
import math

import pytest
import torch

from sharpgen.linalg import (
    EigenResult,
    TraceEstimate,
    hutchinson_trace,
    lanczos,
    stochastic_lanczos_quadrature,
)
from sharpgen.linalg._probes import draw_probes


def with_spectrum(lam, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def test_quadrature_is_exact_for_low_degree_moments():
    # Gauss quadrature with m nodes integrates polynomials of degree < 2m exactly:
    # sum_j w_pj theta_pj^d = z_p^T A^d z_p / ||z_p||^2 for every probe
    n, probes, steps = 120, 6, 8
    lam = torch.linspace(-2.0, 5.0, n, dtype=torch.float64)
    A = with_spectrum(lam, seed=1)
    d = stochastic_lanczos_quadrature(
        A, num_probes=probes, num_steps=steps, generator=torch.Generator().manual_seed(3)
    )
    assert d.num_matvecs == probes * steps
    torch.testing.assert_close(d.weights.sum(1), torch.ones(probes, dtype=torch.float64))
    Z = draw_probes(
        n,
        probes,
        distribution="rademacher",
        generator=torch.Generator().manual_seed(3),
        dtype=torch.float64,
        device=torch.device("cpu"),
    )
    for degree in range(2 * steps):
        exact = (Z * (torch.linalg.matrix_power(A, degree) @ Z)).sum(0) / n
        quad = (d.weights * d.nodes**degree).sum(1)
        torch.testing.assert_close(quad, exact, rtol=1e-8, atol=1e-8)
    assert d.moment(1) == pytest.approx(float((Z * (A @ Z)).sum(0).mean()) / n, rel=1e-10)


def test_full_krylov_space_recovers_the_eigenvalues_and_stops_early():
    lam = torch.tensor([4.0] * 10 + [1.0] * 10 + [-2.0] * 10, dtype=torch.float64)
    A = with_spectrum(lam, seed=2)
    d = stochastic_lanczos_quadrature(
        A, num_probes=5, num_steps=10, generator=torch.Generator().manual_seed(0)
    )
    # three distinct eigenvalues: every probe's Krylov space closes after 3 steps
    assert d.num_matvecs == 5 * 3
    mass = d.weights > 1e-12
    assert int(mass.sum(1).max()) == 3
    torch.testing.assert_close(
        torch.sort(d.nodes[0][mass[0]]).values,
        torch.tensor([-2.0, 1.0, 4.0], dtype=torch.float64),
    )


def test_density_mass_matches_the_spectrum_within_its_standard_error():
    n = 200
    g = torch.Generator().manual_seed(0)
    lam = torch.cat(
        [1 + 0.1 * torch.rand(n // 4, generator=g), 5 + 0.1 * torch.rand(3 * n // 4, generator=g)]
    ).to(torch.float64)
    A = with_spectrum(lam, seed=3)
    probes = 10
    d = stochastic_lanczos_quadrature(
        A, num_probes=probes, num_steps=20, generator=torch.Generator().manual_seed(1)
    )
    upper = float((d.weights * (d.nodes > 3)).sum() / probes)
    # per probe the mass above 3 is z^T P z / n, variance <= 2 ||P||_F^2 / n^2 = 1.5 / n
    se = math.sqrt(1.5 / n / probes)
    assert abs(upper - 0.75) <= 4 * se
    # the smoothed density integrates to one and peaks near the clusters
    integral = float(torch.trapezoid(d.density, d.grid))
    assert integral == pytest.approx(1.0, abs=1e-3)
    peak = float(d.grid[torch.argmax(d.density)])
    assert 4.8 <= peak <= 5.3
    # evaluate() reproduces the stored density and accepts another sigma
    torch.testing.assert_close(d.evaluate(d.grid), d.density)
    wider = d.evaluate(d.grid, sigma=10 * d.sigma)
    assert float(wider.max()) < float(d.density.max())


def test_user_grid_sigma_plot_and_repr():
    A = with_spectrum(torch.linspace(0.0, 1.0, 50, dtype=torch.float64), seed=4)
    grid = torch.linspace(-1.0, 2.0, 31, dtype=torch.float64)
    d = stochastic_lanczos_quadrature(
        A,
        num_probes=3,
        num_steps=6,
        grid=grid,
        sigma=0.05,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(d.grid, grid) and d.sigma == 0.05 and d.density.shape == (31,)
    ax = d.plot()
    assert len(ax.lines) == 1
    import matplotlib.pyplot as plt

    plt.close(ax.figure)
    assert "SpectralDensity(num_probes=3" in repr(d)
    state = torch.get_rng_state()
    again = stochastic_lanczos_quadrature(
        A,
        num_probes=3,
        num_steps=6,
        grid=grid,
        sigma=0.05,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(again.nodes, d.nodes) and torch.equal(again.density, d.density)


def test_result_dataclasses_are_frozen_and_convert_to_float():
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    est = hutchinson_trace(A, num_matvecs=4, generator=torch.Generator().manual_seed(0))
    assert isinstance(est, TraceEstimate) and float(est) == 6.0
    assert "±" in repr(est) and "hutchinson" in repr(est)
    assert est.relative_stderr == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.value = 1.0
    res = lanczos(A, 2, generator=torch.Generator().manual_seed(0))
    assert isinstance(res, EigenResult) and "eigenvalues=[3, 2]" in repr(res)
    with pytest.raises(TypeError, match="single eigenvalue"):
        float(res)
    assert float(lanczos(A, 1, generator=torch.Generator().manual_seed(0))) == pytest.approx(3.0)
