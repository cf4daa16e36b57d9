"""Attention models: exact curvature through the math path, the caller's SDPA settings kept."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sharpgen import (
    GGNOperator,
    HessianOperator,
    ModelObjective,
    SharpnessTracker,
    block_traces,
    hessian_trace,
    loss_landscape_1d,
    sam_sharpness,
    top_eigenvalues,
    twice_differentiable_attention,
)
from sharpgen.curvature._attention import sdpa_settings

DT = torch.float64


class MHA(nn.Module):
    """Self-attention through SDPA (``need_weights=False``), mean-pooled, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class Encoder(nn.Module):
    """One `nn.TransformerEncoderLayer` (SDPA inside, fast path when no grad), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def _model(cls):
    torch.manual_seed(0)
    return cls().to(DT)


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 4, dtype=DT, generator=g), torch.randn(3, 1, dtype=DT, generator=g)


mse = nn.functional.mse_loss


@contextlib.contextmanager
def _math():
    """torch's own math path for the dense truth (fast path off: it lacks forward mode)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _flat_fn(model, x, outputs=False):
    ref = copy.deepcopy(model).eval()
    named = dict(ref.named_parameters())
    names, shapes = list(named), [t.shape for t in named.values()]
    sizes = [t.numel() for t in named.values()]

    def f(vec):
        p = {n: t.reshape(s) for n, t, s in zip(names, vec.split(sizes), shapes, strict=True)}
        return torch.func.functional_call(ref, p, (x,))

    return f, torch.cat([t.detach().reshape(-1) for t in named.values()])


def dense_hessian(model, data):
    # double backward, row by row: on the encoder layer torch.func.hessian (and jacrev of
    # jacrev) gets the rows of norm1.weight wrong in torch 2.13, while every Hessian-vector
    # product (and a finite difference of the gradient) agrees with this
    x, y = data
    f, vec = _flat_fn(model, x)
    with _math():
        return torch.autograd.functional.hessian(lambda v: mse(f(v), y), vec)


def dense_ggn(model, data):
    x, y = data
    f, vec = _flat_fn(model, x)
    with _math():
        J = torch.autograd.functional.jacobian(f, vec).reshape(y.numel(), -1)
    return 2.0 / y.numel() * J.T @ J  # the MSE's Hessian in the outputs is 2/numel * I


@pytest.fixture(scope="module", params=[MHA, Encoder], ids=["mha", "encoder"])
def case(request):
    model = _model(request.param)
    data = _data()
    return model, data, dense_hessian(model, data)


@pytest.fixture
def unusual_settings():
    """Caller settings unlike the defaults: math off, flash and cuDNN only, fast path off."""
    before = sdpa_settings()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            yield sdpa_settings()
    finally:
        torch.backends.mha.set_fastpath_enabled(before["mha_fastpath"])
    assert sdpa_settings() == before


# -- the context manager ------------------------------------------------------------------------
def test_context_enables_only_math_and_restores_everything(unusual_settings):
    assert unusual_settings["math"] is False and unusual_settings["flash"] is True
    with twice_differentiable_attention():
        inside = sdpa_settings()
    assert inside == {"flash": False, "mem_efficient": False, "math": True, "cudnn": False,
                      "overrideable": False, "mha_fastpath": False}  # fmt: skip
    assert sdpa_settings() == unusual_settings
    with pytest.raises(KeyError), twice_differentiable_attention():
        raise KeyError("boom")
    assert sdpa_settings() == unusual_settings


def test_defaults_restored_after_nested_use():
    before = sdpa_settings()
    with twice_differentiable_attention(), twice_differentiable_attention():
        pass
    assert sdpa_settings() == before and before["flash"] and before["mha_fastpath"]


