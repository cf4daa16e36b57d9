"""The batched trainer against plain per-run autograd loops, and its closed-form traces."""

from __future__ import annotations

import math

import pytest
import torch

from sharpgen.experiments import ExperimentSpec, Phase, make_runs, train
from sharpgen.experiments._batched import forward, loss_and_grad, trace_terms, trainable_names
from sharpgen.models import deep_relu, two_layer_relu

ARCHS = ["no_bias", "bias", "simplified_bn", "simplified_ln"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny batched matmuls: a second thread only adds synchronization (and on a loaded
    # machine, a lot of it)
    torch.set_num_threads(1)
    yield


def _module(arch, params, r, X, *, depth=2, activation="relu"):
    """The run's TwoLayerNet (or DeepReLUNet) holding the trainer's initial parameters."""
    d, m = params["W1"].shape[2], params["W1"].shape[1]
    g = torch.Generator().manual_seed(123)
    if depth > 2:
        net = deep_relu(
            d, [m] * (depth - 1), activation=activation, dtype=torch.float64, generator=g
        )
    else:
        net = two_layer_relu(
            d,
            m,
            bias=arch != "no_bias",
            norm=arch if arch.startswith("simplified") else None,
            activation=activation,
            dtype=torch.float64,
            generator=g,
        )
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(params[name][r])
    if arch == "simplified_bn":
        net.set_reference(X)
    return net


def _loss(spec, out, y):
    if spec.loss == "mse":
        return (out - y).square().mean()
    q = 1 - spec.label_smoothing / 2
    sp = torch.nn.functional.softplus
    return (q * sp(-y * out) + (1 - q) * sp(y * out)).mean()


def _reference_run(spec, seed):
    """One run alone: per-step autograd on the nn.Module, exactly the paper's update rule."""
    (X, Y, _, _), params, gens = make_runs(spec, [seed])
    net = _module(spec.arch, params, 0, X[0], depth=spec.depth, activation=spec.activation)
    X, Y, g = X[0], Y[0], gens[0]
    plist = list(net.parameters())
    opt = None
    if spec.method == "sgd":
        opt = torch.optim.SGD(plist, lr=spec.phases[0].lr, weight_decay=spec.weight_decay)
    for _ in range(spec.epochs):
        if spec.batch_size == spec.n:
            batches = [torch.arange(spec.n)]
        elif spec.sampling == "uniform":
            batches = torch.randint(0, spec.n, (spec.n,), generator=g).reshape(-1, 1)
        else:
            batches = torch.randperm(spec.n, generator=g).reshape(-1, spec.batch_size)
        for idx in batches:
            if opt is not None:
                opt.zero_grad()
                _loss(spec, net(X[idx]), Y[idx]).backward()
                opt.step()
                continue
            phase = spec.phases[0]
            grads = torch.autograd.grad(_loss(spec, net(X[idx]), Y[idx]), plist)
            norm = torch.sqrt(sum(gr.square().sum() for gr in grads))
            with torch.no_grad():
                if norm > 0:
                    for p, gr in zip(plist, grads, strict=False):
                        p.add_(gr, alpha=phase.rho / norm)
            grads2 = torch.autograd.grad(_loss(spec, net(X[idx]), Y[idx]), plist)
            with torch.no_grad():
                if norm > 0:
                    for p, gr in zip(plist, grads, strict=False):
                        p.sub_(gr, alpha=phase.rho / norm)
                for p, gr in zip(plist, grads2, strict=False):
                    p.sub_(gr, alpha=phase.lr)
                if spec.method == "projected_sam1":
                    first = torch.sqrt(net.W1.square().sum() + net.b1.square().sum())
                    factor = min(1.0, spec.projection_radius / float(first))
                    net.W1.mul_(factor)
                    net.b1.mul_(factor)
    return dict(net.named_parameters())


def _tiny(arch, **kw):
    base = dict(
        d=5,
        n=20,
        width=16,
        test_size=32,
        eval_every=50,
        dtype="float64",
        phases=(Phase(50, 0.05, 0.1),),
    )
    base.update(kw)
    return ExperimentSpec(f"tiny-{arch}", arch, base.pop("method", "sam1"), **base)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_1sam_equals_autograd_loop_over_1000_steps(arch):
    spec = _tiny(arch, phases=(Phase(50, 0.02 if arch == "simplified_bn" else 0.05, 0.1),))
    seeds = [3, 4, 5]
    batched = train(spec, seeds)
    result_params = batched.params
    assert batched.steps == 1000
    # the middle run of the batch, redone alone
    ref = _reference_run(spec, seeds[1])
    for name, p in ref.items():
        torch.testing.assert_close(result_params[name][1], p.detach(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="sgd", batch_size=20, weight_decay=0.05, phases=(Phase(100, 0.05),)),
        dict(method="sgd", batch_size=4, sampling="permutation", weight_decay=0.05),
        dict(method="projected_sam1", projection_radius=1.5),
        dict(loss="logistic", label_smoothing=0.2),
        dict(sampling="permutation"),
    ],
    ids=["gd-wd", "sgd-permutation", "projected", "logistic", "sam-permutation"],
)
@pytest.mark.parametrize("arch", ["bias", "simplified_ln"])
def test_methods_equal_autograd_loop(arch, kw):
    kw.setdefault("phases", (Phase(10, 0.05, 0.1),))
    spec = _tiny(arch, **kw)
    got = train(spec, [7, 8]).params
    ref = _reference_run(spec, 8)
    for name, p in ref.items():
        torch.testing.assert_close(got[name][1], p.detach(), rtol=1e-9, atol=1e-10)


def test_projection_holds_radius():
    spec = _tiny("simplified_ln", method="projected_sam1", projection_radius=1.5)
    res = train(spec, [0])
    W1, b1 = res.final("norm_W1")[0], res.final("norm_b1")[0]
    assert math.hypot(W1, b1) <= 1.5 * (1 + 1e-12)


def test_runs_do_not_depend_on_their_batch_partners():
    spec = _tiny("bias", dtype="float32")
    together = train(spec, [0, 1, 2])
    alone = train(spec, [1])
    assert together.metrics["trace"][1] == alone.metrics["trace"][0]


def test_initialization_is_the_models_two_layer_relu():
    spec = _tiny("bias")
    (X, _, Xt, _), params, _ = make_runs(spec, [11])
    g = torch.Generator().manual_seed(11)
    torch.randint(0, 2, (spec.n, spec.d), generator=g)
    torch.randint(0, 2, (spec.test_size, spec.d), generator=g)
    net = two_layer_relu(spec.d, spec.width, generator=g, dtype=torch.float64)
    for name, p in net.named_parameters():
        assert torch.equal(params[name][0], p.detach())


def _dense_hessian_trace(arch, P, r, X, Y, loss, ls):
    names = trainable_names(arch)
    shapes = [P[k][r].shape for k in names]
    flat = torch.cat([P[k][r].reshape(-1) for k in names])
    idx = torch.arange(X.shape[1])[None]

    def L(v):
        out, o = {}, 0
        for k, s in zip(names, shapes, strict=False):
            out[k] = v[o : o + s.numel()].reshape(s)[None]
            o += s.numel()
        for k in P:
            out.setdefault(k, P[k][r : r + 1])
        value, _ = loss_and_grad(
            out, arch, X[r : r + 1], Y[r : r + 1], idx, loss=loss, label_smoothing=ls
        )
        return value[0]

    return torch.func.hessian(L)(flat).trace()


@pytest.mark.parametrize("loss", ["mse", "logistic"])
@pytest.mark.parametrize("arch", ARCHS)
def test_closed_form_trace_equals_dense_hessian(arch, loss):
    g = torch.Generator().manual_seed(0)
    R, n, d, m = 2, 6, 4, 5
    P = {
        "W1": torch.randn(R, m, d, generator=g, dtype=torch.float64),
        "b1": torch.randn(R, m, generator=g, dtype=torch.float64) * (arch != "no_bias"),
        "gamma": 1 + 0.3 * torch.randn(R, m, generator=g, dtype=torch.float64),
        "W2": torch.randn(R, m, generator=g, dtype=torch.float64),
    }
    X = torch.randint(0, 2, (R, n, d), generator=g).double() * 2 - 1
    Y = X[..., 0] * X[..., 1]
    trace, gn = trace_terms(P, arch, X, Y, loss=loss, label_smoothing=0.2)
    for r in range(R):
        dense = _dense_hessian_trace(arch, P, r, X, Y, loss, 0.2)
        torch.testing.assert_close(trace[r], dense, rtol=1e-10, atol=1e-10)
    if arch in ("no_bias", "bias"):
        torch.testing.assert_close(trace, gn)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_gradient_equals_autograd_of_module(arch):
    g = torch.Generator().manual_seed(1)
    spec = _tiny(arch)
    (X, Y, _, _), P, _ = make_runs(spec, [0, 1])
    P["gamma"] = P["gamma"] + 0.2 * torch.randn(P["gamma"].shape, generator=g, dtype=torch.float64)
    idx = torch.randint(0, spec.n, (2, 3), generator=g)
    value, grads = loss_and_grad(P, arch, X, Y, idx)
    out = forward(P, arch, X[torch.arange(2)[:, None], idx], train_X=X)
    for r in range(2):
        net = _module(arch, P, r, X[r])
        if arch == "simplified_bn":
            with torch.no_grad():
                net.gamma.copy_(P["gamma"][r])
        loss = (net(X[r, idx[r]]) - Y[r, idx[r]]).square().mean()
        torch.testing.assert_close(value[r], loss.detach())
        torch.testing.assert_close(out[r], net(X[r, idx[r]]).detach())
        auto = torch.autograd.grad(loss, list(net.parameters()))
        for (name, _), a in zip(net.named_parameters(), auto, strict=False):
            torch.testing.assert_close(grads[name][r], a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["no_bias", "simplified_bn"])
def test_zero_gradient_skips_the_ascent_without_nan(arch):
    # first layer zero: every neuron dead (for Sim-BN s = 0), the gradient is exactly 0
    from sharpgen.experiments._fused import Head, sam1_bn_epoch, sam1_rank_one_epoch

    (X, Y, _, _), P, _ = make_runs(_tiny(arch), [0, 1])
    P["W1"].zero_()
    P["b1"].zero_()
    before = {k: v.clone() for k, v in P.items()}
    epoch = sam1_bn_epoch if arch == "simplified_bn" else sam1_rank_one_epoch
    epoch(P, X, Y, torch.zeros(2, 3, dtype=torch.long), hd=Head(arch), lr=0.1, rho=0.1)
    for k in P:
        assert torch.equal(P[k], before[k])


def test_bad_spec_arguments_are_named():
    with pytest.raises(ValueError, match="arch='resnet'"):
        ExperimentSpec("x", "resnet", "sam1", (Phase(1, 0.1),))
    with pytest.raises(ValueError, match="method='adam'"):
        ExperimentSpec("x", "bias", "adam", (Phase(1, 0.1),))
    with pytest.raises(ValueError, match="projection_radius"):
        ExperimentSpec("x", "bias", "projected_sam1", (Phase(1, 0.1),))
    with pytest.raises(ValueError, match="weight_decay"):
        ExperimentSpec("x", "bias", "sam1", (Phase(1, 0.1),), weight_decay=0.1)
    with pytest.raises(ValueError, match="epochs"):
        Phase(0, 0.1)
    with pytest.raises(ValueError, match="seeds"):
        train(_tiny("bias"), [1, 1])


@pytest.mark.parametrize(
    "kw",
    [dict(depth=3), dict(activation="softplus"), dict(depth=3, method="sgd", weight_decay=0.05)],
    ids=["deep-sam", "softplus-sam", "deep-sgd"],
)
def test_autograd_backend_equals_autograd_loop(kw):
    spec = _tiny("bias", width=8, phases=(Phase(5, 0.05, 0.1),), **kw)
    got = train(spec, [7, 8]).params
    ref = _reference_run(spec, 8)
    assert set(got) == set(ref)
    for name, p in ref.items():
        torch.testing.assert_close(got[name][1], p.detach(), rtol=1e-9, atol=1e-10)


def test_autograd_backend_trace_is_the_interpolation_trace_of_theory():
    from sharpgen.theory import interpolation_trace

    spec = _tiny("bias", width=8, depth=3, phases=(Phase(2, 0.05, 0.1),))
    res = train(spec, [0])
    (X, _, _, _), _, _ = make_runs(spec, [0])
    net = _module("bias", res.params, 0, X[0], depth=3)
    expected = float(interpolation_trace(net, X[0]))
    assert res.final("trace_gn")[0] == pytest.approx(expected, rel=1e-12)
    assert res.final("trace")[0] == res.final("trace_gn")[0]  # deep ReLU: diagonal of f'' is 0
    assert res.lower_bound[0] == pytest.approx(2 * 3 * (spec.d + 1) ** (1 / 3), rel=1e-12)


@pytest.mark.parametrize("arch", ["bias", "simplified_bn"])
def test_batched_1sam_equals_sharpgen_optim_sam(arch):
    """Cross-check against the library's own SAM optimizer (batch size 1 = 1-SAM)."""
    from sharpgen.optim import SAM

    spec = _tiny(arch, phases=(Phase(10, 0.02, 0.1),))
    got = train(spec, [5]).params
    (X, Y, _, _), params, gens = make_runs(spec, [5])
    net = _module(arch, params, 0, X[0])
    X, Y, g = X[0], Y[0], gens[0]
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.02)
    for _ in range(spec.epochs):
        for k in torch.randint(0, spec.n, (spec.n,), generator=g):
            idx = k.reshape(1)

            def closure(idx=idx):
                opt.zero_grad()
                loss = (net(X[idx]) - Y[idx]).square().mean()
                loss.backward()
                return loss

            opt.step(closure)
    for name, p in net.named_parameters():
        torch.testing.assert_close(got[name][0], p.detach(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_logged_trace_equals_sharpgen_hessian_trace_exact(arch):
    """The trainer's closed-form trace is the library's exact model-level measure."""
    import sharpgen

    spec = _tiny(arch, width=6, phases=(Phase(3, 0.02, 0.1),))
    res = train(spec, [2])
    (X, Y, _, _), _, _ = make_runs(spec, [2])
    net = _module(arch, res.params, 0, X[0])
    if arch == "simplified_bn":
        with torch.no_grad():
            net.gamma.copy_(res.params["gamma"][0])
    est = sharpgen.hessian_trace(
        net,
        lambda out, y: (out - y).square().mean(),
        (X[0], Y[0]),
        method="exact",
    )
    assert res.final("trace")[0] == pytest.approx(float(est.value), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("loss", ["mse", "logistic"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block", [1, 3, 7, 25])
def test_fused_epochs_equal_the_reference_step(arch, loss, block):
    """Fused 1-SAM epochs (blocked rank-one updates; Sim-BN closed form) = the obvious step."""
    from sharpgen.experiments._fused import Head, sam1_bn_epoch, sam1_rank_one_epoch
    from sharpgen.experiments._kernels import kernels_for
    from sharpgen.experiments._trainer import _epoch_indices, _sam_step

    spec = _tiny(arch, loss=loss, label_smoothing=0.2 if loss == "logistic" else 0.0)
    (X, Y, _, _), P, gens = make_runs(spec, [0, 1, 2])
    idx = _epoch_indices(spec, gens)
    slow = {k: v.clone() for k, v in P.items()}
    kernels = kernels_for(spec)
    for t in range(idx.shape[1]):
        _sam_step(spec, kernels, slow, X, Y, idx[:, t], 0.05, 0.1)
    hd = Head(arch, spec.loss, spec.label_smoothing, spec.eps)
    if arch == "simplified_bn":
        sam1_bn_epoch(P, X, Y, idx[:, :, 0], hd=hd, lr=0.05, rho=0.1)
    else:
        sam1_rank_one_epoch(P, X, Y, idx[:, :, 0], hd=hd, lr=0.05, rho=0.1, block=block)
    for k in P:
        torch.testing.assert_close(P[k], slow[k], rtol=1e-11, atol=1e-12)
    assert not torch.equal(P["W2"], make_runs(spec, [0, 1, 2])[1]["W2"])  # it moved


@pytest.mark.parametrize("arch", ["bias", "simplified_bn"])
def test_nothing_but_the_history_grows_with_the_epochs(arch):
    """Live tensors are the same after every epoch: buffers are per epoch call, not kept."""
    import gc

    spec = _tiny(arch, phases=(Phase(12, 0.02, 0.1),), eval_every=100)
    counts = []

    def count(_):
        gc.collect()
        counts.append(sum(1 for o in gc.get_objects() if torch.is_tensor(o)))

    train(spec, [0, 1], progress=count)
    assert len(counts) == 12
    assert counts[1:] == [counts[1]] * 11, counts


def test_compiled_rank_one_step_equals_the_eager_one():
    spec = _tiny("simplified_ln", phases=(Phase(2, 0.05, 0.1),))
    eager = train(spec, [0, 1]).params
    compiled = train(spec, [0, 1], compile=True).params
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-12, atol=1e-13)
