r"""The dataset loss of a model as a function of a parameter dict.

`ModelObjective` evaluates

$$ L(\theta) = \frac{1}{N} \sum_b n_b \, \ell_b(\theta) \qquad (\texttt{reduction="mean"}),
\qquad L(\theta) = \sum_b \ell_b(\theta) \qquad (\texttt{reduction="sum"}), $$

where $\ell_b$ is ``loss_fn(model(inputs_b), targets_b)`` evaluated through
`torch.func.functional_call` at the parameters $\theta$, $n_b$ the number of samples of batch
$b$ and $N = \sum_b n_b$. Gradients, Hessian-vector and Gauss-Newton-vector products of $L$
are accumulated batch by batch with the same weights, so any batching of the same samples
(an uneven last batch included) gives the full-batch quantity; ``micro_batch_size`` splits
every batch the same way inside each pass (`sharpgen.curvature._micro`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sharpgen._distributed import AUTO, resolve_process_group, unwrap_model
from sharpgen._precision import (
    accumulation_dtype,
    check_autocast,
    full_precision,
    refuse_missing_kernel,
    upcast_outputs,
)
from sharpgen.curvature._attention import first_order_attention, objective_attention
from sharpgen.curvature._auto_micro import choose_micro_batch
from sharpgen.curvature._columns import ColumnPlan
from sharpgen.curvature._data import as_batches, check_devices, num_samples
from sharpgen.curvature._interface import FirstGraph
from sharpgen.curvature._micro import micro_batches, refuse_batch_statistics
from sharpgen.curvature._model_loss import model_loss
from sharpgen.curvature._objective_products import ObjectiveProducts
from sharpgen.curvature._options import check_model_and_loss, check_options
from sharpgen.curvature._params import ParamSelection, base_point, check_point, select_params
from sharpgen.curvature._passes import dataset_loss, dataset_loss_and_gradient
from sharpgen.curvature._reduce import check_finite, dataset_reduce
from sharpgen.curvature._second_order import check_second_order
from sharpgen.curvature._sharding import without_sampler_padding
from sharpgen.curvature._state import model_state_policy
from sharpgen.curvature._validate import (
    check_deterministic,
    check_processes_agree,
    checked_loss,
    take_first_graph,
    validate_first_batch,
)

__all__ = ["ModelObjective"]


class ModelObjective(ObjectiveProducts):
    r"""The dataset loss $L(\theta)$ of ``(model, loss_fn, data)`` as a pure function.

    The selected parameters $\theta$ are a dict name -> tensor. Evaluations go through
    `torch.func.functional_call`, so the model itself is never written to: parameters not
    in the selection (and buffers) take the model's current values, and the caller's model
    state (parameters, buffers, ``training`` flags, ``requires_grad``, ``.grad``) is exactly
    restored after every call, also when it raises.

    **Reduction.** With ``reduction="mean"`` (default) ``loss_fn(outputs, targets)`` returns
    the *mean* loss of a batch and the dataset quantity is the sample-weighted mean
    $L = \frac1N \sum_b n_b \ell_b$ (exact for an uneven last batch). With
    ``reduction="sum"`` ``loss_fn`` returns the *sum* over the batch and the dataset quantity
    is the sum $L = \sum_b \ell_b$ (so curvature scales with the dataset size).

    **Model state policy.** During evaluation the model is in ``eval()`` mode, except:
    ``bn="batch"`` makes every BatchNorm layer normalize with the current batch's
    statistics (running buffers untouched); ``dropout=True`` keeps dropout active (every
    evaluation is then random, drawn from the global RNG).

    **Data.** One batch ``(inputs, targets)`` or a re-iterable of batches; the model is
    called as ``model(x)``, ``model(*inputs)`` for a tuple and ``model(**inputs)`` for a
    dict. See `as_batches`.

    Args:
        model: Any ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``; ``None``: the loss the
            model returns (`model_loss`, for Hugging Face batches with their ``labels``).
        data: One batch or an iterable of batches.
        params: Selection of parameters (see `select_params`); default all trainable.
            A dict gives the base point's values.
        bn: ``"eval"`` or ``"batch"``.
        dropout: Keep dropout active (``True``) or not (``False``, default).
        reduction: ``"mean"`` or ``"sum"``, see above.
        backend: How the curvature operators built on this objective take their products
            unless told otherwise: ``"auto"`` (default: ``torch.func``, falling back to
            double backward), ``"func"`` or ``"autograd"`` (see `HessianOperator`).
        process_group: ``"auto"`` (default: the DDP model's group or the initialized
            default group, if any), ``None`` (no communication) or a
            ``torch.distributed`` process group over which per-process sums are
            all-reduced (see `dataset_reduce` and the Distributed guide). With a
            group, every process passes its shard of the data; a
            `DistributedDataParallel` model is unwrapped and the samples a
            `DistributedSampler` repeats for padding are dropped.
        func_mode: How ``backend="func"`` takes the second derivative: ``"reverse"``
            (default; ``torch.func.vjp`` of ``torch.func.grad``, which by symmetry of the
            Hessian gives $Hv$) or ``"forward"`` (``torch.func.jvp`` of
            ``torch.func.grad``, forward-over-reverse). If ``"forward"`` fails on an op
            without a forward-mode derivative of its backward, ``"reverse"`` is used.
        vectorize: How ``backend="func"`` treats the ``k`` columns of a block in its one
            pass over the data: ``True`` through ``torch.func.vmap``, ``False`` column by
            column, reusing the batch's gradient graph (reverse mode). ``None`` (default):
            ``vmap`` except on the CPU, where the benchmark found the loop faster.
        second_order: What to do when the loss goes through an operation whose second
            derivative autograd silently drops (a custom ``autograd.Function`` with a
            ``@once_differentiable`` or detached backward): ``"raise"`` (default) a
            ``ValueError`` at the first curvature product; ``"warn"``: a
            `SecondDerivativeWarning` and ``exact_second_order=False``; ``"ignore"``: no
            check. Losses and gradients are never affected.
        micro_batch_size: ``None`` (default: whole batches) or a positive int: every batch
            is evaluated in micro-batches of at most this many samples, inside the loss,
            the gradient and every curvature product, weighted like batches, so every value
            equals the whole batch's to float rounding while the memory held at once is
            one micro-batch's (see `sharpgen.curvature._micro`: what is sliced, and why
            ``bn="batch"`` on a BatchNorm model is refused). ``"auto"``: the largest size
            whose graph fits the memory budget, None where the whole batch fits, measured
            on the first 1-2 samples when the objective is built; a measure chooses within
            its ``memory_budget``, an objective built alone within 80% of the free memory
            (`sharpgen.curvature._auto_micro`; the choice: `micro_batch_choice`).
        graphs: Whether curvature products keep their gradient graphs between products:
            ``"auto"`` (default) where the operator's ``cache_graph`` asks, except for
            micro-batches; ``"keep"``: for micro-batches too; ``"recompute"``: never,
            whatever ``cache_graph`` says. Kept, batch $b$'s graph holds its $S_b$ saved bytes
            until `clear_cache` and a product is one backward pass per batch; recomputed, a
            product holds $\max_b S_b$ while it runs and nothing after, for one more forward
            and backward pass per batch (the memory model: `sharpgen.curvature._products`).
        autocast: Forward passes under `torch.autocast` (float32 parameters): ``None``
            (default) follows the caller's context when the objective is built, ``False``
            never, ``True`` torch's default dtype of the device, or a dtype (``bfloat16``,
            ``float16``). Sums are float32 either way (guide: *Low precision*).

    Attributes:
        params: Detached copies of the selected parameters at construction time (the base
            point used when a method gets ``params=None``).
        exact_second_order: ``None`` until the first curvature product, then whether the
            products are exact (``False``: an operation without a second derivative was
            found and ``second_order="warn"`` let the products run).
        model: The model.
        micro_batch_choice: With ``micro_batch_size="auto"``, what was measured and chosen
            (`sharpgen.curvature._auto_micro.MicroBatchChoice`); else None.

    Raises:
        ValueError: Unknown ``bn``/``reduction``, no parameters selected, empty data, a
            batch that is not a pair, data on another device than the parameters, a
            non-scalar loss, a loss that does not depend on the selected parameters.
        FloatingPointError: Non-finite loss on the first batch.
        TypeError: ``model`` not a module, ``loss_fn`` not callable.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x, y = torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
        >>> obj = ModelObjective(model, torch.nn.functional.mse_loss, (x, y))
        >>> obj.num_samples
        4
        >>> bool(torch.isclose(obj.loss(), torch.nn.functional.mse_loss(model(x), y)))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        data: Any,
        params: ParamSelection = None,
        *,
        bn: str = "eval",
        dropout: bool = False,
        reduction: str = "mean",
        backend: str = "auto",
        process_group: Any = AUTO,
        func_mode: str = "reverse",
        vectorize: bool | None = None,
        second_order: str = "raise",
        micro_batch_size: int | str | None = None,
        graphs: str = "auto",
        autocast: torch.dtype | bool | None = None,
    ) -> None:
        loss_fn = model_loss if loss_fn is None else loss_fn  # the model's own loss
        check_model_and_loss(model, loss_fn)
        options: dict[str, Any] = {
            "bn": bn, "dropout": dropout, "reduction": reduction, "backend": backend,
            "func_mode": func_mode, "vectorize": vectorize, "second_order": second_order,
            "micro_batch_size": micro_batch_size, "graphs": graphs, "autocast": autocast,
        }  # fmt: skip
        check_options(**options)
        group = resolve_process_group(process_group, model)
        model = unwrap_model(model)  # functional calls go to the DDP-wrapped module
        refuse_batch_statistics(model, bn, micro_batch_size)
        selected = select_params(model, params)
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.bn = bn
        self.dropout = dropout
        self.reduction = reduction
        self.backend = backend
        self.process_group = group
        auto = micro_batch_size == "auto"  # chosen below, once the data is known
        self.micro_batch_size: int | None = None if auto else micro_batch_size  # type: ignore[assignment]
        self.graphs = graphs
        self._selection = params
        self._options = options
        self.params: dict[str, Tensor] = base_point(selected)
        first = next(iter(self.params.values()))
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        # sums, products and vectors: float32 for a bfloat16/float16 model (`_precision`)
        self.accum_dtype = accumulation_dtype(self.dtype)
        self.autocast = check_autocast(autocast, self.dtype, self.device)
        self._options["autocast"] = False if self.autocast is None else self.autocast
        # the loss of low-precision outputs is computed in float32 (`upcast_outputs`)
        self._loss_upcast = self.autocast is not None or self.accum_dtype != self.dtype
        self.sizes: list[int] = [t.numel() for t in self.params.values()]
        self.numel: int = sum(self.sizes)
        self._batches = as_batches(without_sampler_padding(data))
        self.micro_batch_choice = choose_micro_batch(self) if auto else None
        if self.micro_batch_choice is not None:  # measured on the first samples, see there
            self.micro_batch_size = self.micro_batch_choice.size
        # one batch evaluated whole, no communication: weight 1, no reduction (`_finish`)
        self._whole = self._batches.single and group is None and self.micro_batch_size is None
        self._num_samples: int | None = None
        self._func_mode = "rev" if func_mode == "reverse" else "fwd"
        self.vectorize: bool = self.device.type != "cpu" if vectorize is None else vectorize
        self._graph_cache: Any = None
        # per kernel name: how block columns go through a graph (`_columns.column_plan`)
        self._column_plans: dict[str, ColumnPlan] = {}
        # the model's selected parameter objects at the first graph key (`_graph_key`)
        self._selected_objects: list[Tensor] | None = None
        self._tangents_checked = False
        self.second_order = second_order
        self.exact_second_order: bool | None = None  # known at the first curvature product
        self._first_order: list[str] = []
        # the validation's loss and graph, kept for the first build (`keeping_first_graph`)
        self._first_graph: FirstGraph | None = None
        self._validate()
        check_processes_agree(self)

    # -- the same objective elsewhere -----------------------------------------------------
    def refreshed(self) -> ModelObjective:
        """The same model, loss, data and options at the model's current parameter values.

        The objective copies the selected parameters when it is built; a measure taken
        every N steps of training uses a refreshed objective each time.
        """
        return ModelObjective(self.model, self.loss_fn, self.data, self._selection,
                              process_group=self.process_group, **self._options)  # fmt: skip

    def with_data(self, data: Any, *, process_group: Any = None) -> ModelObjective:
        """The same model, loss, options and base point `params` on other ``data``.

        Args:
            data: One batch or an iterable of batches (for example one chunk of the data).
            process_group: ``None`` (default: no communication) or a process group.
        """
        return ModelObjective(self.model, self.loss_fn, data, dict(self.params),
                              process_group=process_group, **self._options)  # fmt: skip

    # -- helpers -----------------------------------------------------------------------
    @property
    def single_batch(self) -> bool:
        """Whether ``data`` was one batch."""
        return self._batches.single

    @property
    def num_samples(self) -> int:
        """Total number of samples $N$ (over all processes of ``process_group``)."""
        if self._num_samples is None:
            count = sum(num_samples(inputs) for inputs, _ in self.batches())
            dummy = [torch.zeros((), dtype=self.dtype, device=self.device)]
            _, self._num_samples = dataset_reduce(dummy, count, "sum", self.process_group)
        return self._num_samples

    def _iter(self) -> Iterator[tuple[Any, Any]]:
        """The batches of a pass: checked, and split into micro-batches if asked."""
        for inputs, targets in self.batches():
            yield from micro_batches(inputs, targets, self.micro_batch_size)

    def _first_batch(self) -> tuple[Any, Any]:
        """The first (micro-)batch, without a pass."""
        inputs, targets = self._batches.first()
        return next(micro_batches(inputs, targets, self.micro_batch_size))

    def _weight(self, n: int) -> float:
        if self._whole:
            return 1.0  # see _finish
        return float(n) if self.reduction == "mean" else 1.0

    def resolve(self, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Return ``params`` checked against the selection (``None`` -> the base point)."""
        if params is None:
            return self.params
        wider = self.accum_dtype if self.accum_dtype != self.dtype else None
        return check_point(params, self.params, self.dtype, self.device, wider)

    def _others(self) -> dict[str, Tensor]:
        """The model's non-selected parameters, detached (they are constants here)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if n not in self.params}

    def precision(self) -> AbstractContextManager[Any]:
        """Context of a forward pass: the objective's `torch.autocast`, else none at all."""
        if self.autocast is None:
            return full_precision()  # fixed when built: a later caller's context is ignored
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _forward(self, others: dict[str, Tensor], p: Mapping[str, Tensor], inputs: Any) -> Any:
        full = {**others, **p}
        with objective_attention(), self.precision():  # attention: see `_attention`
            if isinstance(inputs, Mapping):
                return functional_call(self.model, full, (), dict(inputs))
            if isinstance(inputs, (tuple, list)):
                return functional_call(self.model, full, tuple(inputs))
            return functional_call(self.model, full, (inputs,))

    def _apply_loss(self, outputs: Any, targets: Any) -> Tensor:
        if self._loss_upcast:
            outputs = upcast_outputs(outputs)
        return checked_loss(self.loss_fn(outputs, targets))

    def batch_loss(
        self, params: Mapping[str, Tensor], inputs: Any, targets: Any, *, others: Any = None
    ) -> Tensor:
        """Loss of one batch at ``params``; a pure function usable inside `torch.func`.

        Must be called with the model in its evaluation state (see `state`).

        Args:
            params: Selected name -> tensor (not validated here, see `resolve`).
            inputs: Batch inputs.
            targets: Batch targets.
            others: The non-selected parameters (default: the model's, detached).
        """
        if others is None:
            others = self._others()
        return self._apply_loss(self._forward(others, params, inputs), targets)

    @contextmanager
    def state(self) -> Iterator[None]:
        """Context: the model in the objective's evaluation state, restored on exit.

        The caller's autocast contexts are switched off inside (`full_precision`); the
        forward passes enter the objective's own (`precision`).
        """
        with (
            model_state_policy(self.model, bn=self.bn, dropout=self.dropout, copy_values=False),
            full_precision(),
        ):
            yield

    def batches(self) -> Iterator[tuple[Any, Any]]:
        """Iterate over the validated ``(inputs, targets)`` batches (whole, not split)."""
        for index, (inputs, targets) in enumerate(self._batches):
            check_devices(inputs, targets, index, self.device)
            yield inputs, targets

    # -- validation --------------------------------------------------------------------
    def _validate(self) -> None:
        try:
            validate_first_batch(self)
        except RuntimeError as err:  # a clear error for a missing float16/bfloat16 kernel
            refuse_missing_kernel(err, self.dtype, self.autocast, self.device)
            raise

    def _take_first_graph(self, p: Mapping[str, Tensor], inputs: Any) -> FirstGraph | None:
        """The kept validation graph if it is the loss at ``p`` on ``inputs`` (see there)."""
        return take_first_graph(self, p, inputs)

    def check_second_order(self, where: str) -> None:
        """Act once on operations without a second derivative (see ``second_order``)."""
        if self.exact_second_order is None:
            self.exact_second_order = check_second_order(
                self._first_order, self.second_order, where
            )

    def check_deterministic(self) -> None:
        """Evaluate the loss in two passes over the data and raise if they differ.

        Raises:
            ValueError: If the two losses differ by more than ``1000 * eps`` (relative).
        """
        check_deterministic(self)

    # -- dataset quantities ------------------------------------------------------------
    def _finish(
        self, partials: list[Tensor], count: int, what: str, check: bool = True
    ) -> list[Tensor]:
        if self._whole:
            # one local batch: the accumulators hold the batch quantity itself (weight 1)
            out, total = partials, count
        else:
            out, total = dataset_reduce(partials, count, self.reduction, self.process_group)
        self._num_samples = total
        if check:
            check_finite(out, what)
        return out

    def loss(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Dataset loss $L$ at ``params`` (default: the base point), a detached 0-d tensor.

        Raises:
            FloatingPointError: If the loss is not finite.
        """
        with first_order_attention():  # the fused attention kernels (`_attention`)
            return dataset_loss(self, self.resolve(params))

    def loss_and_gradient(
        self, params: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Dataset loss and its gradient w.r.t. the selected parameters, in one pass.

        Returns:
            ``(loss, grad)``: a detached 0-d tensor and a dict name -> tensor (zeros for
            parameters the loss does not use).
        """
        with first_order_attention():  # the fused attention kernels (`_attention`)
            return dataset_loss_and_gradient(self, self.resolve(params))

    def gradient(self, params: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Gradient of the dataset loss at ``params`` as a dict (see `loss_and_gradient`)."""
        return self.loss_and_gradient(params)[1]
