"""hessian_trace, top_eigenvalues and spectral_density against dense float64 Hessians."""

from __future__ import annotations

import math

import pytest
import torch

from sharpgen.data import full_cube, xor_labels
from sharpgen.models import flattest_generalizer
from sharpgen.sharpness import hessian_trace, spectral_density, top_eigenvalues
from sharpgen.theory import interpolation_trace


@pytest.fixture(scope="module")
def problem(h):
    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    H = h.dense_hessian(model, h.mse, x, y)
    return model, (x, y), H


# -- trace -------------------------------------------------------------------------------------
def test_exact_trace_equals_dense_trace(h, problem):
    model, data, H = problem
    p = H.shape[0]
    for block_size in (1, 7, 64):
        est = hessian_trace(model, h.mse, data, method="exact", block_size=block_size)
        assert est.method == "exact" and est.stderr == 0.0 and est.num_matvecs == p
        assert est.value == pytest.approx(float(H.trace()), rel=1e-12)


def test_auto_is_exact_for_small_models_and_adaptive_above_the_threshold(h, problem):
    model, data, H = problem
    p = H.shape[0]
    adaptive = ("hutchinson", "hutchpp")  # what the adaptive estimator reports
    assert hessian_trace(model, h.mse, data).method == "exact"
    # a budget below p forces a stochastic estimator even under the threshold
    est = hessian_trace(model, h.mse, data, num_matvecs=10, generator=h.g(0))
    assert est.method in adaptive and est.num_matvecs == 10
    est = hessian_trace(model, h.mse, data, exact_threshold=p - 1, rtol=0.05, generator=h.g(0))
    assert est.method in adaptive
    # without a budget, max_matvecs only caps the rtol loop: still exact
    assert hessian_trace(model, h.mse, data, max_matvecs=p - 1).method == "exact"
    est = hessian_trace(model, h.mse, data, rtol=0.05, max_matvecs=p - 1, generator=h.g(0))
    assert est.method in adaptive and est.num_matvecs <= p - 1
    est = hessian_trace(model, h.mse, data, num_matvecs=3, exact_threshold=2, generator=h.g(0))
    assert est.method == "hutchinson" and est.num_matvecs == 3


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp", "xtrace"])
def test_stochastic_trace_within_its_standard_error(h, problem, method):
    model, data, H = problem
    truth = float(H.trace())
    budget = 40
    est = hessian_trace(model, h.mse, data, method=method, num_matvecs=budget, generator=h.g(3))
    assert est.method == method and est.num_matvecs <= budget
    assert math.isfinite(est.stderr) and est.stderr > 0
    assert abs(est.value - truth) <= 4 * est.stderr


def test_hutchinson_stderr_matches_the_exact_variance(h, problem):
    # Rademacher Hutchinson: Var(z^T H z) = 2 (||H||_F^2 - sum_i H_ii^2)
    model, data, H = problem
    m = 60
    est = hessian_trace(model, h.mse, data, method="hutchinson", num_matvecs=m, generator=h.g(1))
    sd = math.sqrt(2 * float((H**2).sum() - (H.diagonal() ** 2).sum()) / m)
    assert abs(est.value - float(H.trace())) <= 4 * sd
    assert 0.6 * sd <= est.stderr <= 1.5 * sd  # 60 samples: stderr within ~20% of sd


def test_rtol_budget_stops_at_the_target(h, problem):
    model, data, _ = problem
    est = hessian_trace(model, h.mse, data, method="hutchinson", rtol=0.05, generator=h.g(2))
    assert est.converged and est.relative_stderr <= 0.05


def test_lemma_4_1_trace_at_interpolation(h):
    # two-layer ReLU net with bias interpolating xor data: Tr H = (2/n) sum ||grad f(x_i)||^2
    d = 4
    X = full_cube(d, dtype=h.DT)
    y = xor_labels(X)
    net = flattest_generalizer(d, "bias", width=6, dtype=h.DT)
    assert torch.allclose(net(X), y)
    est = hessian_trace(net, torch.nn.functional.mse_loss, (X, y), method="exact")
    assert est.value == pytest.approx(float(interpolation_trace(net, X)), rel=1e-10)
    assert est.value == pytest.approx(4 * math.sqrt(d + 1), rel=1e-10)  # the closed form
    # the dataset may come in uneven batches: the same trace
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    assert hessian_trace(net, torch.nn.functional.mse_loss, batches).value == pytest.approx(
        est.value, rel=1e-10
    )


