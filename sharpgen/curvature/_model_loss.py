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

__all__ = ["model_loss"]


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
