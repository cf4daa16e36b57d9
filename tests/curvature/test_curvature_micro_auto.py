"""``micro_batch_size="auto"``: the size chosen from the measured graph bytes and a budget.

The choice is checked against its formula from the measured per-sample bytes (which are
checked against graphs of other sizes), whole batches where everything fits (the values
then bitwise those of ``None``), the values under a tight budget against dense float64
truth and the whole batch, the BatchNorm refusal, bad values, and the caller's state.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpgen import block_traces, hessian_diagonal, hessian_trace, top_eigenvalues
from sharpgen.curvature import HessianOperator, ModelObjective
from sharpgen.curvature._auto_micro import (
    DEFAULT_RESERVE,
    DOUBLE_BACKWARD,
    _copy_slice,
    _graph_bytes,
    choose_micro_batch,
    micro_batch_budget,
)
from sharpgen.sharpness._eigen import WORK_VECTORS

DT = torch.float64
CLOSE = {"rtol": 1e-10, "atol": 1e-12}
N = 9


def _wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(DT)


def _vector_bytes(obj):
    return obj.numel * torch.empty((), dtype=obj.accum_dtype).element_size()


def _auto(model, loss, data, budget, reserve=DEFAULT_RESERVE, **kw):
    with micro_batch_budget(budget, reserve):
        return ModelObjective(model, loss, data, micro_batch_size="auto", **kw)


def _budget_for(obj, m, reserve):
    """The int budget whose formula gives micro-batches of ``m`` (midway to ``m + 1``)."""
    c = obj.micro_batch_choice
    return int(reserve * _vector_bytes(obj) + c.fixed_bytes
               + DOUBLE_BACKWARD * c.per_sample_bytes * (m + 0.5))  # fmt: skip


def test_the_measured_bytes_are_those_of_graphs_of_every_size(cv):
    model, (x, y) = _wide_mlp(), cv.regression_data(n=N)
    obj = _auto(model, F.mse_loss, (x, y), 10**12)
    c = obj.micro_batch_choice
    assert c.size is None and c.samples == N
    assert c.per_sample_bytes > 0 and c.fixed_bytes > 0
    # the gradient (one vector) does not grow with the samples: it is in f
    assert c.fixed_bytes >= _vector_bytes(obj)
    for m in (3, 5, N):  # the two-sample fit predicts the counted graph of any size
        counted = _graph_bytes(obj, _copy_slice(x, m, N), _copy_slice(y, m, N))
        assert counted == c.fixed_bytes + m * c.per_sample_bytes


def test_a_tight_int_budget_gives_the_size_of_the_formula(cv, state_check):
    model, batch = _wide_mlp(), cv.regression_data(n=N)
    check = state_check(model)
    c = _auto(model, F.mse_loss, batch, 10**12).micro_batch_choice
    v = _vector_bytes(ModelObjective(model, F.mse_loss, batch))
    for m in (1, 2, 4):
        budget = int(DEFAULT_RESERVE * v + c.fixed_bytes
                     + DOUBLE_BACKWARD * c.per_sample_bytes * (m + 0.5))  # fmt: skip
        expected = math.floor((budget - DEFAULT_RESERVE * v - c.fixed_bytes)
                              / (DOUBLE_BACKWARD * c.per_sample_bytes))  # fmt: skip
        assert expected == m
        sizes = {_auto(model, F.mse_loss, batch, budget).micro_batch_size for _ in range(3)}
        assert sizes == {m}  # deterministic for a given budget
        choice = _auto(model, F.mse_loss, batch, budget).micro_batch_choice
        assert (choice.budget, choice.reserve_bytes) == (budget, DEFAULT_RESERVE * v)
    # below one sample's graph: one sample at a time; no budget: whole batches, no probe
    assert _auto(model, F.mse_loss, batch, 1).micro_batch_size == 1
    unlimited = _auto(model, F.mse_loss, batch, None).micro_batch_choice
    assert unlimited.size is None and unlimited.per_sample_bytes == 0
    check()


def test_a_measure_chooses_within_its_memory_budget_and_reports_it(cv):
    model, batch = _wide_mlp(), cv.regression_data(n=N)
    probe = _auto(model, F.mse_loss, batch, 10**12, reserve=3)
    budget = _budget_for(probe, 2, reserve=3)  # hessian_trace keeps 3 vectors beside it
    est = hessian_trace(model, F.mse_loss, batch, method="exact", micro_batch_size="auto",
                        memory_budget=budget)  # fmt: skip
    plan = est.memory
    assert (plan.micro_batch_size, plan.micro_batch_auto, plan.budget) == (2, True, budget)
    c = probe.micro_batch_choice
    assert plan.graph_bytes == c.fixed_bytes + math.ceil(DOUBLE_BACKWARD * c.per_sample_bytes * 2)
    assert "micro-batch 2 (auto)" in repr(plan)
    dense = cv.dense_hessian(model, F.mse_loss, [batch])
    assert est.value == pytest.approx(float(torch.trace(dense)), rel=1e-10)
    # block traces keep 2 vectors beside the graph, top_eigenvalues its 2 working vectors
    blocks = block_traces(model, F.mse_loss, batch, method="exact", micro_batch_size="auto",
                          memory_budget=_budget_for(probe, 3, reserve=2))  # fmt: skip
    assert blocks.memory.micro_batch_size == 3
    assert blocks.total == pytest.approx(float(torch.trace(dense)), rel=1e-10)
    diag = hessian_diagonal(model, F.mse_loss, batch, method="exact", micro_batch_size="auto",
                            memory_budget=_budget_for(probe, 4, reserve=4))  # fmt: skip
    assert diag.memory.micro_batch_size == 4
    flat = torch.cat([t.reshape(-1) for t in diag.values.values()])
    torch.testing.assert_close(flat, torch.diagonal(dense), **CLOSE)


def test_everything_fits_whole_batches_and_nothing_changes(cv):
    model, batch = _wide_mlp(), cv.regression_data(n=N)
    for budget in ("auto", 10**12):
        obj = _auto(model, F.mse_loss, batch, budget)
        assert obj.micro_batch_size is None and obj.micro_batch_choice.size is None
    kw = {"method": "hutchinson", "num_matvecs": 6}
    a = hessian_trace(model, F.mse_loss, batch, generator=torch.Generator().manual_seed(0),
                      micro_batch_size="auto", **kw)  # fmt: skip
    b = hessian_trace(model, F.mse_loss, batch, generator=torch.Generator().manual_seed(0), **kw)
    assert a.value == b.value  # bitwise: the same objective, the same kept graph
    assert a.memory.micro_batch_size is None and a.memory.micro_batch_auto
    assert "whole batches (auto)" in repr(a.memory)
    assert "micro-batch" not in repr(b.memory) and "whole" not in repr(b.memory)
    g = torch.Generator().manual_seed(3)
    e1 = top_eigenvalues(model, F.mse_loss, batch, micro_batch_size="auto", generator=g)
    g = torch.Generator().manual_seed(3)
    e2 = top_eigenvalues(model, F.mse_loss, batch, generator=g)
    assert torch.equal(e1.eigenvalues, e2.eigenvalues) and e1.num_matvecs == e2.num_matvecs


def test_values_under_a_tight_budget_equal_the_whole_batch(cv, state_check):
    model, batch = _wide_mlp(), cv.regression_data(n=N)
    check = state_check(model)
    dense = cv.dense_hessian(model, F.mse_loss, [batch])
    probe = _auto(model, F.mse_loss, batch, 10**12, reserve=3)
    v = _vector_bytes(probe)
    # Hutchinson, one probe a block on both sides (the same draws): the budget leaves room
    # for one block beside the graph of 2 samples; the whole batch's budget the same block
    budget = _budget_for(probe, 2, reserve=3)
    kw = {"method": "hutchinson", "num_matvecs": 7}
    a = hessian_trace(model, F.mse_loss, batch, micro_batch_size="auto", memory_budget=budget,
                      generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    b = hessian_trace(model, F.mse_loss, batch, memory_budget=3 * v,
                      generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    assert a.memory.micro_batch_size == 2
    assert a.memory.block_width == b.memory.block_width == 1
    assert a.value == pytest.approx(b.value, rel=1e-10)
    # the top eigenvalue against the dense float64 truth
    w = WORK_VECTORS  # top_eigenvalues keeps its working vectors beside the graph
    top_budget = _budget_for(_auto(model, F.mse_loss, batch, 10**12, reserve=w), 3, reserve=w)
    g = torch.Generator().manual_seed(0)
    eig = top_eigenvalues(model, F.mse_loss, batch, micro_batch_size="auto", tol=1e-10,
                          memory_budget=top_budget, generator=g)  # fmt: skip
    assert eig.memory.micro_batch_size == 3
    assert float(eig.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]),
                                                      rel=1e-8)  # fmt: skip
    # and every product of the objective itself
    obj = _auto(model, F.mse_loss, batch, _budget_for(probe, 2, reserve=DEFAULT_RESERVE))
    assert obj.micro_batch_size == 2
    H = HessianOperator(obj)
    V = torch.randn(H.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(H @ V, dense @ V, **CLOSE)
    torch.testing.assert_close(obj.loss(), ModelObjective(model, F.mse_loss, batch).loss(), **CLOSE)
    check()


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(2, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x, z):
        return self.out(torch.tanh(self.a(x) + self.b(z)))


class _TokenModel(nn.Module):
    """A Hugging Face-like model: ``model(**batch)`` computes its own loss from ``labels``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.out = nn.Linear(6, 11)

    def forward(self, input_ids, labels):
        logits = self.out(torch.tanh(self.emb(input_ids)))
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())}


