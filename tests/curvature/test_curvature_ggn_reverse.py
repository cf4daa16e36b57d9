"""The GGN through nn.EmbeddingBag (no second derivative): reverse mode, against dense truth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpgen.curvature._ggn_reverse as rev
from sharpgen import GGNOperator, ggn_trace, hessian_trace, top_eigenvalues

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
        return self.head(torch.tanh(self.emb(x)))


def _case(n: int = 6):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 10, (n, 5), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return Bag().to(DT), x, y


def _dense_ggn(model, batches):
    """sum_b w_b J_b^T H_b J_b, J_b by autograd.functional.jacobian, H_b in the outputs."""
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach() for n, p in model.named_parameters()}
    total = sum(len(y) for _, y in batches)
    out = 0
    for x, y in batches:
        flat0 = torch.cat([t.reshape(-1) for t in base.values()])

        def f(flat, x=x):
            params, off = {}, 0
            for n in names:
                params[n] = flat[off : off + base[n].numel()].view_as(base[n])
                off += base[n].numel()
            return torch.func.functional_call(model, params, (x,)).reshape(-1)

        J = torch.autograd.functional.jacobian(f, flat0)  # (m, n)
        o = f(flat0).detach()
        H = torch.autograd.functional.hessian(lambda z, y=y: ce(z.view(len(y), -1), y), o)
        out = out + len(y) / total * J.T @ H @ J
    return out


def test_ggn_trace_is_exact():
    model, x, y = _case()
    G = _dense_ggn(model, [(x, y)])
    res = ggn_trace(model, ce, (x, y), method="exact")
    assert res.value == pytest.approx(torch.trace(G).item(), rel=1e-10)


def test_operator_matvec_against_dense_over_batches():
    model, x, y = _case(8)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    G = _dense_ggn(model, batches)
    op = GGNOperator(model, ce, batches)
    V = torch.randn(G.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(op.matvec(V[:, 0]), G @ V[:, 0], rtol=1e-10, atol=1e-12)
    built = model.forwards
    for j in range(3):  # J_b and H_b are kept: no forward (and no backward) pass any more
        assert torch.allclose(op.matvec(V[:, j]), G @ V[:, j], rtol=1e-10, atol=1e-12)
    assert model.forwards == built
    assert torch.allclose(op.matmat(V), G @ V, rtol=1e-10, atol=1e-12)
    assert torch.allclose(op.to_dense(), G, rtol=1e-10, atol=1e-12)


def test_top_eigenvalue_of_the_ggn_operator():
    model, x, y = _case()
    G = _dense_ggn(model, [(x, y)])
    res = top_eigenvalues(GGNOperator(model, ce, (x, y)), k=1, tol=1e-8,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert float(res.eigenvalues[0]) == pytest.approx(torch.linalg.eigvalsh(G)[-1].item(), rel=1e-6)


def test_hessian_error_points_to_the_ggn():
    model, x, y = _case()
    with pytest.raises(ValueError, match=r"embedding_bag .* The GGN measures work .*ggn_trace"):
        hessian_trace(model, ce, (x, y))


def test_too_many_outputs_is_refused_with_the_size_and_the_fix(monkeypatch):
    model, x, y = _case()
    monkeypatch.setattr(rev, "MAX_REVERSE_OUTPUTS", 17)
    with pytest.raises(ValueError, match=r"18 output entries, above 17.*Fix: pass smaller batches"):
        ggn_trace(model, ce, (x, y), method="exact")
    monkeypatch.setattr(rev, "MAX_REVERSE_OUTPUTS", 4096)
    monkeypatch.setattr(rev, "MAX_REVERSE_JACOBIAN_BYTES", 1000)
    with pytest.raises(ValueError, match=r"Jacobian \(18 outputs x 55 parameters\)"):
        ggn_trace(model, ce, (x, y), method="exact")


def test_a_loss_without_second_derivative_still_raises_for_the_ggn():
    model = nn.Linear(4, 3).to(DT)
    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"multi_margin_loss .* in loss_fn.*Neither can a GGN"):
        ggn_trace(model, nn.functional.multi_margin_loss, (x, y))
