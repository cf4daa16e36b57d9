r"""A point-by-point fast path for ``nn.Sequential`` models made of standard layers.

On a CPU the forward passes are the cost of a landscape, and batching grid points through
``vmap`` does not make them cheaper per point. What does is doing less work per point:

* the first affine layer (``Linear``/``Conv``) is affine in its parameters, so its output
  at $\theta + \sum_k c_k d_k$ is $Z_0 + \sum_k c_k Z_k$, computed once per batch
  (``_grid._affine_split``);
* images are kept channels-last (NHWC), where oneDNN's convolutions and the pooling
  kernels are several times faster than in NCHW;
* ``ReLU`` followed by a 2x2, stride-2 ``MaxPool2d`` is pooled first (the maximum commutes
  with a nondecreasing map, exactly), as the elementwise maximum of four strided views;
* ``Flatten`` followed by ``Linear`` on a channels-last map multiplies by the weight with
  its columns permuted to NHWC order, instead of copying the map back to NCHW;
* each point is one Python-level pass over a precompiled list of kernels, without
  ``functional_call``'s module swapping.

Every rewrite is exact up to the order of floating-point sums. Both the affine split and
the kernels evaluate the layers one after another, which is what ``model(x)`` computes only
for a plain ``nn.Sequential`` (`is_plain_sequential`); any other model, and one with another
layer (or buffers), takes the general ``vmap`` path over ``functional_call(model, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FastPoints", "compile_rest", "is_plain_sequential", "to_channels_last"]

Kernel = Callable[[Tensor, list[Tensor]], Tensor]
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU,
                nn.Softplus, nn.Identity, nn.Dropout)  # fmt: skip
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` runs more than ``m.forward`` (hooks, or an instance ``forward``)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m))


def is_plain_sequential(model: nn.Module) -> TypeGuard[nn.Sequential]:
    """Whether ``model(x)`` is provably its children applied one after another.

    True only for an ``nn.Sequential`` of that exact class (a subclass may have its own
    ``forward``), with no forward or forward-pre hooks on it or any submodule, no global
    module hooks (``register_module_forward_hook``), no submodule used twice and no
    parameter shared between two places (tied weights). Whatever a fast path built on its
    children computes is then what ``model(x)`` computes.
    """
    if type(model) is not nn.Sequential:
        return False
    g = torch.nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return False
    mods = list(model.modules(remove_duplicate=False))
    if len({id(m) for m in mods}) != len(mods) or any(_hooked(m) for m in mods):
        return False
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return len({id(p) for p in params}) == len(params)


def to_channels_last(h: Tensor) -> Tensor:
    """A 4-D tensor in channels-last memory (NHWC); any other tensor as it is."""
    return h.contiguous(memory_format=torch.channels_last) if h.dim() == 4 else h


def _linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    r"""``F.linear`` of a 2-D input; as $(W x^\top + b)^\top$ when there are 2-16 outputs.

    One thread, measured: 256x2048 -> 10 outputs 1.5x and 512x64 -> 10 5x faster this way
    (the GEMM has the many inputs as its wide dimension); one output or many are not.
    """
    if x.dim() != 2 or not 2 <= w.shape[0] <= 16:
        return F.linear(x, w, b)
    if b is None:
        return torch.mm(w, x.t()).t()
    return torch.addmm(b[:, None], w, x.t()).t()


def _pool2x2(h: Tensor) -> Tensor:
    """``max_pool2d(h, 2)`` of a channels-last map: the maximum of four strided views."""
    n, c, hh, ww = h.shape
    v = h.permute(0, 2, 3, 1)[:, : hh - hh % 2, : ww - ww % 2]
    v = v.reshape(n, hh // 2, 2, ww // 2, 2, c)
    out = torch.maximum(v[:, :, 0, :, 0], v[:, :, 0, :, 1])
    out = torch.maximum(out, torch.maximum(v[:, :, 1, :, 0], v[:, :, 1, :, 1]))
    return out.permute(0, 3, 1, 2)  # an NCHW view of NHWC memory: channels-last


def _is_pool2x2(m: nn.Module) -> bool:
    return (
        type(m) is nn.MaxPool2d
        and m.kernel_size in (2, (2, 2))
        and m.stride in (2, (2, 2))
        and m.padding in (0, (0, 0))
        and m.dilation in (1, (1, 1))
        and not m.ceil_mode
        and not m.return_indices
    )


def _supported(m: nn.Module) -> bool:
    if _hooked(m) or list(m.buffers(recurse=False)):
        return False
    if isinstance(m, _CONV):
        return m.padding_mode == "zeros" and type(m) in _CONV
    if type(m) is nn.Linear or type(m) is nn.Flatten or type(m) in _ELEMENTWISE:
        return not (type(m) is nn.Dropout and m.training)
    return type(m) in (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)


Step = tuple[Kernel, list[str], list[Callable[[Tensor], Tensor]]]


def _keep(t: Tensor) -> Tensor:
    return t


class _Compiler:
    """Walks the layers once on a sample input, choosing a kernel per layer (or pair)."""

    def __init__(self, rest: nn.Module, prefix: str, values: dict[str, Tensor]) -> None:
        self.layers = list(rest.named_children())
        self.prefix, self.values = prefix, values
        self.steps: list[Step] = []

    def _names(self, name: str, m: nn.Module) -> list[str]:
        return [f"{self.prefix}{name}.{p}" for p, _ in m.named_parameters()]

    def run(self, h: Tensor) -> list[Step]:
        i = 0
        while i < len(self.layers):
            m = self.layers[i][1]
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else ("", None)
            if type(m) is nn.ReLU and nxt[1] is not None and _is_pool2x2(nxt[1]) and h.dim() == 4:
                self.steps.append((lambda x, _p: F.relu(_pool2x2(x), inplace=True), [], []))
                i += 2
            elif type(m) is nn.Flatten and type(nxt[1]) is nn.Linear and self._flat_cl(m, h):
                self.steps.append(self._flatten_linear(nxt[0], nxt[1], h))
                i += 2
            else:
                self.steps.append(self._single(*self.layers[i]))
                i += 1
            kernel, names, tfs = self.steps[-1]
            h = kernel(h, [tf(self.values[n]) for tf, n in zip(tfs, names, strict=True)])
        return self.steps

    @staticmethod
    def _flat_cl(m: nn.Flatten, h: Tensor) -> bool:
        cl = h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last)
        return cl and m.start_dim == 1 and m.end_dim in (-1, 3)

    def _flatten_linear(self, name: str, lin: nn.Module, h: Tensor) -> Step:
        _, c, hh, ww = h.shape

        def perm(w: Tensor) -> Tensor:
            o = w.shape[0]
            return w.reshape(o, c, hh, ww).permute(0, 2, 3, 1).reshape(o, c * hh * ww)

        def kernel(x: Tensor, p: list[Tensor]) -> Tensor:
            return _linear(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1), *p)

        names = self._names(name, lin)
        tfs: list[Callable[[Tensor], Tensor]] = [perm] + [_keep] * (len(names) - 1)
        return kernel, names, tfs

    def _single(self, name: str, m: nn.Module) -> Step:
        names = self._names(name, m)
        same: list[Callable[[Tensor], Tensor]] = [_keep] * len(names)
        if isinstance(m, _CONV):
            conv: Kernel = lambda x, p: m._conv_forward(x, p[0], p[1] if len(p) > 1 else None)  # noqa: E731
            return conv, names, same
        if type(m) is nn.Linear:
            return (lambda x, p: _linear(x, *p)), names, same
        if type(m) is nn.ReLU:
            return (lambda x, _p: F.relu(x, inplace=True)), [], []
        return (lambda x, _p: m(x)), [], []


def compile_rest(
    rest: nn.Module, prefix: str, head: Tensor, values: dict[str, Tensor]
) -> list[Step] | None:
    r"""Kernels for the layers after the first, or None when a layer is not supported.

    Args:
        rest: The layers after the first affine one.
        prefix: Name prefix of their parameters in the full model.
        head: The first layer's output at $\theta$.
        values: Full name -> tensor of every parameter at $\theta$ (for the sample pass).

    Returns:
        A list of ``(kernel, names, transforms)``: ``kernel(h, params)`` applies a layer
        (or a fused pair) to its parameters, taken by full name and passed through the
        matching transform (a fixed permutation, applied once to $\theta$ and to each
        direction).
    """
    layers = list(rest.children())
    if not layers or not all(_supported(m) for m in layers):
        return None
    with torch.no_grad():
        return _Compiler(rest, prefix, values).run(to_channels_last(head.clone()))


class FastPoints:
    """Loss (and metric) of one batch at each point of a chunk, one point at a time."""

    def __init__(
        self,
        steps: list[Step],
        theta: dict[str, Tensor],
        others: dict[str, Tensor],
        D: dict[str, Tensor],
        head: Tensor,
        deltas: Tensor,
        loss: Callable[[Tensor], tuple[Tensor, ...]],
    ) -> None:
        self.head = to_channels_last(head)
        self.deltas = [to_channels_last(d) for d in deltas]
        self.loss = loss
        self._key: list[float] | None = None
        self._cache: list[Tensor] = []
        self.plan: list[tuple[Kernel, list[tuple[Tensor, list[Tensor]]]]] = []
        for kernel, names, tfs in steps:
            args = []
            for tf, n in zip(tfs, names, strict=True):
                if n in theta:
                    args.append((tf(theta[n]), [tf(d).contiguous() for d in D[n]]))
                else:
                    args.append((tf(others[n]), []))
            self.plan.append((kernel, args))

    @staticmethod
    def _partial(base: Tensor, dirs: list[Tensor], c: list[float]) -> Tensor:
        """``base + sum_k c[k] dirs[k]`` over all directions but the last."""
        if len(dirs) < 2:
            return base
        out = torch.add(base, dirs[0], alpha=c[0])
        for ck, dk in zip(c[1:-1], dirs[1:-1], strict=True):
            out.add_(dk, alpha=ck)
        return out

    def _row(self, c: list[float]) -> list[Tensor]:
        """Partial sums shared by a row of the grid (all coefficients but the last equal)."""
        key = c[:-1]
        if self._key != key:
            self._key = key
            self._cache = [self._partial(self.head, self.deltas, c)] + [
                self._partial(base, dirs, c) for _, args in self.plan for base, dirs in args
            ]
        return self._cache

    def __call__(self, coefficients: Tensor) -> list[Tensor]:
        values: list[tuple[Tensor, ...]] = []
        last = [self.deltas[-1]] + [dirs[-1] if dirs else None
                                    for _, args in self.plan for _, dirs in args]  # fmt: skip
        for c in coefficients.tolist():
            row = self._row(c)
            moved = [r if d is None else torch.add(r, d, alpha=c[-1])
                     for r, d in zip(row, last, strict=True)]  # fmt: skip
            h, k = moved[0], 1
            for kernel, args in self.plan:
                h = kernel(h, moved[k : k + len(args)])
                k += len(args)
            values.append(self.loss(h))
        return [torch.stack(v) for v in zip(*values, strict=True)]