# -- eigenvalues -------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenvalues_match_eigh(h, problem, k):
    model, data, H = problem
    evals = torch.linalg.eigvalsh(H).flip(0)
    tol = 1e-6
    res = top_eigenvalues(model, h.mse, data, k=k, tol=tol, generator=h.g(0))
    assert res.converged
    assert res.eigenvalues.shape == (k,) and res.eigenvectors.shape == (H.shape[0], k)
    torch.testing.assert_close(res.eigenvalues, evals[:k], rtol=tol, atol=0)
    # residuals are honest: ||H v - lambda v|| against the dense matrix
    resid = torch.linalg.vector_norm(
        H @ res.eigenvectors - res.eigenvectors * res.eigenvalues, dim=0
    )
    assert torch.all(resid <= res.residuals * 1.01 + 1e-12)


def test_top_eigenvalues_gap_bound_within_tol(h, problem):
    model, data, H = problem
    evals = torch.linalg.eigvalsh(H).flip(0)
    tol = 1e-4
    res = top_eigenvalues(model, h.mse, data, k=2, tol=tol, bound="gap", generator=h.g(0))
    ref = top_eigenvalues(model, h.mse, data, k=2, tol=tol, generator=h.g(0))
    assert res.converged and res.num_matvecs <= ref.num_matvecs
    torch.testing.assert_close(res.eigenvalues, evals[:2], rtol=tol, atol=0)


@pytest.mark.parametrize("backend", ["func", "autograd", "auto-batches"])
def test_top_eigenvalue_with_every_backend(h, problem, backend):
    # default ("auto", one batch) keeps the double-backward graph; these are the others
    model, (x, y), H = problem
    top = torch.linalg.eigvalsh(H)[-1]
    if backend == "auto-batches":
        data, kw = [(x[:5], y[:5]), (x[5:], y[5:])], {}
    else:
        data, kw = (x, y), {"backend": backend}
    res = top_eigenvalues(h.make_mlp(0), h.mse, data, tol=1e-7, generator=h.g(1), **kw)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues[0], top, rtol=1e-7, atol=0)


def test_smallest_and_both_ends(h, problem):
    model, data, H = problem
    evals = torch.linalg.eigvalsh(H)
    assert evals[0] < 0  # a random point of a tanh net: the Hessian is indefinite
    res = top_eigenvalues(model, h.mse, data, k=2, which="smallest", tol=1e-6, generator=h.g(0))
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, evals[:2], rtol=1e-6, atol=1e-9)
    res = top_eigenvalues(model, h.mse, data, k=2, which="both_ends", tol=1e-6, generator=h.g(0))
    torch.testing.assert_close(
        res.eigenvalues, torch.stack([evals[-1], evals[0]]), rtol=1e-6, atol=1e-9
    )


def test_eigenvectors_unflatten_to_parameter_dicts(h, problem):
    model, data, H = problem
    res = top_eigenvalues(model, h.mse, data, k=2, tol=1e-8, generator=h.g(0))
    dicts = res.eigenvector_dicts()
    assert len(dicts) == 2
    for i, d in enumerate(dicts):
        assert list(d) == [n for n, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            assert d[name].shape == p.shape
        flat = torch.cat([t.reshape(-1) for t in d.values()])
        assert torch.equal(flat, res.eigenvectors[:, i])
    assert torch.equal(res.eigenvector_dict(-1)["0.weight"], dicts[1]["0.weight"])
    with pytest.raises(IndexError, match="i must be an int"):
        res.eigenvector_dict(2)


# -- spectral density --------------------------------------------------------------------------
def test_spectral_density_moments_and_support(h, problem):
    model, data, H = problem
    p = H.shape[0]
    evals = torch.linalg.eigvalsh(H)
    P = 40
    dens = spectral_density(model, h.mse, data, num_probes=P, num_steps=8, generator=h.g(5))
    assert dens.num_matvecs <= P * 8
    torch.testing.assert_close(dens.weights.sum(1), torch.ones(P, dtype=h.DT))
    support = dens.nodes[dens.weights > 1e-12]
    assert support.min() >= evals[0] - 1e-8 and support.max() <= evals[-1] + 1e-8
    # with 8 steps the quadrature is exact for degree <= 15: moment j = Hutchinson on H^j / p
    for j in (1, 2):
        B = torch.linalg.matrix_power(H, j)
        truth = float(B.trace()) / p
        sd = math.sqrt(2 * float((B**2).sum() - (B.diagonal() ** 2).sum())) / p / math.sqrt(P)
        assert abs(dens.moment(j) - truth) <= 4 * sd + 1e-12
    # the extreme nodes find the extreme eigenvalues
    assert float(dens.nodes.max()) == pytest.approx(float(evals[-1]), rel=1e-3)


# -- bad input ---------------------------------------------------------------------------------
class _NoForward(torch.nn.Module):
    """Fails if evaluated: argument errors must come before any work."""

    def __init__(self, p: int = 6):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(p, dtype=torch.float64))

    def forward(self, x):
        raise AssertionError("the model was evaluated before the arguments were checked")


