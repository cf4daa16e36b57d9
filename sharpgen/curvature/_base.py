"""The base class of the curvature operators: a kernel applied over one objective."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from sharpgen._validation import check_bool, is_int
from sharpgen.curvature._backend import check_backend
from sharpgen.curvature._flatten import flatten_params, unflatten_params
from sharpgen.curvature._kernels import Kernel
from sharpgen.curvature._params import ParamSelection
from sharpgen.curvature._products import kept_matvec, product
from sharpgen.curvature._resolve import ready_objective, resolve_objective
from sharpgen.linalg import LinearOperator
from sharpgen.linalg._operator import check_product

__all__ = ["CurvatureOperator"]


class CurvatureOperator(LinearOperator):
    """A `LinearOperator` whose products are ``kernel`` over one objective (not public).

    A subclass names its kernel (`sharpgen.curvature._kernels`) and documents the
    matrix; the objective comes from ``(model, loss_fn, data, **objective_options)`` or is
    a ready `ModelObjective` (then only the operator options below may be given).
    """

    kernel: ClassVar[Kernel]

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        data: Any = None,
        params: ParamSelection = None,
        *,
        backend: str | None = None,
        check_deterministic: bool = False,
        cache_graph: bool | str = "auto",
        max_block: int | None = 16,
        **objective_options: Any,
    ) -> None:
        if backend is not None:
            check_backend(backend)
        check_bool("check_deterministic", check_deterministic)
        if max_block is not None and (not is_int(max_block) or max_block < 1):
            raise ValueError(
                f"max_block must be a positive int or None (no limit), got {max_block!r}."
            )
        if cache_graph != "auto" and not isinstance(cache_graph, bool):
            raise TypeError(f"cache_graph must be True, False or 'auto', got {cache_graph!r}.")
        if params is not None:
            objective_options["params"] = params
        if backend is not None and ready_objective(model) is None:
            objective_options["backend"] = backend
        self.objective = resolve_objective(
            model, loss_fn, data, objective_options, where=type(self).__name__
        )
        super().__init__(self.objective.numel, self.objective.accum_dtype, self.objective.device)
        self._backend = backend if backend is not None else self.objective.backend
        obj = self.objective
        several = obj.bn == "eval" and not obj.dropout and self._backend != "func"
        if cache_graph is True and not obj.single_batch and not several:
            warnings.warn(
                "cache_graph=True keeps the gradient graphs of several batches only with "
                "bn='eval', dropout=False and double backward (backend 'autograd', or 'auto' "
                "on a CPU): no graph is kept and every product passes over the data. Pass the "
                "data as one (inputs, targets) batch to cache it, or cache_graph=False.",
                UserWarning,
                stacklevel=3,
            )
        self.cache_graph = cache_graph
        self.max_block = max_block
        if check_deterministic:
            self.objective.check_deterministic()

    # -- convenience ------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Tensor]:
        """The selected parameters at the base point (detached copies)."""
        return self.objective.params

    @property
    def backend(self) -> str:
        """The backend in use: ``"func"`` or ``"autograd"`` (``"auto"`` until first product)."""
        return self._backend

    @property
    def num_samples(self) -> int:
        """Number of samples in the data (see `ModelObjective.num_samples`)."""
        return self.objective.num_samples

    def flatten(self, d: Mapping[str, Tensor]) -> Tensor:
        """Flatten a dict shaped like `params` into a vector (see `flatten_params`)."""
        missing = [n for n in self.params if n not in d]
        if missing:
            raise ValueError(f"d lacks the parameters {missing}; it needs {list(self.params)}.")
        return flatten_params({n: d[n] for n in self.params})

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a vector (or an ``(n, k)`` block) into a dict like `params`."""
        return unflatten_params(vec, self.params)

    def loss(self) -> Tensor:
        """Dataset loss at the base point."""
        return self.objective.loss()

    def gradient(self) -> Tensor:
        """Flat gradient of the dataset loss at the base point."""
        return self.flatten(self.objective.gradient())

    # -- products ----------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for a vector ``v`` of shape ``(n,)``; counts one product.

        With ``cache_graph=True`` and the graphs kept, the product is one backward pass
        per batch through them and one concatenation (no block buffers), with the same
        checks: input, a still valid cache, finiteness.
        """
        if self.cache_graph and isinstance(v, Tensor) and v.ndim == 1:
            self._check_input(v, "v")
            out = kept_matvec(self.objective, self.kernel, v.contiguous(), self._backend)
            if out is not None:
                self.num_matvecs += 1
                check_product(out)
                return out
        return super().matvec(v)

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        step = k if self.max_block is None else self.max_block
        if k > step:
            return torch.cat([self._matmat_chunk(V[:, i : i + step]) for i in range(0, k, step)], 1)
        return self._matmat_chunk(V)

    def _matmat_chunk(self, V: Tensor) -> Tensor:
        if self.cache_graph and V.shape[1] == 1:
            # one column through kept graphs: `matvec`'s lean path, which holds the result
            # and one part of a parameter's product at a time (`sharpgen.curvature._into`)
            out = kept_matvec(self.objective, self.kernel, V[:, 0].contiguous(), self._backend)
            if out is not None:
                return out.unsqueeze(1)
        block = unflatten_params(V, self.params)
        # the NaN/Inf check is LinearOperator.matmat's, once per product
        out, used = product(self.objective, self.kernel, block, None, backend=self._backend,
                            cache=self.cache_graph, owner=type(self).__name__,
                            check_finite=False)  # fmt: skip
        self._backend = used
        return out

    def clear_cache(self) -> None:
        """Drop the gradient graphs kept between products (``cache_graph``)."""
        self.objective.clear_cache()
