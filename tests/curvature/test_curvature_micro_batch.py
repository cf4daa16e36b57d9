"""Micro-batches inside every pass, and keeping or recomputing the gradient graphs.

Every value with ``micro_batch_size`` equals the whole batch's (float64, dense truth or the
unsplit objective), for both reductions, an uneven last micro-batch, several batches and
dict inputs; the model only ever sees micro-batches; BatchNorm on batch statistics is
refused; ``graphs`` decides what is kept between products without changing a product.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpgen import block_traces, hessian_trace, sam_sharpness, top_eigenvalues
from sharpgen.curvature import GGNOperator, HessianOperator, ModelObjective

DT = torch.float64
CLOSE = {"rtol": 1e-10, "atol": 1e-12}


def _sum_mse(outputs, targets):
    return F.mse_loss(outputs, targets, reduction="sum")


def _seen_sizes(model):
    sizes = []

    def hook(_module, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        sizes.append(first.shape[0])

    return sizes, model.register_forward_pre_hook(hook, with_kwargs=True)


def _block(n, k=3, seed=0):
    return torch.randn(n, k, dtype=DT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize(("reduction", "loss"), [("mean", F.mse_loss), ("sum", _sum_mse)])
def test_every_quantity_of_one_batch_equals_the_unsplit_one(cv, state_check, backend,
                                                            reduction, loss):  # fmt: skip
    model, batch = cv.make_mlp(), cv.regression_data(n=7)
    check = state_check(model)
    kw = {"reduction": reduction, "backend": backend}
    whole = ModelObjective(model, loss, batch, **kw)
    split = ModelObjective(model, loss, batch, micro_batch_size=3, **kw)  # 3 + 3 + 1
    torch.testing.assert_close(split.loss(), whole.loss(), **CLOSE)
    lw, gw = whole.loss_and_gradient()
    ls, gs = split.loss_and_gradient()
    torch.testing.assert_close(ls, lw, **CLOSE)
    torch.testing.assert_close(gs, gw, **CLOSE)
    H, G = HessianOperator(split), GGNOperator(split)
    dense = cv.dense_hessian(model, loss, [batch], reduction=reduction)
    V = _block(H.shape[0])
    torch.testing.assert_close(H @ V, dense @ V, **CLOSE)
    torch.testing.assert_close(H.to_dense(), dense, **CLOSE)
    torch.testing.assert_close(G @ V, GGNOperator(whole) @ V, **CLOSE)
    torch.testing.assert_close(H.gradient(), HessianOperator(whole).gradient(), **CLOSE)
    blocks = {n: torch.ones(2, *t.shape, dtype=DT) for n, t in split.params.items()}
    for a, b in [(split.hvp(blocks), whole.hvp(blocks)), (split.ggn_vp(blocks),
                                                          whole.ggn_vp(blocks))]:  # fmt: skip
        torch.testing.assert_close(a, b, **CLOSE)
    assert split.num_samples == 7
    check()


def test_the_model_sees_only_micro_batches(cv):
    model, batch = cv.make_mlp(), cv.regression_data(n=7)
    obj = ModelObjective(model, F.mse_loss, batch, micro_batch_size=3)
    sizes, handle = _seen_sizes(model)
    obj.loss_and_gradient()
    HessianOperator(obj, cache_graph=True) @ _block(obj.numel, 1)[:, 0]
    handle.remove()
    assert sizes[:3] == [3, 3, 1] and set(sizes) == {1, 3}  # each pass: 3 + 3 + 1


def test_several_batches_split_unevenly(cv):
    model = cv.make_mlp()
    batches = [cv.regression_data(n=5, seed=1), cv.regression_data(n=4, seed=2)]
    dense = cv.dense_hessian(model, F.mse_loss, batches)
    for m in (1, 2, 4, 9):
        H = HessianOperator(model, F.mse_loss, batches, micro_batch_size=m)
        torch.testing.assert_close(H.to_dense(), dense, **CLOSE)
        whole = ModelObjective(model, F.mse_loss, batches)
        torch.testing.assert_close(H.objective.loss(), whole.loss(), **CLOSE)


class _TokenModel(nn.Module):
    """A Hugging Face-like call: ``model(input_ids=..., mask=..., bias=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.out = nn.Linear(4, 11)

    def forward(self, input_ids, mask, bias):
        h = torch.tanh(self.emb(input_ids) + bias) * mask[..., None]
        return self.out(h)


def _token_loss(outputs, targets):
    return F.cross_entropy(outputs.flatten(0, 1), targets.flatten())


def test_dict_inputs_with_a_broadcast_entry_are_split_by_samples(state_check):
    torch.manual_seed(0)
    model = _TokenModel().to(DT)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (5, 6), generator=g)
    inputs = {
        "input_ids": ids,
        "mask": torch.ones(5, 6, dtype=DT),
        "bias": torch.randn(1, 6, 4, dtype=DT, generator=g),  # broadcast: goes whole
    }
    batch = (inputs, torch.randint(0, 11, (5, 6), generator=g))
    check = state_check(model)
    whole = HessianOperator(model, _token_loss, batch)
    split = HessianOperator(model, _token_loss, batch, micro_batch_size=2)
    V = _block(whole.shape[0], 2)
    torch.testing.assert_close(split @ V, whole @ V, **CLOSE)
    torch.testing.assert_close(split.loss(), whole.loss(), **CLOSE)
    check()