_DATA = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"method": "lanczos"}, ValueError,
         r"unknown method 'lanczos'; valid choices are 'auto', 'exact', 'adaptive', "
         r"'hutchinson', 'hutchpp', 'xtrace'"),
        ({"method": "hutchpp", "num_matvecs": 2}, ValueError,
         r"num_matvecs must be an int >= 3, got 2. method='hutchpp' needs at least 3"),
        ({"method": "xtrace", "num_matvecs": 3}, ValueError, r"num_matvecs must be an int >= 4"),
        ({"method": "hutchinson", "num_matvecs": 0}, ValueError,
         r"num_matvecs must be an int >= 1"),
        ({"method": "exact", "num_matvecs": 5}, ValueError,
         r"num_matvecs=5 is too small for method='exact', which needs one product per "
         r"parameter \(6\)"),
        ({"method": "xtrace", "num_matvecs": 14}, ValueError,
         r"num_matvecs=14 is too large for XTrace"),
        ({"num_matvecs": 10, "rtol": 0.1}, ValueError, r"pass at most one of num_matvecs"),
        ({"rtol": 0.0}, ValueError, r"rtol must be a finite number > 0, got 0.0"),
        ({"block_size": 0}, ValueError, r"block_size must be an int >= 1"),
        ({"num_matvecs": 2.5}, TypeError, r"num_matvecs must be an int"),
        ({"generator": 3}, TypeError, r"generator must be a torch.Generator"),
    ],
)  # fmt: skip
def test_trace_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hessian_trace(_NoForward(), lambda o, t: o.mean(), _DATA, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"k": 0}, ValueError, r"k must be an int >= 1, got 0"),
        ({"k": -2}, ValueError, r"k must be an int >= 1"),
        ({"k": 6}, ValueError,
         r"k must be smaller than the number of selected parameters p=6, got k=6"),
        ({"k": 1.0}, TypeError, r"k must be an int"),
        ({"tol": 0.0}, ValueError, r"tol must be a finite number > 0, got 0.0"),
        ({"tol": -1e-3}, ValueError, r"tol must be a finite number > 0"),
        ({"which": "top"}, ValueError,
         r"unknown which 'top'; valid choices are 'largest', 'smallest', 'both_ends', 'magnitude'"),
        ({"max_iter": 0}, ValueError, r"max_iter must be an int >= 1"),
        ({"bound": "cheap"}, ValueError, r"unknown bound 'cheap'; valid choices are 'residual'"),
    ],
)  # fmt: skip
def test_eigen_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        top_eigenvalues(_NoForward(), lambda o, t: o.mean(), _DATA, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_probes": 0}, ValueError, r"num_probes must be an int >= 1, got 0"),
        ({"num_steps": 0}, ValueError, r"num_steps must be an int >= 1"),
        ({"distribution": "normal"}, ValueError,
         r"unknown distribution 'normal'; valid choices are 'rademacher', 'gaussian'"),
    ],
)  # fmt: skip
def test_density_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        spectral_density(_NoForward(), lambda o, t: o.mean(), _DATA, **kwargs)


def test_bad_model_and_data_come_from_the_curvature_layer(h):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hessian_trace("net", h.mse, _DATA)
    with pytest.raises(ValueError, match="unknown bn|bn must be one of"):
        hessian_trace(h.make_mlp(0), h.mse, h.regression_data(4), bn="train")
