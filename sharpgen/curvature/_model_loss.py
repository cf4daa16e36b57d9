r"""The loss a model computes itself (Hugging Face models with ``labels`` in the batch).

Token-level losses and sample weighting: the objective weights every batch by its number of
samples, the rows of its first input tensor (the sequences of ``input_ids``). A Hugging Face
language model's ``outputs.loss`` is the mean over the batch's labelled tokens, so the dataset
loss is $\sum_b n_b \ell_b / N$ with $n_b$ sequences per batch: the token mean of the whole
data set when every batch holds as many labelled tokens per sequence (fixed-length blocks, as
in the usual causal-LM preprocessing, or a single batch), and otherwise a mean of per-batch
token means weighted by sequences. For the exact token mean with uneven batches pass a
``loss_fn`` that returns the batch's token *sum* and ``reduction="sum"``, and divide by the
number of tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["check_loss_of_outputs", "model_loss"]


def model_loss(outputs: Any, targets: Any = None) -> Tensor:
    """The loss the model returned: ``outputs.loss`` (or ``outputs["loss"]``).

    The ``loss_fn`` for models that compute their own loss from labels in their inputs, as
    every Hugging Face ``...ForSequenceClassification`` / ``...ForCausalLM`` model does with
    ``labels`` in the batch; ``loss_fn=None`` means this function. ``targets`` is ignored
    (it is None for a dict batch). See the module note for how samples are counted.

    Raises:
        ValueError: The outputs hold no loss (no labels in the batch).

    Example:
        >>> import torch
        >>> class Model(torch.nn.Module):
        ...     def forward(self, x, labels):
        ...         return {"loss": torch.nn.functional.mse_loss(x, labels)}
        >>> float(model_loss(Model()(x=torch.ones(2), labels=torch.zeros(2))))
        1.0
    """
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "loss_fn=None (model_loss) uses the loss the model returns, but the model returned "
            f"none ({type(outputs).__name__} without a 'loss'); put the labels in the batch "
            "(e.g. batch['labels'] for a Hugging Face model) or pass "
            "loss_fn=(outputs, targets) -> loss."
        )
    return loss


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def check_loss_of_outputs(outputs: Any, loss: Tensor) -> None:
    r"""Refuse a GGN whose loss is a tensor among the model's outputs (``outputs.loss``).

    The GGN $J^\top H_\ell J$ differentiates the loss twice in the model's outputs; a loss
    the model computed itself is one of those outputs, so $H_\ell = 0$ and the GGN would be
    silently zero.

    Raises:
        ValueError: ``loss`` shares its one element with a tensor of ``outputs``.
    """
    ptr = loss.data_ptr()
    if any(t.numel() == 1 and t.data_ptr() == ptr for t in _tensors(outputs)):
        raise ValueError(
            "the GGN needs the loss as a function of the model's outputs, but loss_fn returns "
            "the loss the model computed itself (outputs.loss: loss_fn=None or model_loss), "
            "whose Hessian in the outputs is zero; pass loss_fn=(outputs, targets) -> loss "
            "computed from the outputs, e.g. lambda out, y: F.cross_entropy(out.logits, y), "
            "with the labels as targets."
        )
