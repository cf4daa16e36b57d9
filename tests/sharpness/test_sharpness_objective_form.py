"""The objective as a value: every measure takes a ready ModelObjective or operator.

The composed form (one objective, several measures) gives the same numbers as the
convenience form ``(model, loss_fn, data, **options)``; mixing the two forms is an error.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from sharpgen.curvature import GGNOperator, HessianOperator, ModelObjective, as_objective
from sharpgen.curvature._options import OBJECTIVE_OPTIONS
from sharpgen.sharpness import (
    SharpnessTracker,
    average_sharpness,
    hessian_trace,
    sam_sharpness,
    spectral_density,
    top_eigenvalues,
)


def _problem(h):
    model = h.make_mlp(0)
    return model, h.regression_data(8)


def test_objective_options_are_the_keyword_arguments_of_model_objective():
    import inspect

    sig = inspect.signature(ModelObjective.__init__)
    fixed = ("self", "model", "loss_fn", "data")
    keywords = [n for n in sig.parameters if n not in fixed]
    assert sorted(keywords) == sorted(OBJECTIVE_OPTIONS)


def test_every_measure_gives_the_convenience_numbers_on_a_ready_objective(h, state_check):
    model, batch = _problem(h)
    check = state_check(model)
    obj = ModelObjective(model, h.mse, batch, ["2.weight", "2.bias"], reduction="sum")
    kw = {"params": ["2.weight", "2.bias"], "reduction": "sum"}
    # one objective serves every measure in a row
    assert hessian_trace(obj).value == hessian_trace(model, h.mse, batch, **kw).value
    a = top_eigenvalues(obj, k=2, generator=h.g(1))
    b = top_eigenvalues(model, h.mse, batch, 2, generator=h.g(1), **kw)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.param_shapes == b.param_shapes
    d1 = spectral_density(obj, num_probes=2, num_steps=5, generator=h.g(2))
    d2 = spectral_density(model, h.mse, batch, num_probes=2, num_steps=5, generator=h.g(2), **kw)
    assert torch.equal(d1.nodes, d2.nodes) and torch.equal(d1.weights, d2.weights)
    s1 = sam_sharpness(obj, rho=0.1, steps=2, restarts=1, generator=h.g(3))
    s2 = sam_sharpness(model, h.mse, batch, 0.1, steps=2, restarts=1, generator=h.g(3), **kw)
    assert s1.value == s2.value and s1.num_gradient_evals == s2.num_gradient_evals
    m1 = sam_sharpness(obj, rho=0.1, m=4)
    m2 = sam_sharpness(model, h.mse, batch, 0.1, m=4, **kw)
    assert torch.equal(m1.chunk_values, m2.chunk_values)
    a1 = average_sharpness(obj, rho=0.01, num_samples=3, generator=h.g(4))
    a2 = average_sharpness(model, h.mse, batch, 0.01, num_samples=3, generator=h.g(4), **kw)
    assert torch.equal(a1.samples, a2.samples)
    check()


def test_one_objective_is_built_and_validated_once(h, monkeypatch):
    model, batch = _problem(h)
    calls = {"validate": 0}
    original = ModelObjective._validate

    def counting(self):
        calls["validate"] += 1
        return original(self)

    monkeypatch.setattr(ModelObjective, "_validate", counting)
    obj = as_objective(model, h.mse, batch)
    assert as_objective(obj) is obj
    hessian_trace(obj, method="hutchinson", num_matvecs=2, generator=h.g(0))
    top_eigenvalues(obj, generator=h.g(0))
    spectral_density(obj, num_probes=1, num_steps=3, generator=h.g(0))
    sam_sharpness(obj, rho=0.05)
    average_sharpness(obj, rho=0.01, num_samples=2, generator=h.g(0))
    assert calls["validate"] == 1


def test_a_ready_operator_is_measured_as_it_is(h):
    model, batch = _problem(h)
    obj = ModelObjective(model, torch.nn.functional.cross_entropy, (batch[0], batch[1].softmax(1)))
    G = GGNOperator(obj)
    assert G.objective is obj
    dense = G.to_dense()
    est = hessian_trace(G, method="exact")
    assert est.value == pytest.approx(float(torch.trace(dense)), rel=1e-12)
    H = HessianOperator(obj, backend="autograd")
    assert H.backend == "autograd" and obj.backend == "auto"
    ref = HessianOperator(model, torch.nn.functional.cross_entropy, obj.data)
    assert torch.allclose(H.to_dense(), ref.to_dense(), rtol=1e-12, atol=1e-14)
    top = top_eigenvalues(H, k=1, generator=h.g(0))
    assert float(top.eigenvalues[0]) == pytest.approx(
        float(torch.linalg.eigvalsh(ref.to_dense())[-1]), rel=1e-3
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda o, h, b: hessian_trace(o, bn="batch"), r"ready ModelObjective and also \['bn'\]"),
        (lambda o, h, b: top_eigenvalues(o, h.mse, b), r"also \['loss_fn', 'data'\]"),
        (lambda o, h, b: sam_sharpness(o, rho=0.1, params=["2.bias"]), r"\['params'\]"),
        (lambda o, h, b: average_sharpness(o, rho=0.1, reduction="sum"), r"\['reduction'\]"),
        (lambda o, h, b: spectral_density(o, process_group=None), r"\['process_group'\]"),
        (lambda o, h, b: HessianOperator(o, dropout=True), r"\['dropout'\]"),
        (lambda o, h, b: SharpnessTracker(o, bn="eval"), r"\['bn'\]"),
        (lambda o, h, b: as_objective(HessianOperator(o), backend="func"), r"\['backend'\]"),
    ],
)
def test_mixing_a_ready_objective_with_objective_options_is_an_error(h, call, match):
    model, batch = _problem(h)
    obj = ModelObjective(model, h.mse, batch)
    with pytest.raises(ValueError, match=match):
        call(obj, h, batch)


def test_convenience_form_errors(h):
    model, batch = _problem(h)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['bnn'\]"):
        hessian_trace(model, h.mse, batch, bnn="eval")
    with pytest.raises(TypeError, match="needs loss_fn and data"):
        top_eigenvalues(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sam_sharpness("model", h.mse, batch, 0.1)
    with pytest.raises(TypeError, match="needs the radius rho"):
        sam_sharpness(ModelObjective(model, h.mse, batch))


class _OldStyleTanh(torch.autograd.Function):
    """An autograd.Function without setup_context: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_OldStyleTanh.apply(self.a(x)))


def test_tracker_forwards_every_objective_option_and_takes_a_ready_objective(h):
    torch.manual_seed(0)
    model = _Untraceable().double()
    batch = h.regression_data(8)
    kw = {"measures": ("loss", "trace"), "every": 1}
    with pytest.raises(RuntimeError):  # torch.func cannot trace it: backend reaches the operator
        SharpnessTracker(model, h.mse, batch, backend="func", **kw).step(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # backend reaches the operator
        plain = SharpnessTracker(model, h.mse, batch, backend="autograd", **kw).step(0)
        obj = ModelObjective(model, h.mse, batch, backend="autograd")
        tracker = SharpnessTracker(obj, **kw)
        composed = tracker.step(0)
    assert composed == plain
    with torch.no_grad():  # a ready objective is refreshed to the model's current values
        model.b.bias.add_(1.0)
    moved = tracker.step(1)
    with torch.no_grad():
        now = float(h.mse(model(batch[0]), batch[1]))
    assert moved["loss"] == pytest.approx(now, rel=1e-12)
    assert moved["loss"] != composed["loss"]
