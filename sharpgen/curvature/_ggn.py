"""The generalized Gauss-Newton matrix as a matrix-free linear operator."""

from __future__ import annotations

from sharpgen.curvature._base import CurvatureOperator
from sharpgen.curvature._kernels import GGN

__all__ = ["GGNOperator"]


class GGNOperator(CurvatureOperator):
    r"""Generalized Gauss-Newton matrix $G = \sum_b w_b\, J_b^\top H_{\ell,b} J_b$.

    For batch $b$, $J_b = \partial f(\theta; x_b) / \partial \theta$ is the Jacobian of the
    model outputs and $H_{\ell,b} = \nabla^2_f \ell(f, y_b)$ the Hessian of ``loss_fn``
    with respect to the outputs; the weights $w_b$ are those of the dataset loss
    ($n_b / N$ for ``reduction="mean"``, $1$ for ``"sum"``). $G$ is the Hessian without
    the term that involves the second derivatives of the model, and it is positive
    semi-definite for convex losses (MSE, cross-entropy).

    Products are exact: $J v$ by ``torch.func.jvp``, $H_\ell (Jv)$ by forward-over-reverse on
    ``loss_fn``, $J^\top(\cdot)$ by ``torch.func.vjp``; a block of ``k`` columns goes through
    ``vmap`` in one pass over the data. ``backend="autograd"`` uses the double-vjp trick for
    $Jv$ and reverse mode for the rest (models returning one tensor). Where the model goes
    through an operation without a second derivative (``nn.EmbeddingBag``), products take
    the reverse-mode-only route of `sharpgen.curvature._ggn_reverse` (one backward pass per
    output entry of a batch, the dense $J_b$ kept). Arguments, backends,
    errors and the model-state contract are those of `HessianOperator`.

    Examples:
        >>> import torch
        >>> from sharpgen.curvature import HessianOperator
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> y = torch.zeros(8, 1, dtype=torch.float64)
        >>> G = GGNOperator(model, torch.nn.functional.mse_loss, (x, y))
        >>> H = HessianOperator(model, torch.nn.functional.mse_loss, (x, y))
        >>> bool(torch.allclose(G.to_dense(), H.to_dense()))  # linear model: G == H
        True
    """

    kernel = GGN
