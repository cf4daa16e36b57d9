"""bfloat16 / float16 models and autocast: products in the model's precision, sums in float32.

Truth is float64 at the model's own (rounded) parameters and inputs, so only the computation
is measured, not the rounding of the weights. With unit roundoff ``u`` of the model's dtype
a computed product is $\\hat H v = Hv + e$; the bounds below are

* product: $\\|e\\| \\le 2u\\,\\|H\\|_2\\,\\|v\\|$;
* exact trace: $|\\sum_i e_i^\\top \\hat H e_i - \\operatorname{tr} H| \\le 2u \\sum_i \\|H e_i\\|$
  (each diagonal entry is read off a product of its own);
* top eigenvalue: $|\\hat\\lambda - \\lambda| \\le \\|E\\|_2 + \\mathrm{tol}\\,\\lambda \\le
  (2u + \\mathrm{tol})\\,\\lambda$ (Weyl, plus the Lanczos tolerance).

The constant 2 is about 8x the worst ratio measured on these models (0.23 for bfloat16
and float16 with three seeds): a product's error averages the independent roundings of the
samples. Sums are float32: a dataset sum of $N$ terms is exact to $N\\,2^{-24}$, where
bfloat16 would stall once the running sum is $2^8$ times a term.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpgen.curvature import HessianOperator, ModelObjective
from sharpgen.linalg import hutchinson_trace, lanczos
from sharpgen.sharpness import block_traces, hessian_trace, top_eigenvalues
from tests.conftest import dense_hessian

LOW = [torch.bfloat16, torch.float16]
C = 2.0  # the constant of the bounds above


def _u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _problem(dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g).to(dtype)
    y = torch.randint(0, 3, (64,), generator=g)
    return model, (x, y)


def _truth(model: nn.Module, batch) -> torch.Tensor:
    """The float64 Hessian at the model's rounded parameters and inputs."""
    x, y = batch
    return dense_hessian(copy.deepcopy(model).double(), F.cross_entropy, [(x.double(), y)])


@pytest.mark.parametrize("dtype", LOW)
def test_products_trace_and_top_eigenvalue_of_a_low_precision_model(dtype, state_check):
    model, batch = _problem(dtype)
    check = state_check(model)
    H = _truth(model, batch)
    u, lam = _u(dtype), torch.linalg.eigvalsh(H)
    op = HessianOperator(model, F.cross_entropy, batch)
    assert op.dtype == torch.float32  # vectors, sums and products are float32
    V = torch.randn(op.shape[0], 4, generator=torch.Generator().manual_seed(1))
    err = (op.matmat(V).double() - H @ V.double()).norm(dim=0)
    assert (err <= C * u * lam.abs().max() * V.double().norm(dim=0)).all()
    exact = hessian_trace(model, F.cross_entropy, batch, method="exact")
    assert abs(exact.value - float(H.trace())) <= C * u * float(H.norm(dim=0).sum())
    blocks = block_traces(model, F.cross_entropy, batch, blocks="parameter", method="exact")
    cols, start = H.norm(dim=0), 0
    for name, p in model.named_parameters():
        stop = start + p.numel()
        true = float(H.diagonal()[start:stop].sum())
        assert abs(blocks.traces[name] - true) <= C * u * float(cols[start:stop].sum())
        start = stop
    top = top_eigenvalues(model, F.cross_entropy, batch, k=1, generator=torch.Generator())
    assert top.converged and top.eigenvalues.dtype == torch.float32
    assert abs(float(top.eigenvalues[0]) - float(lam[-1])) <= (C * u + 1e-3) * float(lam[-1])
    assert next(model.parameters()).dtype == dtype
    check()


def test_hutchinson_sums_are_float32_on_a_bfloat16_model():
    model, batch = _problem(torch.bfloat16)
    op = HessianOperator(model, F.cross_entropy, batch)
    est = hutchinson_trace(op, num_matvecs=64, generator=torch.Generator().manual_seed(2))
    assert est.samples.dtype == torch.float32
    H = _truth(model, batch)
    # the same Rademacher probes (dtype-independent draws) through the float64 truth; per
    # probe |z'(Hz + e) - z'Hz| <= |z| |e| <= C u |H| |z|^2 = C u |H| p
    ref = hutchinson_trace(H, num_matvecs=64, generator=torch.Generator().manual_seed(2))
    bound = C * _u(torch.bfloat16) * float(torch.linalg.matrix_norm(H, 2)) * op.shape[0]
    assert abs(est.value - ref.value) <= bound


