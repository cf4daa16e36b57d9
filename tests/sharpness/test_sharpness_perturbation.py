"""sam_perturbation and project_perturbation against closed forms and optimality conditions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharpgen.sharpness import project_perturbation, sam_perturbation

D = torch.float64


def _dicts(seed: int, zero_weight: bool = False):
    g = torch.Generator().manual_seed(seed)
    params = {
        "a": torch.randn(3, 2, generator=g, dtype=D),
        "b": torch.randn(4, generator=g, dtype=D),
    }
    if zero_weight:
        params["b"][1] = 0.0
    grads = {k: torch.randn(v.shape, generator=g, dtype=D) for k, v in params.items()}
    return grads, params


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def _t(params, adaptive, eta):
    return _flat(
        {k: (v.abs() + eta) if adaptive else torch.ones_like(v) for k, v in params.items()}
    )


# -- closed forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_l2_closed_form(adaptive, eta):
    grads, params = _dicts(0)
    eps = sam_perturbation(grads, params, 0.3, adaptive=adaptive, eta=eta)
    g, t = _flat(grads), _t(params, adaptive, eta)
    expected = 0.3 * t**2 * g / torch.linalg.vector_norm(t * g)
    torch.testing.assert_close(_flat(eps), expected, rtol=1e-14, atol=0)
    assert list(eps) == list(params)
    # it lies on the boundary of the neighbourhood
    assert math.isclose(float(torch.linalg.vector_norm(_flat(eps) / t)), 0.3, rel_tol=1e-13)


@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.1)])
def test_linf_closed_form(adaptive, eta):
    grads, params = _dicts(1)
    eps = sam_perturbation(grads, params, 0.2, norm="linf", adaptive=adaptive, eta=eta)
    expected = 0.2 * _t(params, adaptive, eta) * torch.sign(_flat(grads))
    torch.testing.assert_close(_flat(eps), expected, rtol=0, atol=0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_unnormalized_is_gradient_step(adaptive):
    grads, params = _dicts(2)
    eps = sam_perturbation(grads, params, 0.7, normalize=False, adaptive=adaptive, eta=0.5)
    t = _t(params, adaptive, 0.5)
    torch.testing.assert_close(_flat(eps), 0.7 * t**2 * _flat(grads), rtol=1e-15, atol=0)


def test_dtype_device_and_detached():
    params = {"w": torch.randn(3, requires_grad=True)}
    grads = {"w": torch.randn(3, requires_grad=True) * 2}
    eps = sam_perturbation(grads, params, 0.1, adaptive=True)
    assert eps["w"].dtype == torch.float32 and not eps["w"].requires_grad


# -- maximizer property (hypothesis) -----------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    norm=st.sampled_from(["l2", "linf"]),
    adaptive=st.booleans(),
    eta=st.floats(0.0, 1.0),
    rho=st.floats(1e-3, 10.0),
)
def test_perturbation_maximizes_linearized_loss(seed, norm, adaptive, eta, rho):
    grads, params = _dicts(seed)
    eps = _flat(sam_perturbation(grads, params, rho, norm=norm, adaptive=adaptive, eta=eta))
    g, t = _flat(grads), _t(params, adaptive, eta)
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(64, g.numel(), generator=gen, dtype=D)
    # random feasible points u/||u|| * rho scaled by T (on the boundary, the hardest case)
    if norm == "l2":
        u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
    else:
        u = u / u.abs().amax(dim=1, keepdim=True)
    feasible = rho * u * t
    assert bool(((feasible @ g) <= g @ eps + 1e-12 * (1 + abs(float(g @ eps)))).all())
    # and eps itself is feasible
    ord_ = 2 if norm == "l2" else math.inf
    assert float(torch.linalg.vector_norm(eps / t, ord=ord_)) <= rho * (1 + 1e-12)


# -- edge cases --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,normalize", [("l2", True), ("l2", False), ("linf", True)])
def test_zero_gradient_gives_zero_not_nan(norm, normalize):
    _, params = _dicts(3)
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    eps = sam_perturbation(grads, params, 0.5, norm=norm, normalize=normalize, adaptive=True)
    assert all(bool((v == 0).all()) for v in eps.values())


def test_adaptive_zero_weight_eta_zero_no_nan():
    grads, params = _dicts(4)
    params = {k: torch.zeros_like(v) for k, v in params.items()}  # T = 0 everywhere
    eps = sam_perturbation(grads, params, 0.5, adaptive=True, eta=0.0)
    assert all(bool((v == 0).all()) for v in eps.values())


def test_missing_and_none_grads_get_zero_and_do_not_enter_the_norm():
    grads, params = _dicts(5)
    eps = sam_perturbation({"a": grads["a"]}, params, 0.5)
    eps2 = sam_perturbation({"a": grads["a"], "b": None}, params, 0.5)
    torch.testing.assert_close(eps["a"], 0.5 * grads["a"] / grads["a"].norm(), rtol=1e-14, atol=0)
    assert bool((eps["b"] == 0).all()) and bool((eps2["b"] == 0).all())
    torch.testing.assert_close(eps2["a"], eps["a"], rtol=0, atol=0)


def test_rho_zero_gives_zero():
    grads, params = _dicts(6)
    assert all(bool((v == 0).all()) for v in sam_perturbation(grads, params, 0.0).values())


def test_non_finite_gradient_raises():
    grads, params = _dicts(7)
    grads["b"][0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite gradient for \\['b'\\]"):
        sam_perturbation(grads, params, 0.1)


def test_vmap_compatible_without_finite_check():
    grads, params = _dicts(8)
    batched = {k: torch.stack([v, 2 * v, 0 * v]) for k, v in grads.items()}
    out = torch.func.vmap(
        lambda g: sam_perturbation(g, params, 0.3, check_finite=False), in_dims=(0,)
    )(batched)
    single = sam_perturbation(grads, params, 0.3)
    for k in params:
        torch.testing.assert_close(out[k][0], single[k], rtol=1e-14, atol=0)
        torch.testing.assert_close(out[k][1], single[k], rtol=1e-14, atol=0)
        assert bool((out[k][2] == 0).all())


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input():
    grads, params = _dicts(9)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0.*got -0.1"):
        sam_perturbation(grads, params, -0.1)
    with pytest.raises(ValueError, match="rho must be a finite number"):
        sam_perturbation(grads, params, float("nan"))
    with pytest.raises(TypeError, match="rho must be a real number"):
        sam_perturbation(grads, params, "0.1")
    with pytest.raises(ValueError, match="eta must be a finite number >= 0.*got -1.0"):
        sam_perturbation(grads, params, 0.1, adaptive=True, eta=-1.0)
    with pytest.raises(ValueError, match=r"norm must be one of \('l2', 'linf'\), got 'l1'"):
        sam_perturbation(grads, params, 0.1, norm="l1")
    with pytest.raises(ValueError, match="only defined for norm='l2'"):
        sam_perturbation(grads, params, 0.1, norm="linf", normalize=False)
    with pytest.raises(ValueError, match=r"keys that are not in params: \['zzz'\]"):
        sam_perturbation({"zzz": torch.ones(1)}, params, 0.1)
    with pytest.raises(ValueError, match=r"grads\['a'\] has shape \(6,\)"):
        sam_perturbation({"a": torch.ones(6)}, params, 0.1)
    with pytest.raises(TypeError, match="grads must be a dict"):
        sam_perturbation([torch.ones(1)], params, 0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        project_perturbation(grads, params, -1.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        project_perturbation(grads, params, 1.0, norm="l3")
    with pytest.raises(ValueError, match="eta must be"):
        project_perturbation(grads, params, 1.0, adaptive=True, eta=-0.5)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        project_perturbation({"a": torch.full((3, 2), float("nan"), dtype=D)}, params, 1.0)


# -- projections -------------------------------------------------------------------------------
def _in_set(x, params, rho, norm, adaptive, eta, slack=1e-12):
    x, t = _flat(x), _t(params, adaptive, eta)
    if bool(((t == 0) & (x != 0)).any()):
        return False
    y = torch.where(t > 0, x / t, torch.zeros_like(x))
    ord_ = 2 if norm == "l2" else math.inf
    return float(torch.linalg.vector_norm(y, ord=ord_)) <= rho * (1 + slack)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    norm=st.sampled_from(["l2", "linf"]),
    adaptive=st.booleans(),
    eta=st.sampled_from([0.0, 1e-3, 0.5]),
    rho=st.floats(1e-3, 5.0),
    scale=st.floats(1e-3, 100.0),
    zero_weight=st.booleans(),
)
def test_projection_is_feasible_idempotent_and_fixes_feasible_points(
    seed, norm, adaptive, eta, rho, scale, zero_weight
):
    e, params = _dicts(seed, zero_weight=zero_weight)
    e = {k: v * scale for k, v in e.items()}
    x = project_perturbation(e, params, rho, norm=norm, adaptive=adaptive, eta=eta)
    assert _in_set(x, params, rho, norm, adaptive, eta)
    x2 = project_perturbation(x, params, rho, norm=norm, adaptive=adaptive, eta=eta)
    torch.testing.assert_close(_flat(x2), _flat(x), rtol=1e-12, atol=1e-14)
    # optimality: e - x is a non-negative multiple of the outward normal (KKT)
    if norm == "l2" and adaptive and not _in_set(e, params, rho, norm, adaptive, eta):
        t = _t(params, adaptive, eta)
        xf, ef = _flat(x), _flat(e)
        pos = t > 0
        normal = xf[pos] / t[pos] ** 2
        lam = float((ef[pos] - xf[pos]) @ normal / (normal @ normal))
        assert lam >= 0
        torch.testing.assert_close(ef[pos] - xf[pos], lam * normal, rtol=1e-8, atol=1e-10)
        assert bool((xf[~pos] == 0).all())


@pytest.mark.parametrize("seed", range(5))
def test_ellipsoid_projection_matches_brute_force_in_2d(seed):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(2, generator=g, dtype=D)}
    e = {"w": 3 * torch.randn(2, generator=g, dtype=D)}
    rho, eta = 0.7, 0.05
    t = params["w"].abs() + eta
    x = project_perturbation(e, params, rho, adaptive=True, eta=eta)["w"]
    theta = torch.linspace(0, 2 * math.pi, 400_001, dtype=D)
    boundary = rho * torch.stack([t[0] * theta.cos(), t[1] * theta.sin()], dim=1)
    best = torch.linalg.vector_norm(boundary - e["w"], dim=1).min()
    dist = torch.linalg.vector_norm(x - e["w"])
    assert float(dist) <= float(best) + 1e-12
    # the grid spacing bounds how far the brute-force minimum can be above the true one
    assert float(best) - float(dist) <= 2 * math.pi * rho * float(t.max()) / 400_000


def test_projection_closed_forms():
    e, params = _dicts(10)
    e = {k: 10 * v for k, v in e.items()}
    x = project_perturbation(e, params, 0.5)
    torch.testing.assert_close(_flat(x), 0.5 * _flat(e) / _flat(e).norm(), rtol=1e-14, atol=0)
    x = project_perturbation(e, params, 0.5, norm="linf", adaptive=True, eta=0.1)
    bound = 0.5 * _t(params, True, 0.1)
    torch.testing.assert_close(_flat(x), torch.maximum(torch.minimum(_flat(e), bound), -bound))
    assert all(bool((v == 0).all()) for v in project_perturbation(e, params, 0.0).values())
    z = project_perturbation(e, params, 0.0, adaptive=True, eta=0.1)
    assert all(bool((v == 0).all()) for v in z.values())


def test_zero_weight_coordinates_are_zeroed_even_when_rest_is_inside():
    params = {"w": torch.tensor([0.0, 1.0], dtype=D)}
    x = project_perturbation({"w": torch.tensor([5.0, 0.1], dtype=D)}, params, 1.0, adaptive=True)
    assert x["w"].tolist() == [0.0, 0.1]