def test_tuple_and_dict_batches_are_counted_and_split_by_samples(cv):
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    two = _TwoInputs().to(DT)
    tup = ((torch.randn(N, 3, dtype=DT, generator=g), torch.randn(N, 2, dtype=DT, generator=g)),
           torch.randn(N, 2, dtype=DT, generator=g))  # fmt: skip
    ids = torch.randint(0, 11, (N, 5), generator=g)
    hf = {"input_ids": ids, "labels": torch.roll(ids, 1, dims=1)}
    token = _TokenModel().to(DT)
    for model, loss, data in ((two, F.mse_loss, tup), (token, None, hf)):
        probe = _auto(model, loss, data, 10**12)
        assert probe.micro_batch_choice.samples == N
        obj = _auto(model, loss, data, _budget_for(probe, 4, reserve=DEFAULT_RESERVE))
        assert obj.micro_batch_size == 4
        sizes = []

        def hook(_m, args, kwargs, sizes=sizes):
            sizes.append((args[0] if args else kwargs["input_ids"]).shape[0])

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            H = HessianOperator(obj)
            V = torch.randn(H.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(2))
            torch.testing.assert_close(H @ V, HessianOperator(model, loss, data) @ V, **CLOSE)
        finally:
            handle.remove()
        assert 4 in sizes and 1 in sizes and max(sizes) <= N  # 4 + 4 + 1, then the whole


