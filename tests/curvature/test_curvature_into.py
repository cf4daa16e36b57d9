"""The product written into one buffer part by part (`sharpgen.curvature._into`): the same
numbers as the dense Hessian, autograd left nothing to sum for the parameters, other passes
through the same graph unchanged, and the peak it holds within the memory plan."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import sharpgen.curvature._kernels as kernels
from sharpgen.curvature import HessianOperator
from sharpgen.curvature._plan import plan_memory, product_transient
from sharpgen.linalg._basis import CHUNK
from sharpgen.sharpness import top_eigenvalues

DT = torch.float64


class TiedLM(nn.Module):
    """An embedding whose transpose is also the output layer (as GPT-2's): four parts."""

    def __init__(self, vocab: int = 30, dim: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.emb(ids))) @ self.emb.weight.t()


def _lm(vocab: int = 30, dim: int = 3, tokens: int = 6):
    torch.manual_seed(0)
    model = TiedLM(vocab, dim).to(DT)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, tokens), generator=g)
    targets = torch.randint(0, vocab, (2, tokens), generator=g)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return model, loss_fn, (ids, targets)


def _dense(model, loss_fn, data):
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]

    def loss_of(vec):
        pieces = dict(zip(names, torch.split(vec, sizes), strict=True))
        p = {n: pieces[n].reshape(params[n].shape) for n in names}
        return loss_fn(torch.func.functional_call(model, p, (data[0],)), data[1])

    return torch.func.hessian(loss_of)(torch.cat([params[n].detach().reshape(-1) for n in names]))


def _accumulators(outputs):
    """The AccumulateGrad nodes of the graph behind ``outputs`` (one per leaf)."""
    found, seen, stack = [], set(), [g.grad_fn for g in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.append(node)
        stack.extend(f for f, _ in node.next_functions)
    return found


def test_the_parts_go_into_the_result_and_autograd_sums_none(monkeypatch, state_check):
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)  # the path of large models
    model, loss_fn, data = _lm()
    check = state_check(model)
    dense = _dense(model, loss_fn, data)
    H = HessianOperator(model, loss_fn, data)
    H.gradient()  # builds the kept graph
    apply = H.objective._graph_cache[1][0][0]
    # what reaches the parameters' accumulators: with every part added by a hook, nothing
    reached: list[int] = []
    accumulators = _accumulators(apply._outputs)
    leaves = [node.variable for node in accumulators]
    assert len(leaves) == len(apply.p)
    for i, node in enumerate(accumulators):
        node.register_prehook(lambda g, i=i: reached.append(i) if g[0] is not None else None)
    for seed in range(3):
        v = torch.randn(dense.shape[0], dtype=DT, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-12, atol=1e-12)
    assert reached == []
    assert all(t.grad is None for t in leaves)
    # a block product through the same graph (torch.autograd.grad): the hooks stay idle
    V = torch.randn(dense.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(H.matmat(V), dense @ V, rtol=1e-12, atol=1e-12)
    check()


def _peak_allocated(fn) -> int:
    """The highest sum of live tensor bytes allocated inside ``fn`` (``torch.profiler``)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")  # fmt: skip
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_one_product_holds_one_part_of_the_embedding_at_a_time(monkeypatch):
    # a large vocabulary: the embedding is most of the parameters, as on GPT-2
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)
    model, loss_fn, data = _lm(vocab=2000, dim=64, tokens=4)
    H = HessianOperator(model, loss_fn, data)
    H.gradient()
    v = torch.randn(H.shape[0], dtype=DT)
    H.matvec(v)  # the hooks are registered at the first product
    emb = model.emb.weight.numel() * 8
    peak = _peak_allocated(lambda: H.matvec(v))
    # the result, one part of the embedding and small activations (1.14 x emb above the
    # result); autograd's sum of the parts held two parts and their sum at once (3.05 x)
    assert peak - 8 * H.shape[0] < 1.5 * emb


def test_the_plan_counts_the_product_and_bounds_the_call(monkeypatch):
    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)
    model, loss_fn, data = _lm(vocab=2000, dim=64, tokens=4)
    p = sum(t.numel() for t in model.parameters())
    out: list = []
    peak = _peak_allocated(lambda: out.append(top_eigenvalues(
        model, loss_fn, data, k=1, max_iter=4, generator=torch.Generator().manual_seed(0),
        basis_storage="disk")))  # fmt: skip
    plan = out[0].memory
    emb = model.emb.weight.numel() * 8
    assert plan.product_bytes == emb + plan.graph_bytes - 8 * p > emb
    assert plan.planned_bytes == plan.graph_bytes + plan.product_bytes + 3 * 8 * p
    # the tensors the call held at its peak (the model and data before it not counted),
    # beside the one read buffer of the basis file (a chunk, 32 MiB in float64)
    assert peak <= plan.planned_bytes + 8 * CHUNK
    assert peak > plan.planned_bytes - plan.product_bytes - 8 * p  # the formula is tight


def test_the_planned_bytes_add_the_product():
    v = 4 * 10**6
    plan = plan_memory("m", numel=10**6, dtype=torch.float32, device=torch.device("cpu"),
                       memory_budget=100 * v, graph_bytes=5 * v, product_bytes=2 * v,
                       work_vectors=3, k=1, basis_storage="disk")  # fmt: skip
    assert plan.planned_bytes == (5 + 2 + 3) * v and plan.product_bytes == 2 * v
    assert "product 0.01 GiB" in repr(plan)
    params = [torch.zeros(3, 4), torch.zeros(20), torch.zeros(5)]
    assert product_transient(1000, 300, params) == 80 + 700
    assert product_transient(100, 300, params) == 80  # a graph that is all gradient
