"""The lean single-vector product through kept graphs, and the gradient read off them."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import sharpgen.curvature._products as products
from sharpgen.curvature import HessianOperator

DT = torch.float64


def split(x, y, sizes=(4, 4, 3)):
    out, start = [], 0
    for s in sizes:  # an uneven last batch
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def case(cv, name):
    if name == "mlp one batch":
        return cv.make_mlp(), cv.regression_data(n=11), F.mse_loss
    if name == "mlp loader":
        return cv.make_mlp(), split(*cv.regression_data(n=11)), F.mse_loss
    return cv.make_convbn(), split(*cv.image_data(n=11)), F.cross_entropy


def batches_of(data):
    return [data] if isinstance(data, tuple) else data


def vec(n, seed=0):
    return torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["mlp one batch", "mlp loader", "convbn loader"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lean_path_gives_the_dense_product(cv, state_check, monkeypatch, name, reduction):
    model, data, loss = case(cv, name)
    if reduction == "sum":
        base = loss

        def loss(o, t):
            return base(o, t, reduction="sum")

    dense = cv.dense_hessian(model, loss, batches_of(data), reduction=reduction)
    check = state_check(model)
    H = HessianOperator(model, loss, data, backend="autograd", cache_graph=True,
                        reduction=reduction)  # fmt: skip
    first = H.matvec(vec(H.shape[0], 1))  # builds the graphs (block path)
    torch.testing.assert_close(first, dense @ vec(H.shape[0], 1), rtol=1e-8, atol=1e-10)
    lean = []
    real = products.kept_matvec
    monkeypatch.setattr(products, "block_product", None)  # any block pass would fail now
    monkeypatch.setattr("sharpgen.curvature._base.kept_matvec",
                        lambda *a: lean.append(1) or real(*a))  # fmt: skip
    for seed in range(3):
        v = vec(H.shape[0], seed)
        torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-8, atol=1e-10)
    assert len(lean) == 3 and H.num_matvecs == 4
    check()


def test_lean_path_notices_a_replaced_or_changed_buffer(cv):
    model, data, loss = case(cv, "convbn loader")
    counted = cv.CountingBatches(data)
    H = HessianOperator(model, loss, counted, backend="autograd", cache_graph=True)
    v = vec(H.shape[0])
    H.matvec(v)
    passes = counted.passes
    with torch.no_grad():
        model.bn.running_var.mul_(2.0)  # in place: a new version
    fresh = HessianOperator(model, loss, data, backend="autograd")
    torch.testing.assert_close(H.matvec(v), fresh.matvec(v), rtol=1e-10, atol=1e-12)
    assert counted.passes == passes + 1
    model.bn.running_mean = model.bn.running_mean + 0.25  # a new tensor object
    fresh = HessianOperator(model, loss, data, backend="autograd")
    torch.testing.assert_close(H.matvec(v), fresh.matvec(v), rtol=1e-10, atol=1e-12)
    assert counted.passes == passes + 2


def test_lean_path_checks_finiteness_and_input(cv):
    model, data, loss = case(cv, "mlp loader")
    H = HessianOperator(model, loss, data, backend="autograd", cache_graph=True)
    v = vec(H.shape[0])
    H.matvec(v)
    bad = v.clone()
    bad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        H.matvec(bad)
    with pytest.raises(TypeError, match="dtype"):
        H.matvec(v.float())
    with pytest.raises(ValueError, match="rows"):
        H.matvec(v[:-1])
    # a strided vector works like its contiguous copy
    wide = torch.stack([v, v], 1)
    torch.testing.assert_close(H.matvec(wide[:, 0]), H.matvec(v), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mlp one batch", "mlp loader", "convbn loader"])
def test_gradient_from_kept_graphs_is_the_gradient_at_no_extra_pass(cv, state_check, name):
    model, data, loss = case(cv, name)
    counted = cv.CountingBatches(batches_of(data))
    H = HessianOperator(model, loss, counted if name != "mlp one batch" else data,
                        backend="autograd", cache_graph=True)  # fmt: skip
    check = state_check(model)
    truth = H.flatten(H.objective.gradient())
    passes = counted.passes
    g = H.gradient()
    torch.testing.assert_close(g, truth, rtol=1e-12, atol=1e-14)
    H.matvec(vec(H.shape[0]))
    torch.testing.assert_close(H.gradient(), truth, rtol=1e-12, atol=1e-14)
    if name != "mlp one batch":
        assert counted.passes == passes + 1  # the gradient built the graphs the product used
    check()


def test_gradient_without_kept_graphs(cv, monkeypatch):
    model, data, loss = case(cv, "mlp loader")
    truth = HessianOperator(model, loss, data).flatten(
        HessianOperator(model, loss, data).objective.gradient()
    )
    monkeypatch.setattr(products, "GRAPH_CACHE_BYTES", 0)  # too large to keep
    H = HessianOperator(model, loss, data, backend="autograd", cache_graph=True)
    torch.testing.assert_close(H.gradient(), truth, rtol=1e-12, atol=1e-14)
    assert H.objective._graph_cache[1] == ()
    for options in ({"bn": "batch"}, {"backend": "func"}, {}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # no graphs kept: warned, tested elsewhere
            H = HessianOperator(model, loss, data, cache_graph=bool(options), **options)
        torch.testing.assert_close(H.gradient(), truth, rtol=1e-12, atol=1e-14)


class _ConstantShift(torch.nn.Module):
    """``tanh(lin(x)) + c``: under a mean loss the gradient of ``c`` is a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.c = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return torch.tanh(self.lin(x)) + self.c


def _mean_out(outputs, targets):
    return outputs.mean()


@pytest.mark.parametrize("name", ["unused parameter", "constant gradient"])
def test_lean_path_with_parameters_without_a_live_gradient(cv, name):
    # the flat product seeds zeros for them: their rows and columns of H are zero
    if name == "unused parameter":
        torch.manual_seed(0)
        model, loss = cv.FrozenUnused().to(DT), F.mse_loss
    else:
        torch.manual_seed(0)
        model, loss = _ConstantShift().to(DT), _mean_out
    data = cv.regression_data(n=7)
    dense = cv.dense_hessian(model, loss, [data])
    H = HessianOperator(model, loss, data, backend="autograd", cache_graph=True)
    H.matvec(vec(H.shape[0], 0))  # builds the graph
    for seed in range(2):
        v = vec(H.shape[0], seed)
        torch.testing.assert_close(H.matvec(v), dense @ v, rtol=1e-8, atol=1e-10)
    apply = H.objective._graph_cache[1][0][0]
    assert apply.flat is not None  # the flat path was taken
    assert len(apply.live) == len(H.params) - 1  # with one parameter without a live gradient


def test_lean_path_of_a_kernel_without_a_flat_product(cv):
    # the GGN's kept graphs take the per-parameter views; the block path is the reference
    from sharpgen.curvature import GGNOperator

    model, data = cv.make_mlp(), split(*cv.regression_data(n=11))
    G = GGNOperator(model, F.mse_loss, data, backend="autograd", cache_graph=True)
    v = vec(G.shape[0], 3)
    first = G.matvec(v)  # builds the graphs
    assert G.objective._graph_cache[1][0][0].flat is None
    torch.testing.assert_close(G.matvec(v), first, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G.matmat(v[:, None])[:, 0], first, rtol=1e-10, atol=1e-12)
