"""The stacked trainer against a loop of separate plain-torch trainings, step by step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sharpgen
from sharpgen.study._stacked import Arch, StackedTrainer, init_stack, module_of, train_stack

R = 4
LR = torch.tensor([0.1, 0.05, 0.2, 0.07], dtype=torch.float64)
MOM = torch.tensor([0.0, 0.9, 0.5, 0.0], dtype=torch.float64)
WD = torch.tensor([0.0, 1e-3, 0.0, 5e-2], dtype=torch.float64)
RHO = torch.tensor([0.05, 0.1, 0.2, 0.01], dtype=torch.float64)


def _data(outputs: int, n: int = 12, d: int = 5):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(R, n, d, generator=g, dtype=torch.float64)
    if outputs == 1:
        Y = torch.randn(R, n, generator=g, dtype=torch.float64)
    else:
        Y = torch.randint(0, outputs, (R, n), generator=g)
    return X, Y


def _reference_optimizer(model, optimizer, r):
    kw = {"lr": float(LR[r]), "momentum": float(MOM[r]), "weight_decay": float(WD[r])}
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **kw)
    return sharpgen.SAM(
        model.parameters(), torch.optim.SGD, rho=float(RHO[r]),
        adaptive=optimizer == "asam", normalize=optimizer != "usam", **kw,
    )  # fmt: skip


CASES = [
    ("mlp", 3, 2, True, "sgd"),
    ("mlp", 3, 2, True, "sam"),
    ("mlp", 3, 1, False, "usam"),
    ("mlp", 3, 1, True, "asam"),
    ("two_layer", 1, 1, True, "sam"),
    ("two_layer", 1, 1, False, "sgd"),
    ("mlp", 1, 3, True, "sam"),
]


@pytest.mark.parametrize(("kind", "outputs", "depth", "bias", "optimizer"), CASES)
def test_stacked_steps_equal_separate_torch_trainings(kind, outputs, depth, bias, optimizer):
    arch = Arch(kind, d=5, width=7, depth=depth, outputs=outputs, bias=bias)
    gens = [torch.Generator().manual_seed(10 + r) for r in range(R)]
    P = init_stack(arch, gens, torch.float64)
    models = [module_of(arch, P, r) for r in range(R)]
    opts = [_reference_optimizer(m, optimizer, r) for r, m in enumerate(models)]
    X, Y = _data(outputs)
    zero = torch.zeros(R, dtype=torch.float64)
    tr = StackedTrainer(
        arch, P, X, Y, lr=LR, momentum=MOM, weight_decay=WD, rho=RHO, dropout=zero,
        optimizer=optimizer,
    )  # fmt: skip
    loss_fn = F.mse_loss if outputs == 1 else F.cross_entropy
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        idx = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(R)])
        tr.step(idx)
        for r, (model, opt) in enumerate(zip(models, opts, strict=True)):
            xb, yb = X[r, idx[r]], Y[r, idx[r]]

            def closure(model=model, opt=opt, xb=xb, yb=yb):
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            if optimizer == "sgd":
                closure()
                opt.step()
            else:
                opt.step(closure)
            ref = [p.detach() for p in models[r].parameters()]
            mine = [P[name][r] for name in arch.names()]
            for a, b in zip(mine, ref, strict=True):
                torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-12, atol=1e-13)


def test_init_equals_nn_linear_and_two_layer_relu_draws():
    arch = Arch("two_layer", d=6, width=9, depth=1, outputs=1, bias=True)
    P = init_stack(arch, [torch.Generator().manual_seed(3)], torch.float32)
    net = sharpgen.two_layer_relu(6, 9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(P["weight0"][0], net.W1) and torch.equal(P["bias0"][0], net.b1)
    assert torch.equal(P["weight1"][0, 0], net.W2)
    arch = Arch("mlp", d=6, width=9, depth=2, outputs=3, bias=True)
    P = init_stack(arch, [torch.Generator().manual_seed(4)], torch.float32)
    torch.manual_seed(4)  # nn.Linear draws from the global RNG; restored below
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(4)
        lins = [torch.nn.Linear(6, 9), torch.nn.Linear(9, 9), torch.nn.Linear(9, 3)]
    finally:
        torch.random.set_rng_state(state)
    for i, lin in enumerate(lins):
        assert torch.equal(P[f"weight{i}"][0], lin.weight) and torch.equal(
            P[f"bias{i}"][0], lin.bias
        )


def test_module_of_computes_the_stacked_outputs():
    for arch in (Arch("mlp", 5, 7, 2, 3, True), Arch("two_layer", 5, 7, 1, 1, False)):
        gens = [torch.Generator().manual_seed(r) for r in range(R)]
        P = init_stack(arch, gens, torch.float64)
        X, Y = _data(arch.outputs)
        zero = torch.zeros(R, dtype=torch.float64)
        tr = StackedTrainer(
            arch, P, X, Y, lr=LR, momentum=zero, weight_decay=zero, rho=zero, dropout=zero
        )
        out = tr.outputs(P, X, None)
        for r in range(R):
            torch.testing.assert_close(out[r], module_of(arch, P, r)(X[r]), rtol=1e-12, atol=1e-12)


def test_frozen_models_do_not_move_and_stop_steps_are_recorded():
    arch = Arch("mlp", 5, 16, 1, 3, True)
    gens = [torch.Generator().manual_seed(r) for r in range(R)]
    P = init_stack(arch, gens, torch.float64)
    X, Y = _data(3)
    zero = torch.zeros(R, dtype=torch.float64)
    lr = torch.tensor([0.2, 0.1, 1e-6, 0.3], dtype=torch.float64)
    tr = StackedTrainer(
        arch, P, X, Y, lr=lr, momentum=zero + 0.5, weight_decay=zero, rho=zero, dropout=zero
    )
    order = [torch.Generator().manual_seed(r) for r in range(R)]
    out = train_stack(tr, order, batch_size=4, metric="error", threshold=0.0, max_steps=300)
    stopped = out.stop_step >= 0
    assert stopped[[0, 1, 3]].all() and not stopped[2]  # lr 1e-6 cannot fit in 300 steps
    assert out.steps == 300 and (out.stop_step[stopped] % 3 == 0).all()  # checked each epoch
    frozen = {k: v.clone() for k, v in P.items()}
    tr.step(torch.zeros(R, 4, dtype=torch.int64))
    for k in P:
        assert torch.equal(P[k][stopped], frozen[k][stopped])
        assert not torch.equal(P[k][2], frozen[k][2])
    _, err = tr.evaluate(X, Y)
    assert (err[stopped] == 0).all()


def test_dropout_steps_equal_a_reference_with_the_same_masks():
    """SAM with dropout: both passes use the step's masks, drawn (R, B, width) per hidden layer."""
    arch = Arch("mlp", 5, 7, 2, 3, True)
    P = init_stack(arch, [torch.Generator().manual_seed(r) for r in range(R)], torch.float64)
    ref = {k: v.clone() for k, v in P.items()}
    X, Y = _data(3)
    zero = torch.zeros(R, dtype=torch.float64)
    p = torch.tensor([0.0, 0.5, 0.2, 0.7], dtype=torch.float64)
    tr = StackedTrainer(
        arch, P, X, Y, lr=LR, momentum=zero, weight_decay=zero, rho=RHO, dropout=p,
        optimizer="sam", generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    g = torch.Generator().manual_seed(5)
    idx = torch.arange(4).repeat(R, 1)
    for _ in range(3):
        tr.step(idx)
        masks = [torch.rand(R, 4, 7, generator=g, dtype=torch.float64) for _ in range(2)]
        for r in range(R):
            keep = 1.0 - float(p[r])
            ms = [(m[r] < keep).double() / keep for m in masks]

            def loss(w, r=r, ms=ms):
                h = X[r, :4]
                for i in range(3):
                    h = h @ w[f"weight{i}"].T + w[f"bias{i}"]
                    if i < 2:
                        h = torch.relu(h) * ms[i]
                return F.cross_entropy(h, Y[r, :4])

            w = {k: v[r].clone().requires_grad_() for k, v in ref.items()}
            grads = torch.autograd.grad(loss(w), list(w.values()))
            norm = torch.sqrt(sum(gr.square().sum() for gr in grads))
            w2 = {k: (v + RHO[r] * gr / norm).detach().requires_grad_()
                  for (k, v), gr in zip(w.items(), grads, strict=True)}  # fmt: skip
            grads2 = torch.autograd.grad(loss(w2), list(w2.values()))
            with torch.no_grad():
                for k, gr in zip(w, grads2, strict=True):
                    ref[k][r] -= LR[r] * gr
        for k in P:
            torch.testing.assert_close(P[k], ref[k], rtol=1e-12, atol=1e-13)


def test_a_model_trains_the_same_alone_and_in_a_stack():
    """Its data order comes from its own generator: the stack around it does not matter."""
    arch = Arch("mlp", 5, 6, 1, 3, True)
    X, Y = _data(3)

    def run(rows):
        P = init_stack(arch, [torch.Generator().manual_seed(r) for r in rows], torch.float64)
        tr = StackedTrainer(
            arch, P, X[rows], Y[rows], lr=LR[rows], momentum=MOM[rows], weight_decay=WD[rows],
            rho=RHO[rows], dropout=torch.zeros(len(rows), dtype=torch.float64), optimizer="sam",
        )  # fmt: skip
        order = [torch.Generator().manual_seed(100 + r) for r in rows]
        out = train_stack(tr, order, batch_size=5, metric="loss", threshold=0.0, max_steps=40)
        return P, out

    P_all, _ = run([0, 1, 2, 3])
    P_one, out = run([2])
    assert out.steps == 40 and out.stop_step.tolist() == [-1]
    for k in P_all:
        torch.testing.assert_close(P_all[k][2], P_one[k][0], rtol=1e-13, atol=1e-14)
