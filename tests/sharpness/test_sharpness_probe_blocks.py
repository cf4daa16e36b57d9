"""Probe blocks under the memory plan: the block rule, streamed estimates, unchanged values."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import Tensor

from sharpgen import (
    block_traces,
    hessian_diagonal,
    hessian_trace,
    hutchinson_diagonal,
    hutchinson_trace,
    plan_memory,
)
from sharpgen.curvature._plan import BLOCK_BYTES, BLOCK_SHARE, probe_block
from sharpgen.linalg import LinearOperator, trace
from sharpgen.linalg._probes import draw_probes
from sharpgen.sharpness._block_traces import probe_sums

CPU = torch.device("cpu")
DT = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_probes(n: int, m: int, block: int, seed: int) -> Tensor:
    """The probes as before the plan: ``torch.randint`` blocks of ``block`` columns."""
    g = _g(seed)
    cols = [torch.randint(0, 2, (n, min(block, m - i)), generator=g) for i in range(0, m, block)]
    return torch.cat(cols, 1).to(DT).mul(2).sub(1)


def _live(n: int) -> dict[int, int]:
    """``id -> k`` of every live ``(n, k)`` tensor (``k != n``)."""
    return {id(t): t.shape[1] for t in gc.get_objects() if issubclass(type(t), Tensor)
            and t.ndim == 2 and t.shape[0] == n and t.shape[1] != n}  # fmt: skip


_BEFORE: dict[int, list[Tensor]] = {}


def _baseline(n: int) -> None:
    """Hold the ``(n, k)`` tensors alive before the call (other tests' module data; held, so
    that no new tensor takes one of their ids)."""
    gc.collect()
    ids = _live(n)
    _BEFORE[n] = [t for t in gc.get_objects() if issubclass(type(t), Tensor) and id(t) in ids]


def _widest(n: int) -> int:
    """Most columns of an ``(n, k)`` tensor made since `_baseline`: probes or products kept."""
    before = {id(t) for t in _BEFORE.get(n, [])}
    return max((k for i, k in _live(n).items() if i not in before), default=0)


class _Watch(LinearOperator):
    """A dense operator that records every block's width and the widest live block."""

    def __init__(self, A: Tensor) -> None:
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.widths, self.widest = A, [], 0
        _baseline(A.shape[0])  # other tests' (n, k) tensors are not counted

    def _matmat(self, V: Tensor) -> Tensor:
        self.widths.append(V.shape[1])
        self.widest = max(self.widest, _widest(self.A.shape[0]))
        return self.A @ V


# -- the rule ---------------------------------------------------------------------------------
def test_the_block_does_not_grow_with_free_memory_on_a_large_model():
    gpt2 = 124_000_000  # GPT-2 small: 0.5 GB a float32 vector
    for budget in (2**30, 2**36, None):  # tight, 64 GiB free, no limit
        plan = plan_memory("hessian_trace", numel=gpt2, dtype=torch.float32, device=CPU,
                           memory_budget=budget, work_vectors=1, block_width=32)  # fmt: skip
        assert plan.block_width == 1
    # a small model keeps the block it asked for, whatever the budget
    small = plan_memory("hessian_trace", numel=10_000, dtype=torch.float32, device=CPU,
                        memory_budget=2**36, work_vectors=1, block_width=32)  # fmt: skip
    assert small.block_width == 32 and small.planned_bytes == (1 + 64) * 40_000


def test_the_block_rule_in_numbers():
    v = 4 * 10**6  # 1M float32 parameters
    assert probe_block(32, v, 0, 1, None) == BLOCK_BYTES // (2 * v) == 8
    # an estimated graph lets the block take its share of it
    graph = 40 * v
    assert probe_block(32, v, graph, 1, None) == int(BLOCK_SHARE * graph) // (2 * v) == 10
    # and the budget left after the graph and the working vectors narrows it further
    assert probe_block(32, v, graph, 1, graph + 7 * v) == 3
    assert probe_block(32, v, graph, 1, 1) == 1  # never below one probe
    assert probe_block(5, v, 0, 1, None) == 5  # never above what was asked


