"""Linear operators on a `ModelObjective` (Hessian, GGN, diagonal blocks) and their trace."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from sharpgen._validation import check_bool, check_int, check_positive
from sharpgen.curvature import ModelObjective, flatten_params, unflatten_params
from sharpgen.curvature._backend import run_with_fallback
from sharpgen.linalg import LinearOperator, TraceEstimate, hutchinson_trace, xtrace
from sharpgen.linalg._diagonal import exact_diagonal
from sharpgen.sharpness._common import check_choice, progress_bar

__all__ = [
    "TRACE_METHODS",
    "BlockOperator",
    "ObjectiveOperator",
    "TraceOptions",
    "check_trace_options",
    "operator_trace",
]

TRACE_METHODS = ("auto", "exact", "hutchinson", "xtrace")


class ObjectiveOperator(LinearOperator):
    """Hessian (``kind="hvp"``) or GGN (``kind="ggn"``) of a `ModelObjective` (flat vectors).

    Products follow the objective's ``backend`` (`sharpgen.curvature._backend`): with
    ``"auto"`` (the default) ``torch.func`` (``vmap`` over the columns of a block), falling
    back to double backward with a `RuntimeWarning` when ``torch.func`` cannot trace the
    model (e.g. a classic ``forward(ctx, ...)`` ``autograd.Function``, allowed with
    ``second_order="warn"``); the backend that worked is kept for the next products.
    """

    def __init__(self, objective: ModelObjective, kind: str = "hvp", max_block: int = 16) -> None:
        super().__init__(objective.numel, objective.accum_dtype, objective.device)
        self.objective = objective
        self.kind = kind
        self.max_block = max_block
        self._backend = objective.backend

    def _product(self, block: dict[str, Tensor], backend: str) -> dict[str, Tensor]:
        if self.kind == "hvp":
            return self.objective.hvp(block, backend=backend)
        return self.objective.ggn_vp(block, backend=backend)

    def _matmat(self, V: Tensor) -> Tensor:
        cols = []
        for i in range(0, V.shape[1], self.max_block):
            block = unflatten_params(V[:, i : i + self.max_block], self.objective.params)
            if self._backend == "auto":  # try torch.func first, then double backward

                def run(b: str, _m: str, block: dict[str, Tensor] = block) -> dict[str, Tensor]:
                    return self._product(block, b)

                out, self._backend, _ = run_with_fallback(
                    run, "auto", "rev", owner="block products"
                )
            else:
                out = self._product(block, self._backend)
            cols.append(flatten_params(out, batched=True))
        return torch.cat(cols, 1)


class BlockOperator(LinearOperator):
    """The diagonal block of an objective's Hessian (or GGN) for the parameters ``names``.

    Vectors live on the listed parameters; products embed them with zeros for the other
    selected parameters and keep the block's rows of the full product.
    """

    def __init__(self, objective: ModelObjective, names: list[str], kind: str = "hvp") -> None:
        self.names = list(names)
        self.like = {n: objective.params[n] for n in self.names}
        size = sum(t.numel() for t in self.like.values())
        super().__init__(size, objective.accum_dtype, objective.device)
        self.full = ObjectiveOperator(objective, kind)
        self.objective = objective

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        block = unflatten_params(V, self.like)
        embedded = {
            n: block[n] if n in block else V.new_zeros((k, *t.shape))
            for n, t in self.objective.params.items()
        }
        out = unflatten_params(self.full.matmat(flatten_params(embedded, batched=True)),
                               self.objective.params)  # fmt: skip
        return flatten_params({n: out[n] for n in self.names}, batched=True)


class TraceOptions(NamedTuple):
    """The checked options of `operator_trace`."""

    method: str
    num_matvecs: int | None
    rtol: float | None
    max_matvecs: int
    exact_threshold: int


def check_trace_options(
    method: object,
    num_matvecs: object,
    rtol: object,
    max_matvecs: object,
    exact_threshold: object,
    progress: object,
) -> TraceOptions:
    """The trace options of a measure, checked before any work (one rule for all of them)."""
    check_bool("progress", progress)
    return TraceOptions(
        method=check_choice("method", method, TRACE_METHODS),
        num_matvecs=None if num_matvecs is None else check_int("num_matvecs", num_matvecs),
        rtol=None if rtol is None else check_positive("rtol", rtol),
        max_matvecs=check_int("max_matvecs", max_matvecs),
        exact_threshold=check_int("exact_threshold", exact_threshold, minimum=0),
    )


def operator_trace(
    op: LinearOperator,
    *,
    method: str,
    num_matvecs: int | None,
    rtol: float | None,
    max_matvecs: int,
    generator: torch.Generator | None,
    exact_threshold: int = 2000,
    progress: bool = False,
    desc: str = "trace",
) -> TraceEstimate:
    """Trace of ``op``: exact from basis vectors, or Hutchinson / XTrace with a stderr."""
    method, num_matvecs, rtol, max_matvecs, exact_threshold = check_trace_options(
        method, num_matvecs, rtol, max_matvecs, exact_threshold, progress
    )
    p = op.shape[0]
    if method == "auto":
        method = "exact" if p <= exact_threshold and num_matvecs is None else "xtrace"
    if method == "exact":
        with progress_bar(progress, total=p, desc=f"{desc} (exact)", unit="matvec") as bar:
            diag = exact_diagonal(op, bar=bar).values
        return TraceEstimate(value=float(diag.sum()), stderr=0.0, num_matvecs=p, method="exact")
    kwargs: dict[str, Any] = {"generator": generator}
    if num_matvecs is not None:
        kwargs["num_matvecs"] = num_matvecs
    else:
        kwargs.update(rtol=0.01 if rtol is None else rtol, max_matvecs=max_matvecs)
    estimator = hutchinson_trace if method == "hutchinson" else xtrace
    return estimator(op, **kwargs)
