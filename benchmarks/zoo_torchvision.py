"""torchvision's own models through the model zoo's conformance checks (issue 23).

torchvision's wheel links the CUDA build of torch, so it cannot sit in the test environment
(see docs/guide/models.md); this script runs the checks of ``tests/zoo/test_zoo.py`` in a
separate environment that has it (the CUDA build of torch runs on the CPU):

    python3 -m venv /work/venv-tv
    /work/venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy scipy
    PYTHONPATH=. /work/venv-tv/bin/python benchmarks/zoo_torchvision.py [--models a,b]

Each model is built as its users build it (``torchvision.models.<name>(weights=None,
num_classes=10)``, a 2 x 3 x 16 x 16 batch; the ViT is torchvision's ``VisionTransformer``
with small dimensions, since every vector of ``vit_b_16`` has 768 entries), its BatchNorm
statistics warmed by one train-mode batch, in eval mode. On a selection of a few dozen
parameters (the classifier's bias and one normalization weight, ``params=``), in float64:

* ``hessian_trace(method="exact")`` equals the trace of the dense Hessian (rows by double
  backward through the math attention kernel), relative error <= 1e-9;
* ``top_eigenvalues(k=2, tol=1e-3)`` is certified and within tol of ``eigvalsh``;
* ``block_traces`` are the dense diagonal blocks' traces;
* ``sam_sharpness`` is >= 0 and equals the loss increase at its own perturbation;
* the 1-D landscape's centre equals the loss;

each measured on a copy as a training loop leaves it (train mode, ``.grad`` set, one selected
parameter frozen) under non-default SDPA settings, and the copy's state_dict, modes,
``requires_grad``, ``.grad``, the global random states and the SDPA settings must come back
exactly. Then the default path on the float32 model, all parameters: ``hessian_trace`` and
``top_eigenvalues`` with a handful of products and ``sam_sharpness``. One Markdown row per
model: outcome, the errors, seconds.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
import time
import traceback

import numpy as np
import torch
import torchvision
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

import sharpgen

TOL = 1e-3
SIZE = 16  # image side (the machine is 2 shared cores, float64 convolutions are slow)
SIDES = {"convnext_tiny": 32}  # its 2 x 2 downsampling convolutions need 32 x 32 inputs
MODELS = (  # cheapest first
    "mobilenet_v3_small", "vit", "mobilenet_v2", "regnet_y_400mf", "efficientnet_b0",
    "resnet18", "swin_t", "convnext_tiny", "resnet50",
)  # fmt: skip
_NORMS = (nn.BatchNorm2d, nn.LayerNorm, torchvision.models.convnext.LayerNorm2d)
_ShiftedWindowAttention = torchvision.models.swin_transformer.ShiftedWindowAttention


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model (random weights from seed 0, float32, eval mode) and a batch."""
    torch.manual_seed(0)
    side = SIDES.get(name, SIZE)
    if name == "vit":
        model = torchvision.models.VisionTransformer(
            image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
            num_classes=10,
        )  # fmt: skip
    else:
        model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, side, side, generator=g)
    y = torch.tensor([3, 7])
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.randn(4, 3, side, side, generator=g) * 2 + 0.5)
    return model.eval(), (x, y)


def select(model: nn.Module) -> list[str]:
    """The classifier's bias and the smallest normalization weight: in a model with attention
    the first of that size (before every attention block, so that the attention's second
    derivative is in the Hessian), otherwise the last (cheaper double backward)."""
    names = [n for n, _ in model.named_parameters()]
    bias = [n for n in names if n.endswith("bias")][-1]
    norms = [
        (m.weight.numel(), i, f"{mn}.weight")
        for i, (mn, m) in enumerate(model.named_modules())
        if isinstance(m, _NORMS) and m.weight is not None
    ]
    size = min(s for s, _, _ in norms)
    attention = (nn.MultiheadAttention, _ShiftedWindowAttention)
    first = any(isinstance(m, attention) for m in model.modules())
    pick = min if first else max
    norm = pick((i, n) for s, i, n in norms if s == size)[1]
    return [norm, bias]


