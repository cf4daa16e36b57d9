r"""Directions in parameter space for loss-landscape pictures.

A direction is a dict name -> tensor shaped like the selected parameters. Random
directions are Gaussian and then normalized against the parameters $\theta$:

* ``"filter"`` (Li et al. 2018): every filter $d_{i,j}$ (slice ``j`` along the first
  dimension of a weight with two or more dimensions: a row of a linear layer, an output
  channel of a convolution) is rescaled to the norm of the matching filter of $\theta$,
  $d_{i,j} \leftarrow d_{i,j}\,\|\theta_{i,j}\| / \|d_{i,j}\|$;
* ``"layer"``: every parameter tensor is rescaled to the norm of $\theta_i$;
* ``"none"``: the raw Gaussian direction.

One-dimensional parameters (biases, normalization scales and shifts) are set to zero by
default, as in Li et al.'s reference setting (``one_dim="zero"``), or normalized like a
single filter (``one_dim="normalize"``). Filter normalization makes pictures of networks
with scale symmetries comparable: a ReLU layer rescaled by $a$ gets a direction $a$ times
larger.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._validation import check_choice, check_generator, check_int, check_positive
from sharpgen.curvature import ModelObjective, select_params, unflatten_params
from sharpgen.curvature._params import ParamSelection
from sharpgen.landscape._args import check_direction_like, check_tensor_map
from sharpgen.linalg._reduce import norm as accurate_norm

__all__ = [
    "NORMALIZATIONS",
    "hessian_directions",
    "normalize_direction",
    "random_direction",
]

NORMALIZATIONS = ("filter", "layer", "none")
ONE_DIM = ("zero", "normalize", "keep")


def _rescale(d: Tensor, ref: Tensor) -> Tensor:
    """``d`` scaled to the norm of ``ref``; whole-tensor norms summed accurately (`_reduce`)."""
    size = accurate_norm(d.reshape(-1))
    factor = (accurate_norm(ref.reshape(-1)) / size).to(d.dtype) if size > 0 else None
    return d * factor if factor is not None else torch.zeros_like(d)


def normalize_direction(
    direction: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    normalization: str = "filter",
    *,
    one_dim: str = "zero",
) -> dict[str, Tensor]:
    r"""Normalize a direction against the parameters (filter-, layer-wise or not at all).

    Args:
        direction: Name -> tensor shaped like ``params``.
        params: The point $\theta$ (name -> tensor).
        normalization: ``"filter"``, ``"layer"`` or ``"none"`` (see the module docs).
        one_dim: For parameters with fewer than two dimensions: ``"zero"`` (default),
            ``"normalize"`` (rescaled to the parameter's norm) or ``"keep"`` (left as given).

    Returns:
        A new dict.

    Raises:
        TypeError: ``direction`` or ``params`` is not a dict of floating-point tensors.
        ValueError: Unknown ``normalization``/``one_dim``, or names/shapes that differ.

    Examples:
        >>> import torch
        >>> theta = {"w": torch.tensor([[3.0, 4.0], [0.0, 1.0]]), "b": torch.ones(2)}
        >>> d = {"w": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "b": torch.ones(2)}
        >>> out = normalize_direction(d, theta)
        >>> out["w"].tolist(), out["b"].tolist()
        ([[5.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    """
    normalization = check_choice("normalization", normalization, NORMALIZATIONS)
    one_dim = check_choice("one_dim", one_dim, ONE_DIM)
    params = check_tensor_map("params", params)
    direction = check_direction_like(direction, params)
    out = {}
    for name, ref in params.items():
        d = direction[name]
        if ref.ndim < 2 and one_dim != "keep":
            out[name] = torch.zeros_like(d) if one_dim == "zero" else _rescale(d, ref)
        elif normalization == "none" or ref.ndim < 2:
            out[name] = d.clone()
        elif normalization == "layer":
            out[name] = _rescale(d, ref)
        else:
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            rn = ref.reshape(ref.shape[0], -1).norm(dim=1)
            factor = torch.where(dn > 0, rn / dn.clamp_min(torch.finfo(d.dtype).tiny), 0.0)
            out[name] = d * factor.reshape(-1, *([1] * (d.ndim - 1)))
    return out


def random_direction(
    params: Mapping[str, Tensor] | nn.Module,
    normalization: str = "filter",
    *,
    one_dim: str = "zero",
    generator: torch.Generator | None = None,
    select: ParamSelection = None,
) -> dict[str, Tensor]:
    """A Gaussian direction, normalized against the parameters.

    Args:
        params: A dict name -> tensor, or a module (its selected parameters).
        normalization: ``"filter"`` (Li et al. 2018, default), ``"layer"`` or ``"none"``.
        one_dim: ``"zero"`` (default), ``"normalize"`` or ``"keep"`` for 1-D parameters.
        generator: Source of the Gaussian numbers (drawn on the generator's device, in
            float64, then converted); the global RNG is untouched when given.
        select: Parameter selection when ``params`` is a module.

    Returns:
        A dict name -> tensor (detached, same dtype and device as the parameters).

    Raises:
        TypeError, ValueError: A bad argument; all are checked before the first number is
            drawn, so the generator is untouched by a refused call.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> d = random_direction(model, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(d["weight"].norm(dim=1), model.weight.detach().norm(dim=1))
        True
        >>> d["bias"].abs().sum().item()
        0.0

    References:
        H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the loss landscape
        of neural nets", NeurIPS 2018.
    """
    generator = check_generator(generator)
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_choice("one_dim", one_dim, ONE_DIM)
    if isinstance(params, nn.Module):
        params = select_params(params, select)
    elif select is not None:
        raise TypeError("select is only for a module as params; a dict is used as it is.")
    checked = check_tensor_map("params", params, module_ok=True)
    theta = {n: t.detach() for n, t in checked.items()}
    where = generator.device if generator is not None else None
    raw = {
        n: torch.randn(t.shape, generator=generator, dtype=torch.float64, device=where).to(
            dtype=t.dtype, device=t.device
        )
        for n, t in theta.items()
    }
    return normalize_direction(raw, theta, normalization, one_dim=one_dim)


def hessian_directions(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    k: int = 2,
    *,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    params: ParamSelection = None,
    bn: str = "eval",
    reduction: str = "mean",
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """The top-``k`` Hessian eigenvectors as unit-norm directions, with their eigenvalues.

    Lanczos (`sharpgen.lanczos`, its default reorthogonalization) on the Hessian of the dataset
    loss; the eigenvectors are unit vectors in the space of the selected parameters.

    Args:
        model: Any ``nn.Module`` or a ready `sharpgen.ModelObjective`.
        loss_fn: ``loss_fn(outputs, targets)``; None: the loss the model returns
            (`sharpgen.model_loss`).
        data: One batch or an iterable of batches.
        k: Number of directions (largest eigenvalues first).
        tol: Relative accuracy of the eigenvalues (see `sharpgen.lanczos`).
        generator: Source of the Lanczos start vector.
        params: Parameter selection.
        bn: ``"eval"`` or ``"batch"``.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        ``(directions, eigenvalues)``: ``k`` dicts and a ``(k,)`` tensor.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> dirs, eigs = hessian_directions(model, torch.nn.functional.mse_loss,
        ...                                 (x, torch.zeros(2, 1).double()), k=1,
        ...                                 generator=torch.Generator().manual_seed(0))
        >>> round(float(eigs[0]), 6), round(abs(float(dirs[0]["weight"][0, 1])), 6)
        (4.0, 1.0)
    """
    from sharpgen.linalg import lanczos
    from sharpgen.sharpness._objective_arg import objective_of
    from sharpgen.sharpness._operators import ObjectiveOperator

    k = check_int("k", k)
    tol = check_positive("tol", tol)
    generator = check_generator(generator)
    obj = objective_of(model, loss_fn, data, params, bn=bn, reduction=reduction,
                       where="hessian_directions")  # fmt: skip
    res = lanczos(ObjectiveOperator(obj, "hvp"), k=k, tol=tol, generator=generator)
    dirs = [
        {n: t.clone() for n, t in unflatten_params(res.eigenvectors[:, i], obj.params).items()}
        for i in range(res.eigenvalues.numel())
    ]
    return dirs, res.eigenvalues
