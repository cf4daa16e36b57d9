"""Bad input gets a clear error naming the argument, the value and the fix."""

import pytest
import torch

from sharpgen.linalg import (
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    stochastic_lanczos_quadrature,
    xtrace,
)

A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
TRACES = [hutchinson_trace, hutchpp_trace, xtrace]
ALL = [*TRACES, lanczos, power_iteration, stochastic_lanczos_quadrature]


def _call(fn, M, **kw):
    if fn in TRACES:
        kw.setdefault("num_matvecs", 6)
    return fn(M, **kw)


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_non_square_and_non_symmetric_dense_input(fn):
    with pytest.raises(ValueError, match="square"):
        _call(fn, torch.zeros(3, 4, dtype=torch.float64))
    B = A.clone()
    B[0, 1] = 1.0
    with pytest.raises(ValueError, match="symmetric"):
        _call(fn, B)


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_generator_must_be_a_torch_generator(fn):
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        _call(fn, A, generator=0)


@pytest.mark.parametrize("fn", TRACES, ids=lambda f: f.__name__)
def test_budget_arguments(fn):
    with pytest.raises(ValueError, match="exactly one of num_matvecs .* or rtol"):
        fn(A)
    with pytest.raises(ValueError, match="exactly one of num_matvecs .* or rtol"):
        fn(A, num_matvecs=10, rtol=0.1)
    with pytest.raises(ValueError, match="rtol must be a finite number > 0, got -0.1"):
        fn(A, rtol=-0.1)
    with pytest.raises(TypeError, match="num_matvecs must be an int"):
        fn(A, num_matvecs=10.0)
    with pytest.raises(
        ValueError,
        match="unknown distribution 'normal'; valid choices are 'rademacher', 'gaussian'",
    ):
        fn(A, num_matvecs=12, distribution="normal")


def test_too_small_budgets():
    with pytest.raises(ValueError, match="num_matvecs must be >= 1, got 0"):
        hutchinson_trace(A, num_matvecs=0)
    with pytest.raises(ValueError, match="num_matvecs must be >= 3, got 2. hutchpp_trace needs"):
        hutchpp_trace(A, num_matvecs=2)
    with pytest.raises(ValueError, match="num_matvecs must be >= 4, got 3. xtrace needs"):
        xtrace(A, num_matvecs=3)
    with pytest.raises(ValueError, match="at most the dimension n=8; got num_matvecs=18"):
        xtrace(A, num_matvecs=18)
    with pytest.raises(ValueError, match="max_matvecs must be >= 3"):
        hutchpp_trace(A, rtol=0.1, max_matvecs=2)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        hutchinson_trace(A, num_matvecs=4, block_size=0)


def test_lanczos_arguments():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        lanczos(A, 0)
    with pytest.raises(ValueError, match="k must be smaller than the dimension n=8, got k=8"):
        lanczos(A, 8)
    with pytest.raises(TypeError, match="k must be an int"):
        lanczos(A, 1.5)
    with pytest.raises(ValueError, match="tol must be a finite number > 0, got 0"):
        lanczos(A, 1, tol=0)
    with pytest.raises(ValueError, match="tol must be a finite number > 0, got -1e-05"):
        power_iteration(A, tol=-1e-5)
    with pytest.raises(
        ValueError,
        match="unknown which 'top'; valid choices are 'largest', "
        "'smallest', 'both_ends', 'magnitude'",
    ):
        lanczos(A, 1, which="top")
    with pytest.raises(ValueError, match="max_basis must be >= 4, got 3"):
        lanczos(A, 2, max_basis=3)
    with pytest.raises(ValueError, match="max_basis must be <= the dimension n=8"):
        lanczos(A, 2, max_basis=9)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        lanczos(A, 2, max_iter=0)
    with pytest.raises(ValueError, match=r"v0 must have shape \(8,\)"):
        lanczos(A, 2, v0=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="v0 must be a finite nonzero vector"):
        lanczos(A, 2, v0=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="size is required"):
        lanczos(lambda v: v, 1)


def test_slq_arguments():
    with pytest.raises(ValueError, match="num_probes must be >= 1, got 0"):
        stochastic_lanczos_quadrature(A, num_probes=0)
    with pytest.raises(ValueError, match="num_points must be >= 2, got 1"):
        stochastic_lanczos_quadrature(A, num_points=1)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, got 0.0"):
        stochastic_lanczos_quadrature(A, sigma=0.0)
    with pytest.raises(ValueError, match="grid must be a 1-D tensor"):
        stochastic_lanczos_quadrature(A, grid=torch.zeros(2, 2))


def test_non_finite_products_raise():
    B = A.clone()
    B[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        hutchinson_trace(lambda v: B @ v, size=8, num_matvecs=4)
