"""Built-in torch operations without a second derivative: found before the first product.

Some torch operators have a backward that torch cannot differentiate again (and no
forward-mode derivative either), so a Hessian-vector product through them fails deep inside
torch, and so does the GGN's Jacobian-vector product. A scan of torch 2.13 (every
``torch.nn.functional`` layer and loss, the linear-algebra, reduction, pooling, padding,
upsampling, normalization and recurrent operators, differentiated twice in float64 on the
CPU) found the operators of `NO_SECOND_DERIVATIVE` (hardsigmoid was added after the
torchvision benchmark found it in MobileNetV3); the cuDNN/MIOpen RNN and the fused
attention kernels are known from torch's derivative table (on CUDA the fused attention is
avoided by `sharpgen.curvature._attention`, so it appears only when a model calls the aten
kernel directly).

`builtin_first_order` walks the loss graph of the first batch (which the objective builds
anyway to validate the data) for their nodes; where one is found it runs the first batch
once more with forward hooks on every submodule to name the module the operation sits in
(the innermost module whose output depends on the node while its inputs do not), or says
that it is in ``loss_fn``. The result, a `BuiltinOp` per operation, goes with the custom
Functions of `sharpgen.curvature._second_order` to the check at the first curvature product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

__all__ = ["NO_SECOND_DERIVATIVE", "BuiltinOp", "builtin_first_order", "builtin_message"]

_SDPA_FIX = (
    "call torch.nn.functional.scaled_dot_product_attention instead of the aten kernel (sharpgen "
    "runs it through its twice-differentiable math path during curvature work)"
)
_CTC_FIX = (
    "there is no twice-differentiable CTC loss in torch; measure the curvature with a loss "
    "that has a second derivative (e.g. a cross-entropy on aligned targets), or use the "
    "first-order measures"
)
_RNN_FIX = (
    "take the measure under `with torch.backends.cudnn.flags(enabled=False):` (the native "
    "RNN kernels have a second derivative)"
)

#: grad_fn class name -> (operation, fix). See the module note for how it was found.
NO_SECOND_DERIVATIVE: dict[str, tuple[str, str]] = {
    "EmbeddingBagBackward0": (
        "embedding_bag (nn.EmbeddingBag / F.embedding_bag)",
        "replace nn.EmbeddingBag(mode='sum' or 'mean') by nn.Embedding followed by .sum(1) or "
        ".mean(1) over the bag dimension (the same function, with a second derivative)",
    ),
    "CdistBackward0": (
        "torch.cdist",
        "compute the distances as torch.linalg.vector_norm(x1[..., :, None, :] - "
        "x2[..., None, :, :], dim=-1)",
    ),
    "PdistBackward0": (
        "F.pdist",
        "compute the pairwise distances with torch.linalg.vector_norm of the differences and "
        "keep the upper triangle (torch.triu_indices)",
    ),
    "MultiMarginLossBackward0": (
        "F.multi_margin_loss (nn.MultiMarginLoss)",
        "write the hinge with torch operations: (margin - x.gather(1, y[:, None]) + x)"
        ".clamp(min=0) without the target column, averaged",
    ),
    "MultilabelMarginLossBackward0": (
        "F.multilabel_margin_loss (nn.MultiLabelMarginLoss)",
        "write the hinge with torch operations (clamp, gather), or use "
        "F.multilabel_soft_margin_loss",
    ),
    "HardsigmoidBackward0": (
        "hardsigmoid (nn.Hardsigmoid / F.hardsigmoid, e.g. in MobileNetV3's squeeze-excitation)",
        "write it as F.relu6(x + 3) / 6 (the same function, twice differentiable: its second "
        "derivative is 0 almost everywhere)",
    ),
    "CtcLossBackward0": ("F.ctc_loss (nn.CTCLoss)", _CTC_FIX),
    "CudnnCtcLossBackward0": ("F.ctc_loss (cuDNN)", _CTC_FIX),
    "SegmentReduceBackward0": (
        "torch.segment_reduce",
        "sum the segments with Tensor.index_add / scatter_add",
    ),
    "CudnnRnnBackward0": ("a cuDNN RNN (nn.LSTM / nn.GRU / nn.RNN on CUDA)", _RNN_FIX),
    "MiopenRnnBackward0": ("a MIOpen RNN (nn.LSTM / nn.GRU / nn.RNN on ROCm)", _RNN_FIX),
    "ScaledDotProductFlashAttentionForCpuBackward0": ("a fused attention kernel", _SDPA_FIX),
    "ScaledDotProductFlashAttentionBackward0": ("a fused attention kernel", _SDPA_FIX),
    "ScaledDotProductEfficientAttentionBackward0": ("a fused attention kernel", _SDPA_FIX),
    "ScaledDotProductCudnnAttentionBackward0": ("a fused attention kernel", _SDPA_FIX),
}


class BuiltinOp(str):
    """A built-in operation without a second derivative: its grad_fn name, op, place, fix."""

    op: str
    place: str
    fix: str

    @classmethod
    def make(cls, node_name: str, place: str) -> BuiltinOp:
        """The entry for grad_fn class ``node_name`` found in ``place``."""
        out = cls(node_name)
        out.op, out.fix = NO_SECOND_DERIVATIVE[node_name]
        out.place = place
        return out


def _walk(roots: Iterable[Any], stop: set[int]) -> Iterable[Any]:
    """The autograd nodes reachable from ``roots``, not going past the ids in ``stop``."""
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen or id(node) in stop:
            continue
        seen.add(id(node))
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def _bad_names(loss: Tensor) -> list[str]:
    names = {type(n).__name__ for n in _walk([loss.grad_fn], set())}
    return sorted(names & set(NO_SECOND_DERIVATIVE))


def _locate(model: nn.Module, run: Callable[[], Any], names: list[str]) -> dict[str, str]:
    """grad_fn name -> the innermost module of ``model`` that creates such a node."""
    found: dict[str, tuple[int, str]] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            inputs = {id(t.grad_fn) for t in _tensors((args, kwargs)) if t.grad_fn is not None}
            roots = [t.grad_fn for t in _tensors(output)]
            inside = {type(n).__name__ for n in _walk(roots, inputs)}
            depth = path.count(".") + 1 if path else 0
            for name in names:
                if name in inside and (name not in found or depth > found[name][0]):
                    where = f"module {path!r} ({type(module).__name__})" if path else "the model"
                    found[name] = (depth, where)

        return hook

    handles = [m.register_forward_hook(hook_for(path), with_kwargs=True)
               for path, m in model.named_modules()]  # fmt: skip
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {name: where for name, (_, where) in found.items()}


def builtin_first_order(model: nn.Module, loss: Tensor, run: Callable[[], Any]) -> list[str]:
    """The built-in operations without a second derivative in ``loss``'s graph.

    Args:
        model: The model (its submodules get forward hooks for one more forward, and only
            when an operation is found; the hooks are removed, also after an exception).
        loss: The first batch's loss, with its graph.
        run: Recomputes that loss (for the module search).

    Returns:
        One `BuiltinOp` per operation found (empty for almost every model).
    """
    names = _bad_names(loss)
    if not names:
        return []
    places = _locate(model, run, names)
    return [BuiltinOp.make(n, places.get(n, "loss_fn (outside the model)")) for n in names]


def builtin_message(ops: list[BuiltinOp], where: str, ggn_works: bool = False) -> str:
    """The error for built-in operations without a second derivative.

    ``ggn_works``: every operation is inside the model, so the GGN measures run (by the
    reverse-mode route of `sharpgen.curvature._ggn_reverse`) and the message says so.
    """
    listed = "; ".join(f"{o.op} in {o.place} -- fix: {o.fix}" for o in ops)
    head = (
        f"{where}: the loss goes through operation(s) that torch cannot differentiate twice "
        f"(their backward has no derivative, nor a forward-mode derivative): {listed}. No "
        "Hessian-vector product can be computed through them."
    )
    if ggn_works:
        ggn = (
            " The GGN measures work on this model as it is (they need only the model's first "
            "derivatives, taken by reverse mode, and the loss's second derivative in the "
            "outputs): ggn_trace, and GGNOperator for the GGN's top eigenvalues "
            "(top_eigenvalues(GGNOperator(model, loss_fn, data)))."
        )
    else:
        ggn = (
            " Neither can a GGN product (the operation is in loss_fn, which the GGN "
            "differentiates twice in the outputs)."
        )
    return (
        head + ggn + " The first-order measures (sam_sharpness, average_sharpness, the loss "
        "and its gradient) work as they are."
    )