def dense_hessian(model: nn.Module, data, names: list[str]) -> torch.Tensor:
    """Dense float64 Hessian of the loss in the selected parameters (the reference)."""
    ref = copy.deepcopy(model).eval()
    named = dict(ref.named_parameters())
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names]).requires_grad_(True)
    values = {
        n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes, strict=True)
    }
    with sdpa_kernel([SDPBackend.MATH]):
        loss = F.cross_entropy(functional_call(ref, values, (data[0],)), data[1])
        (grad,) = torch.autograd.grad(loss, flat, create_graph=True)
        eye = torch.eye(flat.numel(), dtype=flat.dtype)
        try:
            (rows,) = torch.autograd.grad(grad, flat, eye, retain_graph=True, is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: row by row
            rows = torch.stack(
                [torch.autograd.grad(grad, flat, e, retain_graph=True)[0] for e in eye]
            )
    return (rows + rows.T).detach() / 2


def loss_at(model: nn.Module, data, values=None) -> float:
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(ref, values or {}, (data[0],)), data[1]))


def sdpa_settings() -> tuple:
    return (
        _cur_sdpa_kernel_backends(with_priority=True),
        tuple(torch._C._get_sdp_priority_order()),
        torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed(),
        torch.backends.mha.get_fastpath_enabled(),
    )


def _state(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),  # noqa: NPY002
        "sdpa": sdpa_settings(),
    }


def _unchanged(before: dict, model: nn.Module) -> None:
    after = _state(model)
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]) and v.dtype == after["state"][k].dtype, k
    for key in ("training", "requires_grad", "py_rng", "sdpa"):
        assert before[key] == after[key], f"{key} changed"
    assert all(a is b for a, b in zip(before["grad"], after["grad"], strict=True)), ".grad"
    for v0, g1 in zip(before["grad_values"], after["grad"], strict=True):
        assert v0 is None or torch.equal(v0, g1), ".grad values"
    assert torch.equal(before["rng"], after["rng"]), "global RNG"
    assert np.array_equal(before["np_rng"], after["np_rng"]), "numpy RNG"


def checked(measure, model: nn.Module, data, names: list[str]):
    """``measure(copy)`` on a copy as a training loop leaves it; asserts it is untouched."""
    used = copy.deepcopy(model).eval()
    F.cross_entropy(used(data[0]), data[1]).backward()
    used.train()
    dict(used.named_parameters())[names[0]].requires_grad_(False)
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends, set_priority=True):
        before = _state(used)
        try:
            return measure(used)
        finally:
            _unchanged(before, used)


_CLOCK = [time.perf_counter()]


def stage(label: str) -> None:
    """Print the seconds since the previous stage to stderr (where the time goes)."""
    now = time.perf_counter()
    print(f"  {label}: {now - _CLOCK[0]:.1f} s", file=sys.stderr, flush=True)
    _CLOCK[0] = now


def _close(a: float, b: float, rel: float, abs_: float = 0.0) -> bool:
    return abs(a - b) <= max(rel * abs(b), abs_)


def check_float64(model: nn.Module, data, names: list[str]) -> dict:
    """The zoo's checks on the selection, float64; returns the errors (asserts the bounds)."""
    model = copy.deepcopy(model).double()
    data = (data[0].double(), data[1])
    ce, sel = F.cross_entropy, {"params": names}
    hess = dense_hessian(model, data, names)
    stage("dense Hessian")
    scale = 1e-9 * hess.abs().max().item()
    truth = torch.trace(hess).item()
    res = checked(
        lambda m: sharpgen.hessian_trace(m, ce, data, method="exact", **sel), model, data, names
    )
    trace_err = abs(res.value - truth) / max(abs(truth), 1e-300)
    stage("exact trace")
    assert res.method == "exact" and _close(res.value, truth, 1e-9, scale), (res.value, truth)

    eig = torch.linalg.eigvalsh(hess).flip(0)[:2]
    gen = torch.Generator().manual_seed(0)
    top = checked(
        lambda m: sharpgen.top_eigenvalues(m, ce, data, k=2, tol=TOL, generator=gen, **sel),
        model, data, names,
    )  # fmt: skip
    assert top.converged, top.residuals
    stage("top_eigenvalues")
    errs = [
        abs(v - e) / abs(e) for v, e in zip(top.eigenvalues.tolist(), eig.tolist(), strict=True)
    ]
    for v, e in zip(top.eigenvalues.tolist(), eig.tolist(), strict=True):
        assert abs(v - e) <= TOL * abs(e) + 1e-9 * eig.abs().max().item(), (v, e)

    blocks = checked(
        lambda m: sharpgen.block_traces(m, ce, data, blocks="parameter", method="exact", **sel),
        model, data, names,
    )  # fmt: skip
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    stage("block_traces")
    pieces = torch.split(torch.diagonal(hess), sizes)
    for n, piece in zip(names, pieces, strict=True):
        assert _close(blocks.traces[n], piece.sum().item(), 1e-9, scale), n

    sam = check_first_order(model, data, names)
    return {"p": sum(sizes), "trace": trace_err, "top": max(errs), "sam": sam}


