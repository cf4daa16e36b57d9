"""Shared helpers of the model-level measures: their source objective, checks, progress bars."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._distributed import resolve_process_group, unwrap_model
from sharpgen._validation import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_positive,
)
from sharpgen.curvature import HessianOperator, ModelObjective, select_params
from sharpgen.curvature._auto_micro import DEFAULT_RESERVE, micro_batch_budget
from sharpgen.curvature._backend import plan_backend
from sharpgen.curvature._base import CurvatureOperator
from sharpgen.curvature._params import ParamSelection, sharing_parameters
from sharpgen.curvature._plan import product_transient
from sharpgen.curvature._products import build_kept
from sharpgen.curvature._resolve import check_objective_args
from sharpgen.curvature._validate import keeping_first_graph
from sharpgen.linalg import LinearOperator

__all__ = [
    "MeasureSource",
    "ProgressOperator",
    "check_adaptive",
    "check_bool",
    "check_choice",
    "check_generator",
    "check_int",
    "check_positive",
    "kept_graph",
    "num_selected",
    "product_bytes_of",
    "progress_bar",
]


# -- argument checks (the rules live in sharpgen._validation) -------------------------------
def check_adaptive(adaptive: object, eta: object) -> tuple[bool, float]:
    r"""Check the adaptive (ASAM) scaling options of a perturbation measure.

    Returns ``(adaptive, eta)``: a bool, and the offset $\eta$ of the scale
    $|\theta| + \eta$ as a finite float ``>= 0``.
    """
    return check_bool("adaptive", adaptive), check_positive("eta", eta, allow_zero=True)


def num_selected(model: nn.Module, params: ParamSelection) -> int:
    """Number of scalar parameters the measure is taken over (no forward pass)."""
    return sum(t.numel() for t in select_params(unwrap_model(model), params).values())


# -- random numbers ---------------------------------------------------------------------------
def draw(
    kind: str,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Standard Gaussian (``"gaussian"``) or uniform on ``[-1, 1]`` (``"uniform"``) numbers.

    With a generator the numbers are drawn on the generator's device and moved to
    ``device`` (a CPU generator gives the same numbers on every device); the global RNG
    is not touched.
    """
    where = generator.device if generator is not None else device
    if kind == "gaussian":
        out = torch.randn(shape, generator=generator, dtype=dtype, device=where)
    else:
        out = torch.rand(shape, generator=generator, dtype=dtype, device=where).mul_(2).sub_(1)
    return out.to(device)


