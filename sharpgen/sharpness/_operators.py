"""Linear operators on a `ModelObjective` (Hessian, GGN, diagonal blocks) and their trace."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sharpgen.curvature import ModelObjective, flatten_params, unflatten_params
from sharpgen.linalg import LinearOperator, TraceEstimate, hutchinson_trace, xtrace
from sharpgen.linalg._diagonal import exact_diagonal
from sharpgen.sharpness._common import check_choice, progress_bar

__all__ = ["TRACE_METHODS", "BlockOperator", "ObjectiveOperator", "operator_trace"]

TRACE_METHODS = ("auto", "exact", "hutchinson", "xtrace")


class ObjectiveOperator(LinearOperator):
    """Hessian (``kind="hvp"``) or GGN (``kind="ggn"``) of a `ModelObjective` (flat vectors)."""

    def __init__(self, objective: ModelObjective, kind: str = "hvp", max_block: int = 16) -> None:
        super().__init__(objective.numel, objective.dtype, objective.device)
        self.objective = objective
        self.kind = kind
        self.max_block = max_block

    def _matmat(self, V: Tensor) -> Tensor:
        cols = []
        for i in range(0, V.shape[1], self.max_block):
            block = unflatten_params(V[:, i : i + self.max_block], self.objective.params)
            if self.kind == "hvp":
                out = self.objective.hvp(block)
            else:
                out = self.objective.ggn_vp(block)
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
        super().__init__(size, objective.dtype, objective.device)
        self.full = ObjectiveOperator(objective, kind)
        self.objective = objective

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        block = unflatten_params(V, self.like)
        embedded = {
            n: block[n] if n in block else t.new_zeros((k, *t.shape))
            for n, t in self.objective.params.items()
        }
        out = unflatten_params(self.full.matmat(flatten_params(embedded, batched=True)),
                               self.objective.params)  # fmt: skip
        return flatten_params({n: out[n] for n in self.names}, batched=True)


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
    method = check_choice("method", method, TRACE_METHODS)
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
