"""The model zoo: every measure on every model, checked against the dense float64 truth or
against its own definition, and the caller's world left exactly as it was.

The cases (Hugging Face encoder, decoders, encoder-decoder and vision models, the
``torch.nn`` attention, recurrent, embedding, normalization, pooling and upsampling layers)
are in ``_zoo_models.py``; ``conftest.py`` builds them and their dense Hessians.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import sharpgen
from sharpgen.curvature._data import call_model

TOL = 1e-3  # top_eigenvalues' relative tolerance


def _trace(p, model):
    return sharpgen.hessian_trace(model, p.loss_fn, p.data, params=p.names, method="exact")


def _top(p, model):
    return sharpgen.top_eigenvalues(
        model, p.loss_fn, p.data, k=2, tol=TOL, params=p.names,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


def _blocks(p, model):
    return sharpgen.block_traces(
        model, p.loss_fn, p.data, blocks="parameter", method="exact", params=p.names
    )


def _sam(p, model):
    return sharpgen.sam_sharpness(model, p.loss_fn, p.data, rho=0.05, params=p.names)


def _direction(p) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    named = dict(p.model.named_parameters())
    d = {n: torch.randn(named[n].shape, generator=g, dtype=named[n].dtype) for n in p.names}
    norm = torch.sqrt(sum((t**2).sum() for t in d.values()))
    return {n: t / norm for n, t in d.items()}


def _landscape(p, model):
    return sharpgen.loss_landscape_1d(
        model, p.loss_fn, p.data, direction=_direction(p), span=(-0.5, 0.5), num_points=5,
        params=p.names,
    )  # fmt: skip


def _caller_state(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),  # noqa: NPY002
    }


def _assert_unchanged(before, model, sdpa, zh):
    after = _caller_state(model)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed"
        assert v.dtype == after["state"][k].dtype
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    for g0, g1, v0 in zip(before["grad"], after["grad"], before["grad_values"], strict=True):
        assert g0 is g1
        if v0 is not None:
            assert torch.equal(v0, g1)
    assert torch.equal(before["rng"], after["rng"])
    assert before["py_rng"] == after["py_rng"]
    assert np.array_equal(before["np_rng"], after["np_rng"])
    assert zh.sdpa_settings() == sdpa


def _used_as_in_training(p):
    """A fresh copy in train mode with gradients from a backward pass (taken in eval mode, so
    that BatchNorm statistics stay those of the truth), the first selected parameter frozen
    (named explicitly, so still measured)."""
    model = p.fresh().eval()
    p.loss_fn(call_model(model, p.inputs), p.targets).backward()
    model.train()
    dict(model.named_parameters())[p.names[0]].requires_grad_(False)
    return model


def checked(measure, p, zh):
    """``measure(p, model)`` on a copy of the model as a training loop leaves it (train mode,
    ``.grad`` set, one selected parameter frozen), under non-default SDPA settings; asserts
    that the model (state_dict bitwise, modes, ``requires_grad``, ``.grad``), the global
    random states and the SDPA settings are exactly as before, also when it raises."""
    model = _used_as_in_training(p)
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends, set_priority=True):
        sdpa = zh.sdpa_settings()
        before = _caller_state(model)
        try:
            return measure(p, model)
        finally:
            _assert_unchanged(before, model, sdpa, zh)


def test_the_selection_is_small_and_names_parameters_of_the_model(zoo):
    named = dict(zoo.model.named_parameters())
    assert all(n in named for n in zoo.names)
    assert 24 <= sum(zoo.sizes) <= 100


def test_exact_trace_equals_the_dense_float64_hessian(curved, zh):
    truth = torch.trace(curved.hessian).item()
    res = checked(_trace, curved, zh)
    assert res.method == "exact" and res.num_matvecs == sum(curved.sizes)
    assert res.value == pytest.approx(truth, rel=1e-9, abs=1e-9 * curved.hessian.abs().max().item())


def test_top_eigenvalues_are_certified_against_eigh(curved, zh):
    truth = torch.linalg.eigvalsh(curved.hessian).flip(0)[:2]
    res = checked(_top, curved, zh)
    assert res.converged, res.residuals
    scale = truth.abs().max().item()
    for value, exact in zip(res.eigenvalues.tolist(), truth.tolist(), strict=True):
        assert abs(value - exact) <= TOL * abs(exact) + 1e-9 * scale, (value, exact)


def test_block_traces_are_the_dense_diagonal_blocks(curved, zh):
    res = checked(_blocks, curved, zh)
    diag = torch.diagonal(curved.hessian)
    pieces = torch.split(diag, curved.sizes)
    scale = 1e-9 * curved.hessian.abs().max().item()
    assert list(res.traces) == curved.names
    for name, piece in zip(curved.names, pieces, strict=True):
        assert res.traces[name] == pytest.approx(piece.sum().item(), rel=1e-9, abs=scale)
    assert res.total == pytest.approx(diag.sum().item(), rel=1e-9, abs=scale)


def test_sam_sharpness_is_the_loss_increase_at_its_perturbation(zoo, zh):
    res = checked(_sam, zoo, zh)
    loss = zoo.loss_at()
    assert np.isfinite(res.value) and res.value >= 0
    assert res.loss == pytest.approx(loss, rel=1e-10)
    eps = res.perturbation
    assert sorted(eps) == sorted(zoo.names)
    norm = torch.sqrt(sum((e**2).sum() for e in eps.values())).item()
    assert norm == pytest.approx(0.05, rel=1e-9)
    named = dict(zoo.model.named_parameters())
    perturbed = zoo.loss_at({n: named[n].detach() + e for n, e in eps.items()})
    assert res.perturbed_loss == pytest.approx(perturbed, rel=1e-10)
    assert res.value == pytest.approx(perturbed - loss, rel=1e-8, abs=1e-12)


def test_landscape_centre_is_the_loss_and_its_points_are_the_loss_along_the_line(zoo, zh):
    res = checked(_landscape, zoo, zh)
    loss = zoo.loss_at()
    values = torch.as_tensor(res.loss).tolist()
    assert len(values) == 5 and all(np.isfinite(values))
    assert res.center_loss == pytest.approx(loss, rel=1e-10)
    assert values[2] == pytest.approx(loss, rel=1e-10)
    named = dict(zoo.model.named_parameters())
    d = _direction(zoo)
    for t, value in ((-0.5, values[0]), (0.5, values[-1])):
        at = zoo.loss_at({n: named[n].detach() + t * d[n] for n in d})
        assert value == pytest.approx(at, rel=1e-9)


@pytest.mark.parametrize("measure", [_trace, _top, _blocks], ids=["trace", "top", "blocks"])
def test_a_model_without_second_derivatives_gets_sharpgens_error(broken, measure, zh):
    with pytest.raises(Exception) as info:
        checked(measure, broken, zh)
    assert info.type in (ValueError, TypeError), f"raw {info.type.__name__}: {info.value}"
    assert info.match(f"(?i){broken.case.raises}")


def _ggn(p, model):
    return sharpgen.ggn_trace(model, p.loss_fn, p.data, params=p.names, method="exact")


def test_the_ggn_route_runs_or_raises_sharpgens_error(broken, zh):
    if broken.case.ggn:
        res = checked(_ggn, broken, zh)
        assert res.value == pytest.approx(torch.trace(broken.ggn()).item(), rel=1e-9)
    else:  # the loss itself has no second derivative in the outputs
        with pytest.raises(ValueError, match=f"(?i){broken.case.raises}"):
            checked(_ggn, broken, zh)