# -- the probes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_probes_are_the_numbers_of_randint(dtype):
    got = draw_probes(1001, 7, distribution="rademacher", generator=_g(3), dtype=dtype,
                      device=CPU)  # fmt: skip
    want = torch.randint(0, 2, (1001, 7), generator=_g(3)).to(dtype).mul(2).sub(1)
    assert torch.equal(got, want)
    state = torch.get_rng_state()
    torch.manual_seed(5)
    got = draw_probes(33, 2, distribution="rademacher", generator=None, dtype=dtype, device=CPU)
    torch.manual_seed(5)
    assert torch.equal(got, torch.randint(0, 2, (33, 2)).to(dtype).mul(2).sub(1))
    torch.set_rng_state(state)


# -- streamed estimates: the values of the same probes, one block alive ------------------------
@pytest.mark.parametrize("block", [1, 3, 16])
def test_hutchinson_streams_blocks_with_the_values_of_its_probes(block):
    n, m = 41, 10
    A = torch.randn(n, n, dtype=DT, generator=_g(0))
    A = A + A.T
    op = _Watch(A)
    est = hutchinson_trace(op, num_matvecs=m, block_size=block, generator=_g(1))
    Z = _reference_probes(n, m, block, 1)
    AZ = A @ Z
    quad = (Z * AZ).sum(0)
    torch.testing.assert_close(est.samples, quad, rtol=1e-13, atol=1e-12)
    assert est.value == pytest.approx(float(quad.mean()), rel=1e-13)
    assert est.frobenius_sq == pytest.approx(float((AZ * AZ).sum(0).mean()), rel=1e-13)
    assert op.widths == [min(block, m - i) for i in range(0, m, block)]
    assert op.widest == max(op.widths)  # no (n, m) block of probes or products alive


def test_probe_sums_are_the_pieces_of_the_same_probes():
    n, m = 31, 9
    A = torch.randn(n, n, dtype=DT, generator=_g(2))
    A = A @ A.T
    sizes = [4, 21, 6]
    for block in (1, 4, 9):
        op = _Watch(A)
        S = probe_sums(op, sizes, num_probes=m, block=block, generator=_g(7))
        Z = _reference_probes(n, m, block, 7)
        prod = Z * (A @ Z)
        want = torch.stack([piece.sum(0) for piece in prod.split(sizes)])
        torch.testing.assert_close(S, want, rtol=1e-13, atol=1e-12)
        assert max(op.widths) == op.widest == block
        # the pieces add up to Hutchinson's samples with the same probes
        ref = hutchinson_trace(A, num_matvecs=m, block_size=block, generator=_g(7))
        torch.testing.assert_close(S.sum(0), ref.samples, rtol=1e-12, atol=1e-12)
        del Z, prod  # (n, m): not to be seen by the next round's watch


def _slices(model):
    out, start = {}, 0
    for n, p in model.named_parameters():
        out[n] = slice(start, start + p.numel())
        start += p.numel()
    return out


def test_block_traces_streamed_against_dense_truth_and_the_same_probes(h, state_check):
    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    H = h.dense_hessian(model, h.mse, x, y)
    n, m = H.shape[0], 24
    check = state_check(model)
    rng = torch.get_rng_state()
    wide = block_traces(model, h.mse, (x, y), blocks="parameter", method="hutchinson",
                        num_matvecs=m, generator=_g(4))  # fmt: skip
    narrow = block_traces(model, h.mse, (x, y), blocks="parameter", method="hutchinson",
                          num_matvecs=m, generator=_g(4), memory_budget=1)  # fmt: skip
    check()
    assert torch.equal(torch.get_rng_state(), rng)
    assert wide.memory.block_width == m and narrow.memory.block_width == 1
    sl = _slices(model)
    for res, block in ((wide, m), (narrow, 1)):
        # all m probes in one block are the old single (p, m) draw: the same numbers as before
        Z = _reference_probes(n, m, block, 4)
        prod = Z * (H @ Z)
        for name, s in sl.items():
            assert res.traces[name] == pytest.approx(float(prod[s].sum(0).mean()), rel=1e-10)
            se = float(prod[s].sum(0).std() / m**0.5)
            assert res.stderr[name] == pytest.approx(se, rel=1e-8)
        ref = hutchinson_trace(H, num_matvecs=m, block_size=block, generator=_g(4))
        assert res.total == pytest.approx(ref.value, rel=1e-10)
        assert res.total_stderr == pytest.approx(ref.stderr, rel=1e-8)


