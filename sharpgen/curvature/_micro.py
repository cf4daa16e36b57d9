r"""Micro-batches: one batch split into pieces of at most ``micro_batch_size`` samples.

With ``micro_batch_size=m`` a `ModelObjective` evaluates a batch of $n > m$ samples as the
$\lceil n/m \rceil$ micro-batches of samples ``[0, m)``, ``[m, 2m)``, ... (the last one
possibly smaller) and weights them like batches: with ``reduction="mean"`` a micro-batch
of $n_i$ samples has the weight $n_i$ and the sum is divided by $N$, so

$$ \frac{1}{N} \sum_i n_i\, \ell_i = \ell \quad\text{and}\quad
\sum_i n_i \nabla^2 \ell_i\, v \big/ N = \nabla^2 \ell\, v $$

whenever ``loss_fn`` is a mean over samples (or over tokens, with the same number of
counted tokens per sample); with ``reduction="sum"`` the micro-batch sums add up to the
batch sum. The loss, gradient and every curvature product are then sums of the
micro-batches' terms and equal the whole batch's to float rounding, while the
activations and graphs held at once are those of one micro-batch (about $m/n$ of the
batch's).

**What is split.** Every tensor of ``inputs`` and ``targets`` (a tensor, a tuple/list or a
dict of tensors, as Hugging Face models take them) whose leading size is the batch's
sample count $n$ is sliced along that dimension; other entries (``None``, numbers, a
tensor broadcast over the batch such as a ``(1, T)`` position tensor) go unchanged to
every micro-batch.

**Chosen.** ``micro_batch_size="auto"`` measures the graph of the first samples and takes
the largest size that fits the memory budget (None where the whole batch fits), see
`sharpgen.curvature._auto_micro`.

**Refused.** BatchNorm normalizing with batch statistics (``bn="batch"`` on a model with
a BatchNorm layer): the statistics of a micro-batch are not those of the batch, so the
value would change with the split. With ``bn="eval"`` (running statistics) the split is
exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sharpgen._validation import is_int
from sharpgen.curvature._data import num_samples

__all__ = ["check_micro_batch_size", "micro_batches", "refuse_batch_statistics"]


def check_micro_batch_size(micro_batch_size: object) -> int | str | None:
    """Return ``micro_batch_size`` if it is None, ``"auto"`` or a positive int, else raise.

    Raises:
        ValueError: Any other value (``"autox"``, 0, -1, 1.5, True, ...).
    """
    if micro_batch_size is None or micro_batch_size == "auto":
        return micro_batch_size
    if is_int(micro_batch_size) and int(micro_batch_size) >= 1:  # type: ignore[call-overload]
        return int(micro_batch_size)  # type: ignore[call-overload]
    raise ValueError(
        f"micro_batch_size must be None (whole batches), 'auto' (the largest micro-batch "
        f"whose graph fits the memory budget) or a positive int of samples, got "
        f"{type(micro_batch_size).__name__} {micro_batch_size!r}; pass e.g. "
        "micro_batch_size=4 or micro_batch_size='auto'."
    )


def refuse_batch_statistics(model: nn.Module, bn: str, micro_batch_size: int | str | None) -> None:
    """Raise `ValueError` for micro-batches of a model normalized with batch statistics."""
    if micro_batch_size is None or bn != "batch":
        return
    names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if names:
        raise ValueError(
            f"micro_batch_size={micro_batch_size!r} with bn='batch' would normalize each "
            f"micro-batch with its own statistics (BatchNorm layers {names[:3]}), so the value "
            "would change with the split; use bn='eval' (running statistics) or "
            "micro_batch_size=None."
        )


def _slice(x: Any, start: int, stop: int, n: int) -> Any:
    if isinstance(x, Tensor):
        return x[start:stop] if x.ndim > 0 and x.shape[0] == n else x
    if isinstance(x, Mapping):
        return {k: _slice(v, start, stop, n) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_slice(v, start, stop, n) for v in x)
    if isinstance(x, list):
        return [_slice(v, start, stop, n) for v in x]
    return x


def micro_batches(inputs: Any, targets: Any, size: int | None) -> Iterator[tuple[Any, Any]]:
    """The micro-batches of one batch (the batch itself where it has at most ``size``).

    Examples:
        >>> import torch
        >>> x, y = torch.arange(5.0).reshape(5, 1), torch.arange(5)
        >>> [tuple(b.tolist()) for _, b in micro_batches(x, y, 2)]
        [(0, 1), (2, 3), (4,)]
    """
    n = num_samples(inputs)
    if size is None or n <= size:
        yield inputs, targets
        return
    for start in range(0, n, size):
        stop = min(n, start + size)
        yield _slice(inputs, start, stop, n), _slice(targets, start, stop, n)