def test_the_raw_failure_is_what_the_context_fixes(case):
    # without the context a double backward through the flash kernel fails in torch
    model, (x, y), _ = case
    p = [q for q in model.parameters()]
    loss = mse(model(x), y)
    (g,) = torch.autograd.grad(loss, p[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for .*attention.* is not implemented"):
        torch.autograd.grad(g.sum(), p[:1])


# -- exact products on every path ------------------------------------------------------------------
def test_exact_trace_and_eigenvalues_equal_dense_truth(case, unusual_settings):
    model, data, H = case
    est = hessian_trace(model, mse, data, method="exact")
    assert est.value == pytest.approx(float(H.trace()), rel=1e-10)
    evals = torch.linalg.eigvalsh(H).flip(0)
    res = top_eigenvalues(
        model, mse, data, k=2, tol=1e-6, generator=torch.Generator().manual_seed(0)
    )
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, evals[:2], rtol=1e-6, atol=0)
    assert sdpa_settings() == unusual_settings


@pytest.mark.parametrize(
    "options",
    [
        {"backend": "func", "vectorize": True},  # vmap of vjp-of-grad
        {"backend": "func", "vectorize": True, "func_mode": "forward"},  # vmap of jvp-of-grad
        {"backend": "func", "vectorize": False},
        {"backend": "autograd"},  # double backward
    ],
    ids=["func-vmap", "func-jvp", "func-loop", "autograd"],
)
def test_hessian_and_ggn_blocks_equal_dense_on_every_backend(case, options):
    model, data, H = case
    G = dense_ggn(model, data)
    n = H.shape[0]
    V = torch.randn(n, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    for Op, M in ((HessianOperator, H), (GGNOperator, G)):
        op = Op(model, mse, data, **options)
        torch.testing.assert_close(op @ V, M @ V, rtol=1e-9, atol=1e-12)


def test_blocks_landscape_and_tracker_run_through_attention(case):
    model, data, H = case
    blocks = block_traces(model, mse, data, blocks="module", method="exact")
    assert blocks.total == pytest.approx(float(H.trace()), rel=1e-10)
    land = loss_landscape_1d(model, mse, data, direction="hessian", num_points=3,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert land.direction == "hessian" and torch.isfinite(land.loss).all()
    tracker = SharpnessTracker(model, mse, data, every=1, measures=("trace", "top_eigenvalue"),
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    record = tracker.measure(0)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert record["trace"] == pytest.approx(float(H.trace()), rel=1e-8)
    assert record["top_eigenvalue"] == pytest.approx(top, rel=1e-3)


# -- first-order work keeps the fused kernels; errors restore the settings -----------------------
class Recorder(MHA):
    """Records the SDPA settings each forward sees; raises when ``boom`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, bool]] = []
        self.boom = False

    def forward(self, x):
        self.seen.append(sdpa_settings())
        if self.boom:
            raise RuntimeError("boom in forward")
        return super().forward(x)


def test_first_order_work_keeps_the_callers_kernels_products_take_math():
    model = _model(Recorder)
    data = _data()
    obj = ModelObjective(model, mse, data)
    callers = sdpa_settings()
    model.seen.clear()
    obj.loss()
    obj.loss_and_gradient()
    sam_sharpness(obj, rho=0.01, steps=2)
    assert model.seen and all(s == callers for s in model.seen)
    model.seen.clear()
    obj.hvp({n: t[None] for n, t in obj.params.items()})
    assert model.seen and all(s["math"] and not s["flash"] for s in model.seen)


def test_settings_restored_when_a_product_raises(unusual_settings):
    model = _model(Recorder)
    op = HessianOperator(model, mse, _data(), cache_graph=False)
    model.boom = True
    with pytest.raises(RuntimeError, match="boom in forward"):
        op @ torch.ones(op.shape[0], dtype=DT)
    assert model.seen[-1]["math"] is True
    assert sdpa_settings() == unusual_settings


# -- Hugging Face models as they are built (default "sdpa" attention) ------------------------------
def _hf_models():
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    small = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=30, intermediate_size=32, max_position_embeddings=16, num_labels=3, **small
        )  # fmt: skip
    )
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2,
                                      n_positions=16, bos_token_id=0, eos_token_id=0))  # fmt: skip
    return {"bert": bert, "gpt2": gpt2}


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_models_give_their_top_eigenvalue(name):
    model = _hf_models()[name]
    assert model.config._attn_implementation == "sdpa"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (3, 6), generator=g)
    if name == "bert":
        y = torch.tensor([0, 1, 2])

        def loss_fn(out, y):
            return nn.functional.cross_entropy(out.logits, y)
    else:
        y = ids

        def loss_fn(out, y):
            return nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())

    before = sdpa_settings()
    res = top_eigenvalues(model, loss_fn, ({"input_ids": ids}, y), tol=1e-2, generator=g)
    assert res.converged and torch.isfinite(res.eigenvalues).all()
    assert sdpa_settings() == before
