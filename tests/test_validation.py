"""One rule per kind of argument (`sharpgen._validation`), applied the same way everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sharpgen as sg
from sharpgen._validation import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_optional_int,
    check_positive,
    check_rho,
    check_tensor_dict,
)

DT = torch.float64


def _dense(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    return Q @ torch.diag(torch.arange(1, n + 1, dtype=DT)) @ Q.T


def _problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    X = torch.randn(8, 3, dtype=DT, generator=g)
    y = torch.randn(8, 1, dtype=DT, generator=g)
    return model, nn.MSELoss(), (X, y)


# -- the rules themselves ---------------------------------------------------------------------
@pytest.mark.parametrize("value", [8, np.int64(8), np.int32(8), np.uint8(8)])
def test_int_rule_accepts_every_integral(value):
    out = check_int("k", value)
    assert out == 8 and type(out) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 8.0, np.float64(8), "8", None])
def test_int_rule_refuses_bools_floats_and_strings(value):
    with pytest.raises(TypeError, match="k must be an int, got"):
        check_int("k", value)


def test_int_rule_range_message_names_argument_value_and_hint():
    with pytest.raises(ValueError, match=r"k must be an int >= 2, got 1\. need two\."):
        check_int("k", np.int64(1), minimum=2, hint="need two.")
    with pytest.raises(ValueError, match=r"^k must be >= 2, got 1\.$"):
        check_int("k", 1, minimum=2, noun="")
    assert check_optional_int("m", None) is None
    assert check_optional_int("m", np.int16(3)) == 3


@pytest.mark.parametrize(
    "value",
    [0.5, 1, np.float64(0.5), np.float32(0.5), np.int64(2), torch.tensor(0.5), torch.tensor([2])],
)
def test_positive_rule_accepts_reals_numpy_and_one_element_tensors(value):
    out = check_positive("tol", value)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (True, TypeError, "tol must be a real number, got bool"),
        ("0.1", TypeError, "tol must be a real number, got str"),
        (torch.ones(2), TypeError, r"tol must be a real number, got a tensor of shape \(2,\)"),
        (torch.tensor(True), TypeError, "tol must be a real number, got a tensor"),
        (0, ValueError, "tol must be a finite number > 0, got 0"),
        (-1e-5, ValueError, "tol must be a finite number > 0, got -1e-05"),
        (np.float64("nan"), ValueError, "tol must be a finite number > 0, got nan"),
        (float("inf"), ValueError, "tol must be a finite number > 0, got inf"),
        (torch.tensor(-1.0), ValueError, r"tol must be a finite number > 0, got -1\.0"),
    ],
)
def test_positive_rule_refusals(value, error, pattern):
    with pytest.raises(error, match=pattern):
        check_positive("tol", value)


def test_positive_rule_allow_zero_and_rho():
    assert check_positive("eta", 0, allow_zero=True) == 0.0
    assert check_rho(0) == 0.0 and check_rho(np.float32(0.25)) == 0.25
    assert check_rho(torch.tensor(0.5)) == 0.5
    with pytest.raises(ValueError, match=r"rho must be a finite number >= 0.*got -0\.1.*rho=0"):
        check_rho(-0.1)
    with pytest.raises(TypeError, match="rho must be a real number"):
        check_rho(True)


def test_bool_choice_generator_rules():
    assert check_bool("progress", False) is False
    for bad in (0, 1, np.bool_(True), None):
        with pytest.raises(TypeError, match="progress must be a bool"):
            check_bool("progress", bad)
    assert check_choice("which", "largest", ("largest", "smallest")) == "largest"
    with pytest.raises(ValueError, match="unknown which 'top'; valid choices are 'largest'"):
        check_choice("which", "top", ("largest", "smallest"))
    with pytest.raises(ValueError, match="unknown which 1"):
        check_choice("which", 1, ("largest", "smallest"))
    g = torch.Generator()
    assert check_generator(g) is g and check_generator(None) is None
    with pytest.raises(TypeError, match=r"torch.Generator\(\).manual_seed\(seed\)"):
        check_generator(0)


# -- the same rule at every public entry point ---------------------------------------------------
def test_numpy_ints_accepted_by_every_layer():
    A = _dense()
    g = torch.Generator().manual_seed(0)
    # linalg
    assert sg.hutchinson_trace(A, num_matvecs=np.int64(8), generator=g).num_matvecs == 8
    assert sg.lanczos(A, k=np.int64(2), generator=g).eigenvalues.numel() == 2
    assert sg.LinearOperator(np.int64(3), DT, "cpu").shape == (3, 3)
    # models and data
    net = sg.two_layer_relu(np.int64(3), np.int64(4), generator=g)
    assert sum(p.numel() for p in net.parameters()) == 3 * 4 + 4 + 4  # W, b, a
    assert sg.xor_cube(np.int64(3), np.int64(4), generator=g).X.shape == (4, 3)
    # distributed helpers
    assert list(sg.shard_indices(np.int64(4), rank=np.int64(1), world_size=np.int64(2))) == [2, 3]
    # measures
    model, loss, data = _problem()
    est = sg.hessian_trace(
        model, loss, data, method="hutchinson", num_matvecs=np.int64(4), generator=g
    )
    assert est.num_matvecs == 4
    res = sg.top_eigenvalues(model, loss, data, k=np.int64(2), generator=g)
    assert res.eigenvalues.numel() == 2
    assert res.eigenvector_dict(np.int64(1)).keys() == dict(model.named_parameters()).keys()
    tracker = sg.SharpnessTracker(model, loss, data, every=np.int64(3), measures=("trace",))
    assert tracker.every == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda A, m: sg.hutchinson_trace(A, num_matvecs=True),
        lambda A, m: sg.lanczos(A, k=True),
        lambda A, m: sg.two_layer_relu(True, 4),
        lambda A, m: sg.xor_cube(3, True),
        lambda A, m: sg.hessian_trace(*m, method="hutchinson", num_matvecs=True),
        lambda A, m: sg.top_eigenvalues(*m, k=True),
        lambda A, m: sg.SharpnessTracker(*m, every=True),
    ],
)
def test_bools_refused_as_ints_by_every_layer(call):
    with pytest.raises(TypeError, match="must be an int, got bool True"):
        call(_dense(), _problem())


def test_numpy_and_tensor_reals_accepted_by_every_layer():
    A = _dense()
    g = torch.Generator().manual_seed(0)
    res = sg.lanczos(A, k=1, tol=np.float32(1e-6), generator=g)
    assert abs(float(res.eigenvalues[0]) - 6.0) < 1e-6
    est = sg.hutchinson_trace(A, rtol=torch.tensor(0.5), generator=g)
    assert est.num_matvecs >= 1
    model, loss, data = _problem()
    assert float(sg.sam_sharpness(model, loss, data, rho=np.float64(0.01))) >= 0
    assert float(sg.sam_sharpness(model, loss, data, rho=torch.tensor(0.01))) >= 0


@pytest.mark.parametrize(
    ("closed", "inside", "outside"),
    [("[)", [0, 0.5, np.float32(0.9)], [1, -0.1]), ("(]", [1, np.float64(0.5)], [0, 1.5])],
)
def test_interval_rule_ends_and_numpy_reals(closed, inside, outside):
    from sharpgen._validation import check_interval

    for v in inside:
        assert check_interval("beta", v, 0, 1, closed=closed) == pytest.approx(float(v))
    for v in outside:
        with pytest.raises(ValueError, match=r"beta must be in [\[(]0, 1[\])], got"):
            check_interval("beta", v, 0, 1, closed=closed)
    with pytest.raises(TypeError, match="beta"):
        check_interval("beta", True, 0, 1, closed=closed)
    with pytest.raises(ValueError, match="beta"):
        check_interval("beta", float("nan"), 0, 1, closed=closed)


def test_sam_variants_take_numpy_scalars_by_the_same_rules():
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    assert sg.BSAM([w], num_data=np.int64(8))._num_data == 8
    opt = sg.ESAM([w], torch.optim.SGD, lr=0.1, beta=np.float32(0.5), gamma=np.float64(0.5))
    assert (opt._beta, opt._gamma) == (0.5, 0.5)
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\)"):
        sg.FriendlySAM([w], torch.optim.SGD, lr=0.1, lmbda=1.0)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
        sg.WSAM([w], torch.optim.SGD, lr=0.1, gamma=np.float64(1.0))


def test_check_tensor_dict_one_rule_for_dicts_shaped_like_the_parameters():
    params = {"a": torch.zeros(2), "b": torch.zeros(1, 3)}
    kw = {"what": "in params", "hint": "pass the parameter dict.", "reference_name": "params"}
    got = check_tensor_dict("grads", {"a": torch.ones(2), "b": None}, params, **kw)
    assert list(got) == ["a"] and torch.equal(got["a"], torch.ones(2))
    with pytest.raises(TypeError, match=r"grads must be a dict \{name: Tensor\}, got list"):
        check_tensor_dict("grads", [torch.ones(2)], params, **kw)
    with pytest.raises(ValueError, match=r"keys that are not in params: \['c'\]; pass the"):
        check_tensor_dict("grads", {"c": torch.ones(1)}, params, **kw)
    with pytest.raises(TypeError, match=r"grads\['a'\] must be a Tensor or None, got float"):
        check_tensor_dict("grads", {"a": 1.0}, params, **kw)
    with pytest.raises(ValueError, match=r"grads\['b'\] has shape \(3,\) but params\['b'\]"):
        check_tensor_dict("grads", {"b": torch.ones(3)}, params, **kw)
    nan = {"a": torch.tensor([0.0, float("nan")])}
    assert "a" in check_tensor_dict("grads", nan, params, **kw)  # finiteness only on request
    with pytest.raises(FloatingPointError, match=r"grads\['a'\] contains NaN or Inf"):
        check_tensor_dict("grads", nan, params, **kw, finite=True)