def check_first_order(model: nn.Module, data, names: list[str]) -> float:
    """SAM against its own perturbation and the landscape's centre (float64 model)."""
    ce, sel = F.cross_entropy, {"params": names}
    sam = checked(
        lambda m: sharpgen.sam_sharpness(m, ce, data, rho=0.05, **sel), model, data, names
    )
    loss = loss_at(model, data)
    stage("sam_sharpness")
    named = dict(model.named_parameters())
    perturbed = loss_at(
        model, data, {n: named[n].detach() + e for n, e in sam.perturbation.items()}
    )
    assert np.isfinite(sam.value) and sam.value >= 0, sam.value
    assert _close(sam.loss, loss, 1e-10) and _close(sam.perturbed_loss, perturbed, 1e-10)
    assert _close(sam.value, perturbed - loss, 1e-8, 1e-12), (sam.value, perturbed - loss)

    g = torch.Generator().manual_seed(0)
    d = {n: torch.randn(named[n].shape, generator=g, dtype=named[n].dtype) for n in names}
    norm = torch.sqrt(sum((t**2).sum() for t in d.values()))
    d = {n: t / norm for n, t in d.items()}
    land = checked(
        lambda m: sharpgen.loss_landscape_1d(
            m, ce, data, direction=d, span=(-0.5, 0.5), num_points=5, **sel
        ),
        model, data, names,
    )  # fmt: skip
    assert _close(land.center_loss, loss, 1e-10), (land.center_loss, loss)
    stage("landscape")
    assert _close(float(torch.as_tensor(land.loss)[2]), loss, 1e-10)
    return sam.value


NO_SECOND = {"mobilenet_v3_small": "hardsigmoid"}  # the op sharpgen's error must name


def dense_ggn(model: nn.Module, data, names: list[str]) -> torch.Tensor:
    r"""Dense $J^\top H_\ell J$ in the selection (first derivatives of the model only)."""
    ref = copy.deepcopy(model).eval()
    named = dict(ref.named_parameters())
    shapes = [named[n].shape for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])

    def outputs(vec):
        pieces = torch.split(vec, [math.prod(s) for s in shapes])
        values = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return functional_call(ref, values, (data[0],))

    jac = torch.autograd.functional.jacobian(outputs, flat).reshape(-1, flat.numel())
    out = outputs(flat).detach()
    h = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o, data[1]), out)
    return jac.T @ h.reshape(out.numel(), out.numel()) @ jac


