"""Shared machinery of the curvature operators (Hessian and GGN)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._validation import is_int
from sharpgen.curvature._flatten import flatten_params, unflatten_params
from sharpgen.curvature._objective import ModelObjective
from sharpgen.curvature._params import ParamSelection
from sharpgen.linalg import LinearOperator

__all__ = ["VALID_OPERATOR_BACKENDS", "CurvatureOperator"]

VALID_OPERATOR_BACKENDS = ("auto", "func", "autograd")


class CurvatureOperator(LinearOperator):
    """Base class of `HessianOperator` and `GGNOperator` (not public)."""

    _kind = ""  # "hvp" or "ggn"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        params: ParamSelection = None,
        *,
        bn: str = "eval",
        dropout: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
        check_deterministic: bool = False,
        cache_graph: bool = False,
        max_block: int | None = 16,
        func_mode: str = "reverse",
        vectorize: bool | None = None,
        process_group: Any = "auto",
    ) -> None:
        if backend not in VALID_OPERATOR_BACKENDS:
            raise ValueError(
                f"backend must be one of {VALID_OPERATOR_BACKENDS} ('auto': torch.func with a "
                f"double-backward fallback; 'func': forward-over-reverse only; 'autograd': "
                f"double backward only), got {backend!r}."
            )
        if not isinstance(check_deterministic, bool):
            raise TypeError(f"check_deterministic must be a bool, got {check_deterministic!r}.")
        if max_block is not None and (not is_int(max_block) or max_block < 1):
            raise ValueError(
                f"max_block must be a positive int or None (no limit), got {max_block!r}."
            )
        if not isinstance(cache_graph, bool):
            raise TypeError(f"cache_graph must be a bool, got {cache_graph!r}.")
        self.objective = ModelObjective(
            model,
            loss_fn,
            data,
            params,
            bn=bn,
            dropout=dropout,
            reduction=reduction,
            process_group=process_group,
            func_mode=func_mode,
            vectorize=vectorize,
        )
        super().__init__(self.objective.numel, self.objective.dtype, self.objective.device)
        self._requested_backend = backend
        self._backend = backend
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
    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        step = k if self.max_block is None else self.max_block
        if k > step:
            return torch.cat([self._matmat_chunk(V[:, i : i + step]) for i in range(0, k, step)], 1)
        return self._matmat_chunk(V)

    def _matmat_chunk(self, V: Tensor) -> Tensor:
        block = unflatten_params(V, self.params)
        if self._backend == "auto":
            try:
                out = self._product(block, "func")
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError) as exc:
                # An error of the user's model or loss fails under autograd too: then that
                # error is raised as it is, without claiming a torch.func limitation.
                out = self._product(block, "autograd")
                warnings.warn(
                    f"{type(self).__name__}: torch.func could not trace the model "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); falling back "
                    "to double backward (backend='autograd'), which is slower for blocks of "
                    "vectors. Pass backend='autograd' to silence this warning.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._backend = "autograd"
            else:
                self._backend = "func"
        else:
            out = self._product(block, self._backend)
        return out

    def _product(self, block: dict[str, Tensor], backend: str) -> Tensor:
        return self.objective._product(
            self._kind, block, None, backend, self.cache_graph, flat=True
        )

    def clear_cache(self) -> None:
        """Drop the gradient graph kept by ``cache_graph=True``."""
        self.objective.clear_cache()
