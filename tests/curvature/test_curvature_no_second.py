"""Built-in operations without a second derivative: a clear error before the first product."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpgen import HessianOperator, ModelObjective, hessian_trace, sam_sharpness

DT = torch.float64
ce = nn.functional.cross_entropy


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(10, 4, mode="mean")
        self.head = nn.Linear(4, 3)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.head(self.emb(x))


class Fixed(nn.Module):
    """The fix the error names: nn.Embedding and a mean over the bag."""

    def __init__(self, bag: Bag) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = bag.head
        self.emb.weight = bag.emb.weight

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


class Proto(nn.Module):
    """Distances to prototypes through torch.cdist inside the module's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.protos = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return -torch.cdist(self.proj(x), self.protos)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Tanh(), Proto())

    def forward(self, x):
        return self.body(x)


def _bag():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = (torch.randint(0, 10, (5, 3), generator=g), torch.randint(0, 3, (5,), generator=g))
    return Bag().to(DT), data


def test_embedding_bag_is_named_with_its_module_and_fix():
    model, data = _bag()
    with pytest.raises(ValueError, match=r"embedding_bag .* in module 'emb' \(EmbeddingBag\)"):
        hessian_trace(model, ce, data)
    assert model.forwards == 2  # the validation and the module search: no product ran
    assert all(not m._forward_hooks for m in model.modules())  # the search's hooks are gone


def test_the_error_comes_before_any_product_also_with_warn():
    model, data = _bag()
    op = HessianOperator(model, ce, data, second_order="warn")
    with pytest.raises(ValueError, match=r"fix: replace nn.EmbeddingBag.*nn.Embedding"):
        op @ torch.ones(op.shape[0], dtype=DT)


def test_first_order_measures_still_work():
    model, data = _bag()
    obj = ModelObjective(model, ce, data)
    res = sam_sharpness(obj, rho=0.01)
    assert res.value > 0
    assert torch.isfinite(obj.loss())


def test_the_named_fix_computes_the_same_loss_and_has_a_hessian():
    model, data = _bag()
    fixed = Fixed(model)
    x, y = data
    torch.testing.assert_close(ce(fixed(x), y), ce(model(x), y))
    assert hessian_trace(fixed, ce, data, method="exact").value > 0


def test_ctc_loss_is_placed_in_loss_fn():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).to(DT)
    steps, n, s = 6, 2, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, n, 5, dtype=DT, generator=g)
    targets = torch.randint(1, 4, (n, s), generator=g)

    def ctc(out, t):
        lengths = torch.full((n,), steps), torch.full((n,), s)
        return nn.functional.ctc_loss(out.log_softmax(-1), t, *lengths)

    with pytest.raises(ValueError, match=r"F.ctc_loss \(nn.CTCLoss\) in loss_fn \(outside"):
        hessian_trace(lin, ctc, (x, targets))


def test_a_functional_op_is_placed_in_the_innermost_module_that_calls_it():
    torch.manual_seed(0)
    model = Net().to(DT)
    x = torch.randn(6, 3, dtype=DT)
    y = torch.randint(0, 4, (6,))
    with pytest.raises(ValueError, match=r"torch.cdist in module 'body.1' \(Proto\)"):
        hessian_trace(model, ce, (x, y))


def test_hardsigmoid_is_named_and_its_fix_is_the_same_function_with_a_hessian():
    """nn.Hardsigmoid (MobileNetV3) has no second derivative in torch: sharpgen's error, not
    torch's raw one; the named fix computes the same loss and has a Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Hardsigmoid(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 4, dtype=DT, generator=g), torch.randint(0, 3, (8,), generator=g))
    with pytest.raises(ValueError, match=r"hardsigmoid .* in module '1' \(Hardsigmoid\)"):
        hessian_trace(model, ce, data, method="exact")

    class Relu6Sigmoid(nn.Module):
        def forward(self, x):
            return nn.functional.relu6(x + 3) / 6

    fixed = nn.Sequential(model[0], Relu6Sigmoid(), model[2])
    x, y = data
    torch.testing.assert_close(ce(fixed(x), y), ce(model(x), y))
    assert torch.isfinite(torch.tensor(hessian_trace(fixed, ce, data, method="exact").value))