def check_broken(model: nn.Module, data, names: list[str], op: str) -> dict:
    """A model with an op without a second derivative: the Hessian measures raise sharpgen's
    ValueError naming it (float64 selection and the float32 default path), ``ggn_trace``
    equals the dense GGN, SAM and the landscape check as for every model."""
    model64 = copy.deepcopy(model).double()
    data64 = (data[0].double(), data[1])
    ce, sel = F.cross_entropy, {"params": names}
    gen = torch.Generator().manual_seed(0)
    hessian_measures = (
        lambda m: sharpgen.hessian_trace(m, ce, data64, method="exact", **sel),
        lambda m: sharpgen.top_eigenvalues(m, ce, data64, k=2, generator=gen, **sel),
        lambda m: sharpgen.block_traces(m, ce, data64, blocks="parameter", **sel),
    )
    for measure in hessian_measures:
        try:
            checked(measure, model64, data64, names)
        except ValueError as exc:
            assert op in str(exc).lower(), str(exc)
        else:
            raise AssertionError(f"no error for {op}")
    truth = torch.trace(dense_ggn(model64, data64, names)).item()
    stage("dense GGN")
    ggn = checked(
        lambda m: sharpgen.ggn_trace(m, ce, data64, method="exact", **sel), model64, data64, names
    )
    assert _close(ggn.value, truth, 1e-9), (ggn.value, truth)
    stage("ggn_trace")
    sam = check_first_order(model64, data64, names)
    before = _state(model)
    try:
        sharpgen.hessian_trace(model, ce, data, num_matvecs=4, generator=gen)
    except ValueError as exc:
        assert op in str(exc).lower(), str(exc)
    else:
        raise AssertionError(f"no error for {op} (float32 default)")
    ggn32 = sharpgen.ggn_trace(model, ce, data, num_matvecs=4, generator=gen).value
    sam32 = sharpgen.sam_sharpness(model, ce, data, rho=0.05).value
    _unchanged(before, model)
    stage("float32 sam/ggn")
    assert np.isfinite(ggn32) and ggn32 >= 0 and sam32 >= 0, (ggn32, sam32)
    p = sum(dict(model.named_parameters())[n].numel() for n in names)
    return {"p": p, "ggn": abs(ggn.value - truth) / abs(truth), "sam": sam, "ggn32": ggn32,
            "sam32": sam32}  # fmt: skip


def check_default(model: nn.Module, data) -> dict:
    """The default path on the float32 model, all parameters, a handful of products."""
    ce = F.cross_entropy
    gen = torch.Generator().manual_seed(0)
    before = _state(model)
    tr = sharpgen.hessian_trace(model, ce, data, num_matvecs=4, generator=gen)
    stage("float32 hessian_trace")
    top = sharpgen.top_eigenvalues(model, ce, data, k=1, max_iter=6, generator=gen)
    stage("float32 top_eigenvalues")
    sam = sharpgen.sam_sharpness(model, ce, data, rho=0.05)
    _unchanged(before, model)
    stage("float32 sam")
    for v in (tr.value, float(top.eigenvalues[0]), sam.value):
        assert np.isfinite(v), v
    assert sam.value >= 0, sam.value
    return {"trace32": tr.value, "top32": float(top.eigenvalues[0]), "sam32": sam.value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    print(f"{versions}, threads {torch.get_num_threads()}")
    print("| model | params (selected) | outcome | exact trace rel. err | top-2 rel. err "
          "| float32 default trace / top / SAM | s | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        t0 = _CLOCK[0] = time.perf_counter()
        row = {}
        try:
            model, data = build(name)
            names = select(model)
            if name in NO_SECOND:
                row = check_broken(model, data, names, NO_SECOND[name])
                outcome = (
                    f"Hessian measures: sharpgen's ValueError naming `{NO_SECOND[name]}`; "
                    f"`ggn_trace` exact (rel. err {row['ggn']:.1e}); SAM, landscape ok"
                )
            else:
                row = check_float64(model, data, names)
                row.update(check_default(model, data))
                outcome = "ok"
        except Exception as exc:  # report precisely, go on with the next model
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            first = (str(exc).splitlines() or [""])[0][:160]
            outcome = f"**{type(exc).__name__}**: {first} ({tb.filename}:{tb.lineno})"
        secs = time.perf_counter() - t0
        sel = f"{row['p']} ({', '.join(names)})" if "p" in row else "-"
        errs = (f"{row['trace']:.1e}", f"{row['top']:.1e}") if "trace" in row else ("-", "-")
        f32 = "-"
        if "trace32" in row:
            f32 = f"{row['trace32']:.3g} / {row['top32']:.3g} / {row['sam32']:.2g}"
        elif "ggn32" in row:
            f32 = f"ValueError / - / {row['sam32']:.2g} (GGN trace {row['ggn32']:.3g})"
        load = f"{os.getloadavg()[0]:.1f}"  # 1-minute load average at the end
        cells = (name, sel, outcome, *errs, f32, f"{secs:.0f}", load)
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