def test_batch_statistics_are_refused_before_any_probe(cv):
    model, batch = cv.make_convbn(), cv.image_data(n=6)
    with pytest.raises(ValueError, match=r"micro_batch_size='auto' with bn='batch'.*bn='eval'"):
        ModelObjective(model, F.cross_entropy, batch, bn="batch", micro_batch_size="auto")
    with pytest.raises(ValueError, match=r"micro_batch_size='auto' with bn='batch'"):
        hessian_trace(model, F.cross_entropy, batch, bn="batch", micro_batch_size="auto")
    # running statistics: chosen and exact
    probe = _auto(model, F.cross_entropy, batch, 10**12, bn="eval")
    obj = _auto(model, F.cross_entropy, batch, _budget_for(probe, 2, DEFAULT_RESERVE))
    assert obj.micro_batch_size == 2
    dense = cv.dense_hessian(model, F.cross_entropy, [batch])
    torch.testing.assert_close(HessianOperator(obj).to_dense(), dense, **CLOSE)


@pytest.mark.parametrize("bad", ["autox", 0, -1, 1.5, True, "4"])
def test_a_bad_value_names_the_argument_the_value_and_the_fix(cv, bad):
    pattern = rf"micro_batch_size must be None .*'auto'.*got .*{bad!r}.*micro_batch_size='auto'"
    model, batch = cv.make_mlp(), cv.regression_data()
    with pytest.raises(ValueError, match=pattern.replace("(", r"\(").replace(".5", r"\.5")):
        ModelObjective(model, F.mse_loss, batch, micro_batch_size=bad)
    with pytest.raises(ValueError, match="micro_batch_size must be None"):
        hessian_trace(model, F.mse_loss, batch, micro_batch_size=bad)


def test_the_probe_leaves_the_caller_state_and_random_streams_alone(cv, state_check):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    batch = cv.regression_data(n=N)
    check = state_check(model)
    obj = ModelObjective(model, F.mse_loss, batch, dropout=True)  # draws: dropout is active
    rng = torch.get_rng_state()
    with micro_batch_budget(10**12, DEFAULT_RESERVE):
        choice = choose_micro_batch(obj)  # two forward passes with dropout
    assert torch.equal(torch.get_rng_state(), rng)
    assert choice.per_sample_bytes > 0
    check()
    assert model.training and all(torch.equal(p.grad, torch.ones_like(p))
                                  for p in model.parameters())  # fmt: skip


class _Pairs(nn.Module):
    """Pairs consecutive samples: a batch of one sample fails (RuntimeError of reshape)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(x.reshape(-1, 6)).repeat_interleave(2, 0)[:, :2]


def test_a_model_that_fails_on_the_probe_slices_gets_a_clear_error(cv):
    torch.manual_seed(0)
    model, batch = _Pairs().to(DT), cv.regression_data(n=6)
    ModelObjective(model, F.mse_loss, batch)  # whole batches work
    match = r"'auto' measures the gradient graph of the first 1 and 2 samples.*pass an int"
    with pytest.raises(ValueError, match=match):
        ModelObjective(model, F.mse_loss, batch, micro_batch_size="auto")


def test_chosen_micro_batches_keep_the_probe_block_within_block_bytes(monkeypatch):
    import sharpgen.curvature._auto_micro as auto

    torch.manual_seed(0)  # few parameters, large activations: room for many probes
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 1)).to(DT)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    batch = (
        torch.randn(N, 1, 16, 16, dtype=DT, generator=g),
        torch.randn(N, 1, dtype=DT, generator=g),
    )
    probe = _auto(model, F.mse_loss, batch, 10**12, reserve=3)
    v = _vector_bytes(probe)
    budget = _budget_for(probe, 2, reserve=3)

    def trace():
        return hessian_trace(model, F.mse_loss, batch, method="hutchinson", num_matvecs=8,
                             micro_batch_size="auto", memory_budget=budget,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip

    wide = trace().memory
    assert wide.micro_batch_size == 2 and wide.block_width == 8  # BLOCK_BYTES is 64 MiB
    monkeypatch.setattr(auto, "BLOCK_BYTES", 3 * 2 * v)
    narrow = trace().memory
    assert narrow.micro_batch_size == 2 and narrow.block_width == 3
