r"""The curvature products of `ModelObjective`: $\nabla^2 L\,V$ and $J^\top H_\ell J\,V$.

`ObjectiveProducts` holds the public product methods of the objective (a mixin of
`sharpgen.curvature.ModelObjective`, which supplies the `Objective` it is cast to); the
dataset pass itself is `sharpgen.curvature._products.product`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import Tensor

from sharpgen.curvature._backend import check_backend
from sharpgen.curvature._interface import Objective
from sharpgen.curvature._kernels import GGN, HESSIAN, Kernel
from sharpgen.curvature._products import block_views, product

__all__ = ["ObjectiveProducts"]


class ObjectiveProducts:
    """Hessian and GGN block products of an objective (mixed into `ModelObjective`)."""

    _graph_cache: Any
    _first_graph: Any

    def hvp(
        self,
        V: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None = None,
        *,
        backend: str = "func",
        cache: bool = False,
    ) -> dict[str, Tensor]:
        r"""Hessian-block product $\nabla^2 L(\theta)\, V$ for ``k`` tangents at once.

        Args:
            V: Name -> tensor of shape ``(k, *shape)``: ``k`` tangent directions.
            params: Point $\theta$ (default: the base point).
            backend: ``"func"`` (``torch.func``: ``vjp`` or ``jvp`` of ``grad``, see
                ``func_mode``, with ``vmap`` over the ``k`` tangents; one pass over the
                data), ``"autograd"`` (double backward, one pass over the data, ``k``
                backward passes per batch) or ``"auto"`` (``"func"``, falling back to
                ``"autograd"``).
            cache: With ``params=None``: keep the gradient graphs between calls, so that
                each product is one more backward pass (reverse-over-reverse; with
                ``backend="func"`` through ``torch.func.vjp`` of ``torch.func.grad``, one
                batch only; several batches with ``"autograd"``, memory permitting, see
                `HessianOperator`). The graphs are rebuilt when the model's non-selected
                parameters or buffers change, and hold the activations' memory until
                `clear_cache`.

        Returns:
            Name -> tensor of shape ``(k, *shape)``.
        """
        return self._block(HESSIAN, V, params, backend, cache)

    def ggn_vp(
        self,
        V: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None = None,
        *,
        backend: str = "func",
        cache: bool = False,
    ) -> dict[str, Tensor]:
        r"""Generalized Gauss-Newton product $J^\top H_\ell J\, V$ for ``k`` tangents.

        $J$ is the Jacobian of the model outputs w.r.t. the selected parameters and
        $H_\ell$ the Hessian of ``loss_fn`` w.r.t. the outputs, per batch; batches are
        combined like the loss. Arguments as in `hvp`.
        """
        return self._block(GGN, V, params, backend, cache)

    def _block(
        self,
        kernel: Kernel,
        V: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None,
        backend: str,
        cache: bool,
    ) -> dict[str, Tensor]:
        check_backend(backend)
        obj = cast(Objective, self)
        buf, _ = product(obj, kernel, V, params, backend=backend, cache=cache,
                         owner="ModelObjective")  # fmt: skip
        return block_views(buf, obj.resolve(params))

    def clear_cache(self) -> None:
        """Drop a cached gradient graph (see ``cache`` in `hvp`)."""
        self._graph_cache = None
        self._first_graph = None