def test_block_traces_exact_follows_the_plan(h):
    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    H = h.dense_hessian(model, h.mse, x, y)
    res = block_traces(model, h.mse, (x, y), memory_budget=1)
    assert res.method == "exact" and res.memory.block_width == 1
    assert res.total == pytest.approx(float(H.trace()), rel=1e-10)
    with pytest.raises(ValueError, match="memory_budget must be"):
        block_traces(model, h.mse, (x, y), memory_budget="plenty")


def _graph(model, loss_fn, data) -> int:
    """The bytes of the kept gradient graph of ``data``, counted as it is built."""
    from sharpgen.curvature import ModelObjective
    from sharpgen.curvature._kernels import HESSIAN
    from sharpgen.curvature._products import build_kept

    return build_kept(ModelObjective(model, loss_fn, data), HESSIAN, "autograd") or 0


@pytest.mark.parametrize("measure", ["trace", "blocks"])
def test_the_trace_plans_count_the_graph_on_the_cpu(h, measure):
    # the whole batch's graph is kept from the first product on: built and counted first
    model = h.make_mlp(0)
    data = h.regression_data(12)
    graph = _graph(model, h.mse, data)
    if measure == "trace":
        est = hessian_trace(model, h.mse, data, method="hutchinson", num_matvecs=4,
                            generator=_g(1))  # fmt: skip
    else:
        est = block_traces(model, h.mse, data, method="hutchinson", num_matvecs=4,
                           generator=_g(1))  # fmt: skip
    assert est.memory.graph_bytes == graph > 0
    largest = max(t.numel() for t in model.parameters()) * 8
    p = sum(t.numel() for t in model.parameters())
    assert est.memory.product_bytes == largest + graph - 8 * p > largest  # P, as top-1's
    assert est.memory.planned_bytes >= graph + est.memory.product_bytes + est.memory.vector_bytes


def test_one_column_through_a_kept_graph_takes_the_matvec_path(h, monkeypatch):
    # a block of one probe (the trace on a large model) is matvec's product, not a block's
    import sharpgen.curvature._base as base
    from sharpgen.curvature import HessianOperator

    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    dense = h.dense_hessian(model, h.mse, x, y)
    H = HessianOperator(model, h.mse, (x, y))
    V = torch.randn(dense.shape[0], 3, dtype=DT, generator=_g(2))
    torch.testing.assert_close(H.matmat(V), dense @ V, rtol=1e-12, atol=1e-12)  # builds
    blocks: list[int] = []
    real = base.product

    def spy(obj, kernel, V, *args, **kwargs):
        blocks.append(next(iter(V.values())).shape[0])
        return real(obj, kernel, V, *args, **kwargs)

    monkeypatch.setattr(base, "product", spy)
    for j in range(3):
        out = H.matmat(V[:, j : j + 1])
        torch.testing.assert_close(out, dense @ V[:, j : j + 1], rtol=1e-12, atol=1e-12)
        assert torch.equal(out[:, 0], H.matvec(V[:, j]))  # the same numbers as matvec
    H.matmat(V[:, :2])
    assert blocks == [2]  # only the block of two went through the block product


def test_hessian_trace_keeps_one_block_alive(h, monkeypatch):
    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    H = h.dense_hessian(model, h.mse, x, y)
    n = H.shape[0]
    seen = []
    from sharpgen.curvature import HessianOperator

    inner = HessianOperator._matmat

    def watch(self, V):
        seen.append(V.shape[1])
        assert _widest(n) <= 10  # one block of probes alive, not all 40 probes' (n, 40)
        return inner(self, V)

    monkeypatch.setattr(HessianOperator, "_matmat", watch)
    graph = _graph(model, h.mse, (x, y))  # counted before the plan, on the CPU too
    _baseline(n)  # other tests' (n, k) tensors are not counted
    est = hessian_trace(model, h.mse, (x, y), method="hutchinson", num_matvecs=40,
                        generator=_g(5), memory_budget=graph + (1 + 2 * 10) * n * 8)  # fmt: skip
    assert est.memory.graph_bytes == graph
    assert est.memory.block_width == 10 and seen == [10, 10, 10, 10]
    ref = hutchinson_trace(H, num_matvecs=40, block_size=10, generator=_g(5))
    assert est.value == pytest.approx(ref.value, rel=1e-10)


