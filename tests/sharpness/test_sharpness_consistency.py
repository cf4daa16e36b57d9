"""rho = 0 is accepted by every SAM-family entry point and gives the meaningful answer, 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sharpgen import average_sharpness, sam_gradient, sam_perturbation, sam_sharpness

DT = torch.float64


def _problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=DT, generator=g))
    x, y = torch.randn(8, 3, dtype=DT, generator=g), torch.randn(8, 1, dtype=DT, generator=g)
    return model, nn.functional.mse_loss, (x, y)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"norm": "linf", "steps": 3}, {"restarts": 2, "steps": 2}, {"m": 4},
     {"adaptive": True, "eta": 0.01}],
)  # fmt: skip
@pytest.mark.parametrize("rho", [0, 0.0, np.float64(0.0), torch.tensor(0.0)])
def test_sam_sharpness_at_rho_zero_is_exactly_zero(rho, kwargs):
    model, loss, data = _problem()
    res = sam_sharpness(
        model, loss, data, rho, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert res.value == 0.0 and res.rho == 0.0
    assert res.perturbed_loss == res.loss
    eps = res.perturbation if isinstance(res.perturbation, dict) else res.perturbation[0]
    assert all(not bool(t.any()) for t in eps.values())


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
@pytest.mark.parametrize("antithetic", [True, False])
def test_average_sharpness_at_rho_zero_is_exactly_zero(distribution, antithetic):
    model, loss, data = _problem()
    res = average_sharpness(
        model, loss, data, 0.0, num_samples=3, distribution=distribution, antithetic=antithetic,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert res.value == 0.0 and res.stderr == 0.0 and bool((res.samples == 0).all())


def test_rho_zero_agrees_across_the_perturbation_functions():
    model, loss, data = _problem()
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    eps = sam_perturbation(grads, params, rho=0.0)
    assert all(not bool(t.any()) for t in eps.values())

    def functional_loss(p, batch):
        out = torch.func.functional_call(model, p, (batch[0],))
        return loss(out, batch[1])

    plain = torch.func.grad(functional_loss)(params, data)
    at_zero = sam_gradient(functional_loss, params, data, rho=0.0)
    assert all(torch.equal(plain[n], at_zero[n]) for n in params)
    for bad in (-0.1, float("nan")):
        for fn in (
            lambda r: sam_sharpness(model, loss, data, r),
            lambda r: average_sharpness(model, loss, data, r),
        ):
            with pytest.raises(ValueError, match="rho must be a finite number >= 0.*rho=0"):
                fn(bad)