def _many_batches(n: int = 512):
    """``n`` one-sample batches: bfloat16 running sums of their losses would stall at 256."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g).to(torch.bfloat16)
    y = torch.randn(n, 2, generator=g).to(torch.bfloat16) + 3.0
    return model, [(x[i : i + 1], y[i : i + 1]) for i in range(n)]


def test_dataset_sums_of_many_bfloat16_batches_keep_float32_accuracy():
    model, batches = _many_batches()
    n = len(batches)
    obj = ModelObjective(model, F.mse_loss, batches)
    losses, grads = [], []
    for x, y in batches:  # each batch as the objective computes it: float32 loss of outputs
        model.zero_grad()
        loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.double().reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    truth = sum(losses) / n
    loss, grad = obj.loss_and_gradient()
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grad.values())
    tol = n * 2.0**-24  # float32 summation of n terms
    assert abs(float(loss) - truth) <= tol * truth
    g = torch.cat([t.double().reshape(-1) for t in grad.values()])
    g_true = torch.stack(grads).mean(0)
    # each batch gradient is bfloat16 (rounded once, u) and summed in float32
    assert (g - g_true).norm() <= (tol + _u(torch.bfloat16)) * torch.stack(grads).norm(dim=1).mean()
    # the test can fail: a bfloat16 running sum of the same losses loses half of them
    acc = torch.zeros((), dtype=torch.bfloat16)
    for value in losses:
        acc = acc + torch.tensor(value, dtype=torch.bfloat16)
    assert abs(float(acc) / n - truth) > 100 * tol * truth


def test_products_summed_over_many_bfloat16_batches():
    model, batches = _many_batches(256 + 64)
    obj = ModelObjective(model, F.mse_loss, batches)
    op = HessianOperator(obj)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(4))
    one = [HessianOperator(model, F.mse_loss, b).matvec(v).double() for b in batches]
    truth = torch.stack(one).mean(0)
    out = op.matvec(v)
    assert out.dtype == torch.float32
    scale = torch.stack(one).norm(dim=1).mean()
    assert (out.double() - truth).norm() <= 2 * len(batches) * 2.0**-24 * scale


# -- autocast ------------------------------------------------------------------------------
def _f32_problem():
    model, batch = _problem(torch.float32)
    return model, batch


def test_autocast_option_and_the_callers_context_agree_and_match_float32_truth(state_check):
    model, batch = _f32_problem()
    check = state_check(model)
    gen = torch.Generator
    opt = top_eigenvalues(model, F.cross_entropy, batch, autocast=torch.bfloat16,
                          generator=gen().manual_seed(0))  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = top_eigenvalues(model, F.cross_entropy, batch, generator=gen().manual_seed(0))
        off = top_eigenvalues(model, F.cross_entropy, batch, autocast=False,
                              generator=gen().manual_seed(0))  # fmt: skip
        assert torch.is_autocast_enabled("cpu")
    plain = top_eigenvalues(model, F.cross_entropy, batch, generator=gen().manual_seed(0))
    assert torch.equal(opt.eigenvalues, ctx.eigenvalues)
    assert torch.equal(off.eigenvalues, plain.eigenvalues)
    assert not torch.equal(opt.eigenvalues, plain.eigenvalues)  # autocast did run
    lam = float(torch.linalg.eigvalsh(_truth(model, batch))[-1])
    u = _u(torch.bfloat16)
    assert abs(float(opt.eigenvalues[0]) - lam) <= (C * u + 1e-3) * lam
    assert next(model.parameters()).dtype == torch.float32
    check()


def test_linear_algebra_ignores_the_callers_autocast():
    A = torch.diag(torch.arange(1.0, 41.0))
    plain = lanczos(A, k=2, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # addmv would run in bfloat16
        inside = lanczos(A, k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.eigenvalues, inside.eigenvalues)


class _Boom(Exception):
    pass


def _failing_loss(after: int):
    calls = [0]

    def loss(out, y):
        calls[0] += 1
        if calls[0] > after:
            raise _Boom
        return F.cross_entropy(out, y)

    return loss


def test_autocast_state_is_restored_after_an_exception():
    model, batch = _f32_problem()
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.raises(_Boom):
            hessian_trace(model, _failing_loss(2), batch, method="exact", graphs="recompute")
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.float16
    with pytest.raises(_Boom):
        hessian_trace(model, _failing_loss(2), batch, method="exact", graphs="recompute",
                      autocast=torch.bfloat16)  # fmt: skip
    assert not torch.is_autocast_enabled("cpu")


def test_refreshed_objective_keeps_the_autocast_it_was_built_with():
    model, batch = _f32_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        obj = ModelObjective(model, F.cross_entropy, batch)
    assert obj.autocast == torch.bfloat16 and obj.refreshed().autocast == torch.bfloat16
    assert ModelObjective(model, F.cross_entropy, batch).autocast is None


# -- errors --------------------------------------------------------------------------------
def test_bad_autocast_arguments_name_the_fix():
    model, batch = _f32_problem()
    with pytest.raises(TypeError, match="autocast must be None"):
        ModelObjective(model, F.cross_entropy, batch, autocast="bf16")
    with pytest.raises(ValueError, match=r"autocast must be one of .*torch.bfloat16"):
        ModelObjective(model, F.cross_entropy, batch, autocast=torch.float64)
    x, y = batch
    with pytest.raises(ValueError, match=r"needs float32 parameters.*model.float\(\)"):
        ModelObjective(model.double(), F.cross_entropy, (x.double(), y), autocast=torch.bfloat16)


class _Distances(nn.Module):
    """A layer whose op (``torch.cdist``) has no float16 kernel on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        return -torch.cdist(x, self.centers, p=1.0)


def test_a_missing_low_precision_kernel_is_a_clear_error():
    _, (x, y) = _problem(torch.float32)
    model = _Distances().half()
    with pytest.raises(TypeError, match=r"no torch.float16 kernel.*model.float\(\)"):
        ModelObjective(model, F.cross_entropy, (x.half(), y))
    assert next(model.parameters()).dtype == torch.float16