@pytest.mark.parametrize("block", [1, 4, 30])
def test_hutchinson_diagonal_streams_blocks_with_the_values_of_its_probes(block):
    n, m = 27, 12
    A = torch.randn(n, n, dtype=DT, generator=_g(8))
    A = A + A.T
    op = _Watch(A)
    est = hutchinson_diagonal(op, num_matvecs=m, block_size=block, generator=_g(9))
    Z = _reference_probes(n, m, block, 9)
    S = Z * (A @ Z)
    torch.testing.assert_close(est.values, S.mean(1), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(est.stderr, S.std(1) / m**0.5, rtol=1e-10, atol=1e-13)
    assert op.widths == [min(block, m - i) for i in range(0, m, block)]
    assert op.widest == min(block, m)


def test_hessian_diagonal_follows_the_plan(h, state_check):
    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    H = h.dense_hessian(model, h.mse, x, y)
    check = state_check(model)
    flat = {}
    for budget, block in (("auto", 40), (1, 1)):
        d = hessian_diagonal(model, h.mse, (x, y), method="hutchinson", num_matvecs=40,
                             generator=_g(3), memory_budget=budget)  # fmt: skip
        assert d.memory.block_width == block
        ref = hutchinson_diagonal(H, num_matvecs=40, block_size=block, generator=_g(3))
        flat[budget] = torch.cat([t.reshape(-1) for t in d.values.values()])
        torch.testing.assert_close(flat[budget], ref.values, rtol=1e-10, atol=1e-12)
    check()
    exact = hessian_diagonal(model, h.mse, (x, y), memory_budget=1)
    assert exact.method == "exact" and exact.memory.block_width == 1
    got = torch.cat([t.reshape(-1) for t in exact.values.values()])
    torch.testing.assert_close(got, H.diagonal(), rtol=1e-10, atol=1e-12)


def test_auto_trace_streams_hutchinson_where_the_adaptive_sketch_does_not_fit(h):
    model = h.make_mlp(0)
    x, y = h.regression_data(12)
    H = h.dense_hessian(model, h.mse, x, y)
    v = H.shape[0] * 8
    # rtol: the adaptive pilot holds 16 probes and their products, 32 vectors
    free = hessian_trace(model, h.mse, (x, y), exact_threshold=0, rtol=0.05, generator=_g(6),
                         memory_budget=None)  # fmt: skip
    want = trace(H, method="adaptive", rtol=0.05, generator=_g(6))
    assert free.value == pytest.approx(want.value, rel=1e-10) and free.method == want.method
    tight = hessian_trace(model, h.mse, (x, y), exact_threshold=0, rtol=0.05, generator=_g(6),
                          memory_budget=20 * v)  # fmt: skip
    ref = hutchinson_trace(H, rtol=0.05, block_size=tight.memory.block_width, generator=_g(6))
    assert tight.method == "hutchinson" and tight.value == pytest.approx(ref.value, rel=1e-10)
    assert abs(tight.value - float(H.trace())) < 5 * tight.stderr
    # a fixed budget of m products: a sketch of m // 3 probes and their products
    fixed = hessian_trace(model, h.mse, (x, y), exact_threshold=0, num_matvecs=30,
                          generator=_g(6), memory_budget=10 * v)  # fmt: skip
    ref = hutchinson_trace(H, num_matvecs=30, block_size=fixed.memory.block_width,
                           generator=_g(6))  # fmt: skip
    assert fixed.method == "hutchinson" and fixed.value == pytest.approx(ref.value, rel=1e-10)
