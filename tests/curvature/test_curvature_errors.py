"""Bad input gets a clear error (argument, value, fix), and the model state survives it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sharpgen.curvature import GGNOperator, HessianOperator, ModelObjective

DT = torch.float64


@pytest.fixture
def problem(cv):
    model = cv.make_mlp()
    x, y = cv.regression_data()
    return model, x, y


def test_non_scalar_loss(problem, state_check):
    model, x, y = problem
    check = state_check(model)
    with pytest.raises(ValueError, match=r"shape \(10, 2\); it must return a scalar"):
        HessianOperator(model, lambda o, t: (o - t) ** 2, (x, y))
    check()


def test_non_finite_loss(problem, state_check):
    model, x, y = problem
    x = x.clone()
    x[3, 1] = float("nan")
    check = state_check(model)
    with pytest.raises(FloatingPointError, match="loss on the first batch is nan"):
        HessianOperator(model, F.mse_loss, (x, y))
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        ModelObjective(model, F.mse_loss, [(x[:2], y[:2]), (x, y)]).loss()
    check()


def test_loss_independent_of_params(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match="does not depend on the selected parameters"):
        HessianOperator(model, lambda o, t: (t**2).mean(), (x, y))
    with pytest.raises(ValueError, match="does not depend on the selected parameters"):
        HessianOperator(model, lambda o, t: F.mse_loss(o.detach(), t), (x, y))


def test_no_params_selected(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match="no parameters selected"):
        HessianOperator(model, F.mse_loss, (x, y), [])
    with pytest.raises(ValueError, match="no parameters selected.*predicate rejected"):
        HessianOperator(model, F.mse_loss, (x, y), lambda n, p: False)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters selected.*requires_grad=True"):
        HessianOperator(frozen, F.mse_loss, (torch.ones(2, 2), torch.ones(2, 2)))


def test_unknown_parameter_name(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match=r"'0.wieght', which is not a parameter"):
        HessianOperator(model, F.mse_loss, (x, y), ["0.wieght"])
    with pytest.raises(TypeError, match="params must be None, a dict"):
        HessianOperator(model, F.mse_loss, (x, y), 3)


def test_empty_data(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match="data is empty"):
        HessianOperator(model, F.mse_loss, [])
    empty_loader = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="data is empty"):
        HessianOperator(model, F.mse_loss, empty_loader)
    with pytest.raises(ValueError, match="exhausted or empty iterator"), pytest.warns(UserWarning):
        HessianOperator(model, F.mse_loss, iter([]))

    class NoLen:
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="data yielded no batches"):
        HessianOperator(model, F.mse_loss, NoLen())


def test_batch_not_a_pair(problem):
    model, x, y = problem
    with pytest.raises(
        ValueError, match=r"batch 0 is a tuple of length 3, not an \(inputs, targets\)"
    ):
        HessianOperator(model, F.mse_loss, [(x, y, y)])
    with pytest.raises(ValueError, match=r"batch 2 is a Tensor, not an \(inputs, targets\)"):
        ModelObjective(model, F.mse_loss, [(x, y), (x, y), x]).loss()
    with pytest.raises(TypeError, match="data must be one"):
        HessianOperator(model, F.mse_loss, x)
    with pytest.raises(TypeError, match="inputs of data batch 0 are a str"):
        HessianOperator(model, F.mse_loss, [("x", y)])


def test_wrong_vector(problem):
    model, x, y = problem
    H = HessianOperator(model, F.mse_loss, (x, y))
    with pytest.raises(ValueError, match="27 rows but the operator has size 26"):
        H.matvec(torch.ones(27, dtype=DT))
    with pytest.raises(
        TypeError, match=r"dtype torch.float32 but the operator works in torch.float64"
    ):
        H.matvec(torch.ones(26))
    with pytest.raises(ValueError, match="on device meta but the operator is on cpu"):
        H.matvec(torch.ones(26, dtype=DT, device="meta"))
    assert H.num_matvecs == 0


def test_mixed_devices(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match="data batch 0 holds a tensor on meta but the parameters"):
        HessianOperator(model, F.mse_loss, (x.to("meta"), y))
    model.to(torch.float64)
    params = {"0.weight": model[0].weight, "2.bias": torch.zeros(2, dtype=DT, device="meta")}
    with pytest.raises(ValueError, match="live on several devices"):
        HessianOperator(model, F.mse_loss, (x, y), params)
    with pytest.raises(TypeError, match="several dtypes"):
        HessianOperator(
            model,
            F.mse_loss,
            (x, y),
            {"0.weight": model[0].weight.float(), "2.bias": model[2].bias},
        )


def test_non_finite_product(problem, state_check):
    model, x, y = problem
    check = state_check(model)
    H = HessianOperator(model, F.mse_loss, (x, y))
    v = torch.ones(26, dtype=DT)
    v[5] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        H.matvec(v)

    # finite loss at the point, infinite curvature: sqrt(|o|) at o = 0
    lin = torch.nn.Linear(3, 1, bias=False).to(DT)
    torch.nn.init.zeros_(lin.weight)
    G = GGNOperator(lin, lambda o, t: o.abs().sqrt().mean(), (x, y[:, :1]))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        G.matvec(torch.ones(3, dtype=DT))
    check()


def test_unknown_option_values(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match=r"bn must be one of \('eval', 'batch'\).*got 'train'"):
        HessianOperator(model, F.mse_loss, (x, y), bn="train")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'func', 'autograd'\)"):
        HessianOperator(model, F.mse_loss, (x, y), backend="jax")
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\).*'none'"):
        GGNOperator(model, F.mse_loss, (x, y), reduction="none")
    with pytest.raises(ValueError, match=r"func_mode must be one of \('reverse', 'forward'\)"):
        HessianOperator(model, F.mse_loss, (x, y), func_mode="fwd")
    with pytest.raises(ValueError, match="max_block must be a positive int or None"):
        HessianOperator(model, F.mse_loss, (x, y), max_block=0)
    with pytest.raises(TypeError, match="dropout must be a bool"):
        HessianOperator(model, F.mse_loss, (x, y), dropout="on")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        HessianOperator(lambda x: x, F.mse_loss, (x, y))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        HessianOperator(model, "mse", (x, y))


class _Augmented:
    """A re-iterable dataset with random augmentation: different every pass."""

    def __init__(self, x, y):
        self.x, self.y, self.gen = x, y, torch.Generator().manual_seed(0)

    def __iter__(self):
        noise = torch.randn(self.x.shape, dtype=DT, generator=self.gen)
        yield self.x + 0.1 * noise, self.y


def test_check_deterministic(problem, state_check):
    model, x, y = problem
    with pytest.raises(ValueError, match="differs between two passes.*augmentation.*shuffle=False"):
        HessianOperator(model, F.mse_loss, _Augmented(x, y), check_deterministic=True)
    drop = torch.nn.Sequential(model, torch.nn.Dropout(0.5))
    check = state_check(drop)
    with pytest.raises(ValueError, match="differs between two passes"):
        HessianOperator(drop, F.mse_loss, (x, y), dropout=True, check_deterministic=True)
    check()
    HessianOperator(drop, F.mse_loss, (x, y), check_deterministic=True)  # dropout off: fine


def test_state_restored_after_an_error_mid_product(cv, state_check):
    model = cv.make_convbn()
    model.train()
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    model.fc.bias.requires_grad_(False)
    x, y = cv.image_data()
    calls = {"n": 0}

    def flaky_loss(o, t):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyError("boom")
        return F.cross_entropy(o, t)

    check = state_check(model)
    H = HessianOperator(model, flaky_loss, (x, y), bn="batch")
    check()
    with pytest.raises(KeyError, match="boom"):
        H.matvec(torch.ones(H.shape[0], dtype=DT))
    check()
