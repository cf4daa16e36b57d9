"""Operations without a second derivative are detected instead of giving a wrong Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from sharpgen import GGNOperator, HessianOperator, ModelObjective, hessian_trace, sam_sharpness
from sharpgen.curvature import SecondDerivativeWarning
from sharpgen.curvature._second_order import first_order_functions

DT = torch.float64


class OnceSquare(torch.autograd.Function):
    """x**2 with a backward marked @once_differentiable (double backward silently zero)."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class DetachedSquare(OnceSquare):
    """x**2 whose backward computes on detached tensors (no decorator, same silent zero)."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x.detach() * g.detach()


class GoodSquare(OnceSquare):
    """x**2 with a differentiable backward: exact second derivatives."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Net(nn.Module):
    def __init__(self, square: type[torch.autograd.Function] | None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = nn.Linear(3, 4).to(DT)
        self.l2 = nn.Linear(4, 1).to(DT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, dtype=DT, generator=g))
        self.square = square

    def forward(self, x):
        h = self.l1(x)
        h = h * h if self.square is None else self.square.apply(h)
        return self.l2(torch.tanh(h))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, dtype=DT, generator=g), torch.randn(16, 1, dtype=DT, generator=g)


def _mse(out, y):
    return nn.functional.mse_loss(out, y)


def _true_trace() -> float:
    return hessian_trace(Net(None), _mse, _data(), method="exact").value


@pytest.mark.parametrize("square", [OnceSquare, DetachedSquare])
@pytest.mark.parametrize("backend", ["auto", "func", "autograd"])
def test_missing_second_derivative_raises_on_every_backend(square, backend):
    model = Net(square)
    with pytest.raises(ValueError, match=rf"{square.__name__} whose backward is not diff.*Fix:"):
        hessian_trace(model, _mse, _data(), method="exact", backend=backend)
    op = HessianOperator(model, _mse, _data(), backend=backend)
    with pytest.raises(ValueError, match="second_order='warn'"):
        op.matvec(torch.ones(op.shape[0], dtype=DT))
    ggn = GGNOperator(model, _mse, _data(), backend=backend)
    with pytest.raises(ValueError, match="silently drops their second derivative"):
        ggn.matvec(torch.ones(ggn.shape[0], dtype=DT))


@pytest.mark.parametrize("backend", ["autograd", "auto"])
def test_warn_policy_marks_the_objective_and_shows_the_wrong_value(backend):
    op = HessianOperator(Net(OnceSquare), _mse, _data(), backend=backend, second_order="warn")
    assert op.objective.exact_second_order is None
    with pytest.warns(SecondDerivativeWarning, match="OnceSquare"):
        wrong = float(torch.trace(op.to_dense()))
    assert op.objective.exact_second_order is False
    truth = _true_trace()
    assert abs(wrong - truth) > 0.1 * abs(truth)  # what the check protects against


def test_differentiable_custom_function_passes_and_is_exact():
    op = HessianOperator(Net(GoodSquare), _mse, _data(), backend="autograd")
    value = float(torch.trace(op.to_dense()))
    assert op.objective.exact_second_order is True
    assert value == pytest.approx(_true_trace(), rel=1e-10)


def test_ignore_policy_and_first_order_measures_are_not_affected():
    model = Net(OnceSquare)
    obj = ModelObjective(model, _mse, _data(), second_order="ignore")
    obj.hvp({n: torch.ones((1, *p.shape), dtype=DT) for n, p in model.named_parameters()})
    assert obj.exact_second_order is True
    # losses and gradients need no second derivative: SAM sharpness runs
    assert float(sam_sharpness(model, _mse, _data(), 0.05)) > 0
    with pytest.raises(ValueError, match=r"second_order must be one of \('raise', 'warn'"):
        ModelObjective(model, _mse, _data(), second_order="off")


def test_detector_on_plain_graphs():
    x = torch.randn(5, dtype=DT, requires_grad=True)
    assert first_order_functions((torch.tanh(x) ** 2).sum(), [x]) == []
    assert first_order_functions(OnceSquare.apply(x).sum(), [x]) == ["OnceSquare"]
    loss = (DetachedSquare.apply(x) * x).sum()
    assert first_order_functions(loss, [x]) == ["DetachedSquare"]


def test_measures_take_the_option_in_their_convenience_form():
    model = Net(OnceSquare)
    with pytest.warns(SecondDerivativeWarning, match="OnceSquare"):
        est = hessian_trace(model, _mse, _data(), method="exact", second_order="warn")
    truth = _true_trace()
    assert abs(est.value - truth) > 0.1 * abs(truth)
    with pytest.raises(ValueError, match="pass second_order='warn' \\(to the measure"):
        hessian_trace(model, _mse, _data(), method="exact")
