"""Converting between parameter dicts and flat vectors (or blocks of vectors)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["flatten_params", "unflatten_params"]


def flatten_params(d: Mapping[str, Tensor], *, batched: bool = False) -> Tensor:
    r"""Concatenate a parameter dict into one vector, in dict order.

    Args:
        d: Name -> tensor. All tensors must share dtype and device.
        batched: If ``False`` (default) return a 1-D vector of length
            $n = \sum_i \text{numel}(d_i)$. If ``True`` every tensor carries a leading
            dimension ``k`` (shape ``(k, *shape)``) and the result is the ``(n, k)`` block
            whose column ``j`` is the flattened ``{name: d[name][j]}``; this is the inverse
            of ``unflatten_params`` on a 2-D block.

    Returns:
        A new tensor of shape ``(n,)`` or ``(n, k)``.

    Raises:
        ValueError: If ``d`` is empty, or (``batched=True``) the leading sizes differ.
        TypeError: If the tensors have different dtypes.

    Examples:
        >>> import torch
        >>> d = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
        >>> flatten_params(d).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    """
    if len(d) == 0:
        raise ValueError("d is empty; pass a dict with at least one tensor.")
    dtypes = {t.dtype for t in d.values()}
    if len(dtypes) > 1:
        raise TypeError(
            f"the tensors of d have several dtypes {sorted(map(str, dtypes))}; convert them "
            "to one dtype first."
        )
    if not batched:
        return torch.cat([t.reshape(-1) for t in d.values()])
    ks = {t.shape[0] if t.ndim > 0 else None for t in d.values()}
    if len(ks) != 1 or None in ks:
        raise ValueError(
            "with batched=True every tensor needs the same leading size k, got "
            f"{sorted(ks, key=str)}."
        )
    (k,) = ks
    assert k is not None  # checked above
    return torch.cat([t.reshape(k, -1) for t in d.values()], dim=1).T.contiguous()


def unflatten_params(vec: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    r"""Split a vector (or a block of vectors) into a dict shaped like ``like``.

    Args:
        vec: A 1-D tensor of length $n = \sum_i \text{numel}(\text{like}_i)$, or a 2-D
            block ``(n, k)`` of ``k`` such vectors as columns.
        like: Name -> tensor giving names, order and shapes (values are not used).

    Returns:
        For a 1-D ``vec`` a dict of views of ``vec`` with the shapes of ``like``; for a 2-D
        block a dict name -> tensor of shape ``(k, *shape)`` (entry ``[j]`` belongs to
        column ``j``), which is the layout `torch.func.vmap` expects.

    Raises:
        ValueError: If the length of ``vec`` does not match ``like`` or ``vec`` is not 1-D
            or 2-D.

    Examples:
        >>> import torch
        >>> like = {"w": torch.empty(2, 2), "b": torch.empty(2)}
        >>> out = unflatten_params(torch.arange(6.0), like)
        >>> out["w"].tolist(), out["b"].tolist()
        ([[0.0, 1.0], [2.0, 3.0]], [4.0, 5.0])
    """
    if not isinstance(vec, Tensor):
        raise TypeError(f"vec must be a torch.Tensor, got {type(vec).__name__}.")
    n = sum(t.numel() for t in like.values())
    if vec.ndim not in (1, 2) or vec.shape[0] != n:
        raise ValueError(
            f"vec has shape {tuple(vec.shape)} but the parameters have {n} entries; pass a "
            f"vector of shape ({n},) or a block of shape ({n}, k)."
        )
    out: dict[str, Tensor] = {}
    offset = 0
    for name, t in like.items():
        size = t.numel()
        piece = vec[offset : offset + size]
        if vec.ndim == 1:
            out[name] = piece.view(t.shape)
        else:
            out[name] = piece.T.reshape(vec.shape[1], *t.shape)
        offset += size
    return out