# -- operators and progress -------------------------------------------------------------------
class MeasureSource:
    """What a measure is taken on, from either calling form, checked before any work.

    ``(model, loss_fn, data, **objective_options)`` builds a `ModelObjective` when asked;
    a ready objective or curvature operator is used as it is (then ``loss_fn``, ``data``
    and options are an error, see `sharpgen.curvature.as_objective`).
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        data: Any,
        options: dict[str, Any],
        *,
        where: str,
        memory_budget: int | str | None = "auto",
        reserve_vectors: int = DEFAULT_RESERVE,
    ) -> None:
        self.ready = check_objective_args(model, loss_fn, data, options, where)
        # what ``micro_batch_size="auto"`` chooses within (`sharpgen.curvature._auto_micro`)
        self.budget = (memory_budget, reserve_vectors)
        self.given_operator = model if isinstance(model, CurvatureOperator) else None
        self.model, self.data, self.options = model, data, options
        self.loss_fn: Callable[[Any, Any], Tensor] = loss_fn  # type: ignore[assignment]

    @property
    def numel(self) -> int:
        """Number of scalar parameters the measure is taken over (no forward pass)."""
        if self.ready is not None:
            return self.ready.numel
        return num_selected(self.model, self.options.get("params"))

    @property
    def process_group(self) -> Any:
        """The resolved process group (``None``: no communication), without any work."""
        if self.ready is not None:
            return self.ready.process_group
        return resolve_process_group(self.options.get("process_group", "auto"), self.model)

    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        if self.ready is not None:
            return self.ready.device
        return next(iter(self.model.parameters())).device

    @property
    def raw_data(self) -> Any:
        """The data as the caller gave it."""
        return self.ready.data if self.ready is not None else self.data

    def objective(self, *, keep_first_graph: bool = False, share: bool = False) -> ModelObjective:
        """The objective (built on the first call for the convenience form).

        ``keep_first_graph``: the caller builds the batch's gradient graph at once, so a
        one-batch objective keeps its validation graph for that build (one forward pass
        instead of two; see `sharpgen.curvature._validate.keeping_first_graph`).
        ``share``: the objective's base point aliases the model's parameters instead of
        copying them (`sharpgen.curvature._params.sharing_parameters`): for a measure whose
        result holds nothing of the objective.
        """
        if self.ready is None:
            with (
                keeping_first_graph() if keep_first_graph else nullcontext(),
                sharing_parameters() if share else nullcontext(),
                micro_batch_budget(*self.budget),
            ):
                self.ready = ModelObjective(self.model, self.loss_fn, self.data, **self.options)
        return self.ready

    def objective_on(self, data: Any) -> ModelObjective:
        """The same objective on other data, without communication (a chunk)."""
        if self.ready is not None:
            return self.ready.with_data(data)
        options = {**self.options, "process_group": None}
        with micro_batch_budget(*self.budget):
            return ModelObjective(self.model, self.loss_fn, data, **options)

    def hessian(self, *, single_vectors: bool = False) -> CurvatureOperator:
        """The curvature operator: the given one, or the Hessian of the objective.

        For an algorithm that multiplies one vector at a time (``single_vectors``, Lanczos)
        the backend is planned by `sharpgen.curvature._backend.plan_backend`.
        """
        if self.given_operator is not None:
            return self.given_operator
        # a kept double-backward graph starts from the validation's forward pass
        keep = self.options.get("backend", "auto") != "func"
        obj = self.objective(keep_first_graph=keep, share=True)
        backend, cache = plan_backend(
            obj.backend, single_vectors=single_vectors, single_batch=obj.single_batch
        )
        return HessianOperator(obj, backend=backend, cache_graph=cache)


def kept_graph(H: LinearOperator, device: torch.device, held: int) -> int:
    """The kept gradient graph's bytes, built now (0: none kept, or not a model's Hessian).

    For a measure that plans its memory before its first product (the same graphs that
    product would build, `sharpgen.curvature._products.build_kept`).

    Counted while it is built (`sharpgen.curvature._columns.SavedBytes`); on CUDA the
    allocated bytes since ``held`` where they are more.
    """
    counted = None
    if isinstance(H, HessianOperator) and H.cache_graph:
        counted = build_kept(H.objective, H.kernel, H.backend)
    graph = counted or 0
    if device.type == "cuda":
        graph = max(graph, torch.cuda.memory_allocated(device) - held)
    return graph


def product_bytes_of(H: LinearOperator, p: int, graph_bytes: int) -> int:
    """$P$ of the memory plan for products of ``H`` through a graph of ``graph_bytes``.

    `sharpgen.curvature._plan.product_transient` of the operator's parameters, with the
    gradient ($p$ numbers of the operator's dtype) counted in the graph; 0 where no graph
    was counted.
    """
    if not graph_bytes:
        return 0
    v = p * torch.empty((), dtype=H.dtype).element_size()
    return product_transient(graph_bytes, v, getattr(H, "params", {}).values())


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def set_postfix_str(self, s: str) -> None:
        return None


@contextmanager
def progress_bar(enabled: bool, *, total: int | None, desc: str, unit: str) -> Iterator[Any]:
    """A tqdm bar when ``enabled`` (tqdm imported only then), else a no-op object.

    Raises:
        ImportError: ``enabled`` and tqdm is not installed.
    """
    check_bool("progress", enabled)
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # tqdm is an optional dependency
        raise ImportError(
            "progress=True needs tqdm, which is not installed; install it with "
            "`pip install tqdm` (or `pip install sharpgen[examples]`), or pass progress=False."
        ) from exc
    bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
    try:
        yield bar
    finally:
        bar.close()


class ProgressOperator(LinearOperator):
    """Wrap an operator so that every block product advances a progress bar."""

    def __init__(self, inner: LinearOperator, bar: Any) -> None:
        super().__init__(inner.shape[0], inner.dtype, inner.device)
        self.inner = inner
        self.bar = bar

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.inner.matmat(V)
        self.bar.update(V.shape[1])
        return out