def test_measures_take_the_option(cv):
    model, batch = cv.make_mlp(), cv.regression_data(n=7)
    dense = cv.dense_hessian(model, F.mse_loss, [batch])
    eig = top_eigenvalues(model, F.mse_loss, batch, micro_batch_size=2, tol=1e-10,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert float(eig.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]),
                                                      rel=1e-8)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    a = hessian_trace(model, F.mse_loss, batch, micro_batch_size=2, num_matvecs=6, generator=g)
    g = torch.Generator().manual_seed(0)
    b = hessian_trace(model, F.mse_loss, batch, num_matvecs=6, generator=g)
    assert a.value == pytest.approx(b.value, rel=1e-10)
    s1 = sam_sharpness(model, F.mse_loss, batch, rho=0.05, micro_batch_size=3)
    s2 = sam_sharpness(model, F.mse_loss, batch, rho=0.05)
    assert s1.value == pytest.approx(s2.value, rel=1e-9)
    t1 = block_traces(model, F.mse_loss, batch, micro_batch_size=3, method="exact")
    t2 = block_traces(model, F.mse_loss, batch, method="exact")
    assert t1.total == pytest.approx(t2.total, rel=1e-10)


def test_batch_statistics_are_refused_running_statistics_are_exact(cv):
    model, batch = cv.make_convbn(), cv.image_data(n=6)
    with pytest.raises(ValueError, match=r"micro_batch_size=2 with bn='batch'.*bn='eval'"):
        ModelObjective(model, F.cross_entropy, batch, bn="batch", micro_batch_size=2)
    ModelObjective(cv.make_mlp(), F.mse_loss, cv.regression_data(), bn="batch",
                   micro_batch_size=2)  # fmt: skip  # no BatchNorm: nothing changes
    H = HessianOperator(model, F.cross_entropy, batch, micro_batch_size=4)  # bn="eval"
    dense = cv.dense_hessian(model, F.cross_entropy, [batch])
    torch.testing.assert_close(H.to_dense(), dense, **CLOSE)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_a_bad_micro_batch_size_is_refused(cv, bad):
    with pytest.raises((TypeError, ValueError), match="micro_batch_size"):
        ModelObjective(cv.make_mlp(), F.mse_loss, cv.regression_data(), micro_batch_size=bad)


@pytest.mark.parametrize("bad", ["always", None, True])
def test_a_bad_graphs_option_is_refused(cv, bad):
    with pytest.raises(ValueError, match="graphs must be one of"):
        ModelObjective(cv.make_mlp(), F.mse_loss, cv.regression_data(), graphs=bad)


@pytest.mark.parametrize(
    ("graphs", "micro", "kept"),
    [
        ("auto", None, 1),  # today's default: the batch's graph is kept
        ("recompute", None, 0),
        ("auto", 3, 0),  # micro-batches are recomputed unless asked
        ("keep", 3, 3),  # 3 + 3 + 1: one graph per micro-batch
        ("recompute", 3, 0),
    ],
)
def test_graphs_decides_what_is_kept_and_not_the_products(cv, graphs, micro, kept):
    model, batch = cv.make_mlp(), cv.regression_data(n=7)
    dense = cv.dense_hessian(model, F.mse_loss, [batch])
    obj = ModelObjective(model, F.mse_loss, batch, graphs=graphs, micro_batch_size=micro)
    H = HessianOperator(obj, backend="autograd", cache_graph=True)
    sizes, handle = _seen_sizes(model)
    for seed in range(3):
        v = _block(H.shape[0], 1, seed)[:, 0]
        torch.testing.assert_close(H @ v, dense @ v, **CLOSE)
    handle.remove()
    store = obj._graph_cache[1] if obj._graph_cache is not None else []
    assert len(store) == kept
    passes = 1 if kept else 3  # a kept graph: no forward pass after the first product
    assert len(sizes) == passes * (1 if micro is None else 3)


def test_a_measure_owned_objective_shares_the_parameters_a_held_one_copies(cv, monkeypatch):
    import sharpgen.sharpness._common as common

    model, batch = cv.make_mlp(), cv.regression_data(n=7)
    built = []
    real = common.ModelObjective

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(common, "ModelObjective", recording)
    top_eigenvalues(model, F.mse_loss, batch, generator=torch.Generator().manual_seed(0))
    (obj,) = built
    named = dict(model.named_parameters())
    assert all(t.data_ptr() == named[n].data_ptr() for n, t in obj.params.items())
    held = ModelObjective(model, F.mse_loss, batch)
    assert all(t.data_ptr() != named[n].data_ptr() for n, t in held.params.items())


def test_large_parameter_sets_take_single_vectors_through_views(cv, monkeypatch):
    import sharpgen.curvature._kernels as kernels

    monkeypatch.setattr(kernels, "FLAT_GRADIENT_BYTES", 0)  # no concatenated gradient
    model, batch = cv.make_mlp(), cv.regression_data(n=7)
    dense = cv.dense_hessian(model, F.mse_loss, [batch])
    H = HessianOperator(model, F.mse_loss, batch, backend="autograd", cache_graph=True)
    for seed in range(2):
        v = _block(H.shape[0], 1, seed)[:, 0]
        torch.testing.assert_close(H.matvec(v), dense @ v, **CLOSE)
    assert H.objective._graph_cache[1][0][0].flat is None
