"""The model zoo's shared case fixture (one parametrized fixture for every test, as in
curvlinops' conftest) and the float64 truth it is checked against.

``zoo`` is every case of ``_zoo_models.CASES``; ``curved`` the cases whose Hessian can be
taken, ``broken`` those whose curvature measures must raise sharpgen's error. Each gives a
`Problem`: the case, a fresh model, its loss and batch, the selected parameter names, and
(computed once per case, cached) the dense Hessian of the selected parameters.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel


def _load_zoo():
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("_zoo_models")


CASES = _load_zoo().CASES


def _call(model, inputs, params):
    if isinstance(inputs, dict):
        return functional_call(model, params, (), inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, params, tuple(inputs))
    return functional_call(model, params, (inputs,))


@dataclass
class Problem:
    """One case, built: everything a zoo test needs, and the dense truth (cached)."""

    case: Any
    model: torch.nn.Module
    loss_fn: Any
    data: Any
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = list(self.case.params)

    @property
    def inputs(self) -> Any:
        return self.data[0]

    @property
    def targets(self) -> Any:
        return self.data[1]

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.model)

    def loss_at(self, values: dict[str, torch.Tensor] | None = None) -> float:
        """The loss of the model in eval mode with ``values`` for some parameters."""
        ref = self.fresh().eval()
        with torch.no_grad():
            return float(self.loss_fn(_call(ref, self.inputs, values or {}), self.targets))

    def _flat_loss(self):
        """``(loss(flat), flat)``: the loss as a function of the flattened selection."""
        ref = self.fresh().eval()
        named = dict(ref.named_parameters())
        shapes = [named[n].shape for n in self.names]
        sizes = [named[n].numel() for n in self.names]
        flat = torch.cat([named[n].detach().reshape(-1) for n in self.names])

        def unflatten(vec):
            pieces = torch.split(vec, sizes)
            return {n: t.reshape(s) for n, t, s in zip(self.names, pieces, shapes, strict=True)}

        def outputs(vec):
            return _call(ref, self.inputs, unflatten(vec))

        return outputs, flat, sizes

    @cached_property
    def sizes(self) -> list[int]:
        return self._flat_loss()[2]

    @cached_property
    def hessian(self) -> torch.Tensor:
        """Dense Hessian of the loss in the selected parameters: rows by double backward
        through the math attention kernel (the reference, not the code under test)."""
        outputs, flat, _ = self._flat_loss()
        flat = flat.clone().requires_grad_(True)
        with sdpa_kernel([SDPBackend.MATH]):
            loss = self.loss_fn(outputs(flat), self.targets)
            (grad,) = torch.autograd.grad(loss, flat, create_graph=True)
            eye = torch.eye(flat.numel(), dtype=flat.dtype)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    (rows,) = torch.autograd.grad(
                        grad, flat, eye, retain_graph=True, is_grads_batched=True
                    )
            except RuntimeError:  # an op without a batching rule: row by row
                rows = torch.stack(
                    [torch.autograd.grad(grad, flat, e, retain_graph=True)[0] for e in eye]
                )
        return (rows + rows.T).detach() / 2

    def ggn(self) -> torch.Tensor:
        r"""Dense generalized Gauss-Newton $J^\top (\partial^2 \ell / \partial f^2) J$ (first
        derivatives of the model only, so also through ops without a second derivative)."""
        outputs, flat, _ = self._flat_loss()
        jac = torch.autograd.functional.jacobian(outputs, flat)  # (*out, p)
        out = outputs(flat).detach()
        hess_out = torch.autograd.functional.hessian(lambda o: self.loss_fn(o, self.targets), out)
        m = out.numel()
        jac = jac.reshape(m, -1)
        return jac.T @ hess_out.reshape(m, m) @ jac


_PROBLEMS: dict[str, Problem] = {}


def _problem(case) -> Problem:
    if case.name not in _PROBLEMS:
        model, loss_fn, data = case.build()
        _PROBLEMS[case.name] = Problem(case, model, loss_fn, data)
    return _PROBLEMS[case.name]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def zoo(request) -> Problem:
    """Every model of the zoo."""
    return _problem(request.param)


@pytest.fixture(params=[c for c in CASES if c.raises is None], ids=lambda c: c.name)
def curved(request) -> Problem:
    """The models whose Hessian sharpgen must give."""
    return _problem(request.param)


@pytest.fixture(params=[c for c in CASES if c.raises is not None], ids=lambda c: c.name)
def broken(request) -> Problem:
    """The models whose curvature measures must raise sharpgen's error naming the op."""
    return _problem(request.param)


def sdpa_settings() -> tuple:
    """The caller's attention settings: the enabled scaled-dot-product-attention backends
    with their priority, the math kernel's reduced-precision flag and the
    `torch.nn.MultiheadAttention` fast path."""
    return (
        _cur_sdpa_kernel_backends(with_priority=True),
        tuple(torch._C._get_sdp_priority_order()),
        torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed(),
        torch.backends.mha.get_fastpath_enabled(),
    )


class _Helpers:
    sdpa_settings = staticmethod(sdpa_settings)
    cases = CASES


@pytest.fixture
def zh():
    """Namespace of the helpers above (conftest is not importable)."""
    return _Helpers
