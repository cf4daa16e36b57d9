r"""The dataset loss of a model as a function of a parameter dict.

`ModelObjective` evaluates

$$ L(\theta) = \frac{1}{N} \sum_b n_b \, \ell_b(\theta) \qquad (\texttt{reduction="mean"}),
\qquad L(\theta) = \sum_b \ell_b(\theta) \qquad (\texttt{reduction="sum"}), $$

where $\ell_b$ is ``loss_fn(model(inputs_b), targets_b)`` evaluated through
`torch.func.functional_call` at the parameters $\theta$, $n_b$ the number of samples of batch
$b$ and $N = \sum_b n_b$. Gradients, Hessian-vector and Gauss-Newton-vector products of $L$
are accumulated batch by batch with the same weights, so any batching of the same samples
(an uneven last batch included) gives the full-batch quantity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sharpgen._distributed import (
    AUTO,
    check_ranks_agree,
    reduce_partials,
    resolve_process_group,
    unwrap_model,
    without_sampler_padding,
)
from sharpgen.curvature._data import as_batches, num_samples
from sharpgen.curvature._params import ParamSelection, select_params
from sharpgen.curvature._state import check_policy, model_state_policy

__all__ = ["VALID_REDUCTIONS", "ModelObjective", "dataset_reduce"]

VALID_REDUCTIONS = ("mean", "sum")
VALID_FUNC_MODES = ("reverse", "forward")
_VALID_BACKENDS = ("func", "autograd")


def dataset_reduce(
    partials: list[Tensor], count: int, reduction: str, process_group: Any = None
) -> tuple[list[Tensor], int]:
    r"""Turn per-process partial sums into the dataset quantity (the one reduction point).

    Every dataset quantity of `ModelObjective` goes through this function. The partial sums
    are the caller's accumulators and are reduced and divided in place.

    Args:
        partials: Per-process sums: $\sum_b n_b q_b$ for ``reduction="mean"``, $\sum_b q_b$
            for ``reduction="sum"``.
        count: Number of samples this process visited.
        reduction: ``"mean"`` (divide by the total count) or ``"sum"``.
        process_group: ``None``: no communication (the data seen by this process is the
            dataset). Otherwise a ``torch.distributed`` process group (for example
            ``torch.distributed.group.WORLD``; ``"auto"``: the default group if
            initialized) over which partial sums and the count are summed in ONE
            all-reduce before dividing.

    Returns:
        The dataset quantities (same shapes as ``partials``) and the total count.
    """
    group = resolve_process_group(process_group)
    if group is not None:  # sharpgen._distributed: one all-reduce, count included
        partials, count = reduce_partials(list(partials), count, group)
    if reduction == "mean":
        return [p.div_(count) for p in partials], count
    return list(partials), count


def _device_of(partials: list[Tensor]) -> torch.device:
    return partials[0].device if partials else torch.device("cpu")


def _block_views(buf: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Views ``(k, *shape)`` into the rows of an ``(n, k)`` buffer, one per entry of like."""
    k = buf.shape[1]
    out, offset = {}, 0
    for name, t in like.items():
        size = t.numel()
        out[name] = buf[offset : offset + size].T.view(k, *t.shape)
        offset += size
    return out


def _zeros_like_dict(d: Mapping[str, Tensor], k: int | None = None) -> dict[str, Tensor]:
    if k is None:
        return {n: torch.zeros_like(t) for n, t in d.items()}
    return {n: t.new_zeros((k, *t.shape)) for n, t in d.items()}


def _tensors_in(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [v for v in x.values() if isinstance(v, Tensor)]
    if isinstance(x, (tuple, list)):
        return [v for v in x if isinstance(v, Tensor)]
    return []


class ModelObjective:
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
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
        data: One batch or an iterable of batches.
        params: Selection of parameters (see `select_params`); default all trainable.
            A dict gives the base point's values.
        bn: ``"eval"`` or ``"batch"``.
        dropout: Keep dropout active (``True``) or not (``False``, default).
        reduction: ``"mean"`` or ``"sum"``, see above.
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

    Attributes:
        params: Detached copies of the selected parameters at construction time (the base
            point used when a method gets ``params=None``).
        model: The model.

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
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        params: ParamSelection = None,
        *,
        bn: str = "eval",
        dropout: bool = False,
        reduction: str = "mean",
        process_group: Any = AUTO,
        func_mode: str = "reverse",
        vectorize: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, targets), got "
                f"{type(loss_fn).__name__}."
            )
        check_policy(bn, dropout)
        if reduction not in VALID_REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {VALID_REDUCTIONS} ('mean': loss_fn returns batch "
                f"means, the dataset loss is the sample-weighted mean; 'sum': loss_fn returns "
                f"batch sums, the dataset loss is their sum), got {reduction!r}."
            )
        if func_mode not in VALID_FUNC_MODES:
            raise ValueError(
                f"func_mode must be one of {VALID_FUNC_MODES} ('reverse': vjp of grad; "
                f"'forward': jvp of grad), got {func_mode!r}."
            )
        group = resolve_process_group(process_group, model)
        model = unwrap_model(model)  # functional calls go to the DDP-wrapped module
        selected = select_params(model, params)
        self.model = model
        self.loss_fn = loss_fn
        self.bn = bn
        self.dropout = dropout
        self.reduction = reduction
        self.process_group = group
        self.params: dict[str, Tensor] = {n: t.detach().clone() for n, t in selected.items()}
        first = next(iter(self.params.values()))
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.numel: int = sum(t.numel() for t in self.params.values())
        self._batches = as_batches(without_sampler_padding(data))
        self._num_samples: int | None = None
        self._func_mode = "rev" if func_mode == "reverse" else "fwd"
        if vectorize is not None and not isinstance(vectorize, bool):
            raise TypeError(f"vectorize must be None or a bool, got {vectorize!r}.")
        self.vectorize: bool = self.device.type != "cpu" if vectorize is None else vectorize
        self._graph_cache: Any = None
        self._tangents_checked = False
        self._validate()
        if group is not None:
            shapes = [(n, tuple(t.shape)) for n, t in self.params.items()]
            agree = {
                "the number of selected parameters": self.numel,
                "the parameter names and shapes": shapes,
                "the dtype": str(self.dtype),
                "reduction": reduction,
                "bn": bn,
            }
            check_ranks_agree(group, agree, where="ModelObjective")

    # -- helpers -----------------------------------------------------------------------
    @property
    def single_batch(self) -> bool:
        """Whether ``data`` was one batch."""
        return self._batches.single

    @property
    def num_samples(self) -> int:
        """Total number of samples $N$ (over all processes of ``process_group``)."""
        if self._num_samples is None:
            count = sum(num_samples(inputs) for inputs, _ in self._iter())
            dummy = [torch.zeros((), dtype=self.dtype, device=self.device)]
            _, self._num_samples = dataset_reduce(dummy, count, "sum", self.process_group)
        return self._num_samples

    def _check_devices(self, inputs: Any, targets: Any, index: int) -> None:
        for t in _tensors_in(inputs) + _tensors_in(targets):
            if t.device != self.device:
                raise ValueError(
                    f"data batch {index} holds a tensor on {t.device} but the parameters are "
                    f"on {self.device}; move the data to {self.device} (e.g. in the DataLoader "
                    "loop or with a collate_fn)."
                )

    def _iter(self) -> Iterator[tuple[Any, Any]]:
        for index, (inputs, targets) in enumerate(self._batches):
            self._check_devices(inputs, targets, index)
            yield inputs, targets

    def _weight(self, n: int) -> float:
        if self.single_batch and self.process_group is None:
            return 1.0  # see _finish
        return float(n) if self.reduction == "mean" else 1.0

    def resolve(self, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Return ``params`` checked against the selection (``None`` -> the base point)."""
        if params is None:
            return self.params
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict name -> tensor, got {type(params).__name__}.")
        if set(params) != set(self.params):
            missing = sorted(set(self.params) - set(params))
            extra = sorted(set(params) - set(self.params))
            raise ValueError(
                f"params must have exactly the selected names; missing {missing}, unexpected "
                f"{extra}. Build it from objective.params, e.g. "
                "{n: p + eps[n] for n, p in objective.params.items()}."
            )
        out = {}
        for name, ref in self.params.items():
            t = params[name]
            if not isinstance(t, Tensor) or t.shape != ref.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"params[{name!r}] must be a tensor of shape {tuple(ref.shape)}, got {shape}."
                )
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(
                    f"params[{name!r}] has dtype {t.dtype} on {t.device}, but the objective "
                    f"works in {self.dtype} on {self.device}; convert it with "
                    f".to({self.dtype}, '{self.device}')."
                )
            out[name] = t
        return out

    def _others(self) -> dict[str, Tensor]:
        """The model's non-selected parameters, detached (they are constants here)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if n not in self.params}

    @contextmanager
    def _state(self) -> Iterator[None]:
        with model_state_policy(self.model, bn=self.bn, dropout=self.dropout, copy_values=False):
            yield

    def _forward(self, others: dict[str, Tensor], p: Mapping[str, Tensor], inputs: Any) -> Any:
        full = {**others, **p}
        if isinstance(inputs, Mapping):
            return functional_call(self.model, full, (), dict(inputs))
        if isinstance(inputs, (tuple, list)):
            return functional_call(self.model, full, tuple(inputs))
        return functional_call(self.model, full, (inputs,))

    def _apply_loss(self, outputs: Any, targets: Any) -> Tensor:
        loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"loss_fn must return a tensor, got {type(loss).__name__}; return "
                "e.g. torch.nn.functional.cross_entropy(outputs, targets)."
            )
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return a "
                "scalar: the batch mean (reduction='mean', the default) or the batch sum "
                "(pass reduction='sum')."
            )
        return loss.reshape(())

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
        """Context: the model in the objective's evaluation state, restored on exit."""
        with self._state():
            yield

    def batches(self) -> Iterator[tuple[Any, Any]]:
        """Iterate over the validated ``(inputs, targets)`` batches."""
        return self._iter()

    # -- validation --------------------------------------------------------------------
    def _validate(self) -> None:
        with self._state(), torch.enable_grad():
            inputs, targets = self._batches.first()
            self._check_devices(inputs, targets, 0)
            p = {n: t.detach().requires_grad_(True) for n, t in self.params.items()}
            loss = self.batch_loss(p, inputs, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss on the first batch is {float(loss.detach())}; check the data for "
                    "NaN/Inf, the model for overflow (try float64) and the parameters."
                )
            if not loss.requires_grad:
                raise ValueError(
                    f"the loss does not depend on the selected parameters "
                    f"{list(self.params)[:6]}; select parameters the loss uses (params=...), "
                    "and check that loss_fn does not detach the outputs."
                )

    def check_deterministic(self) -> None:
        """Evaluate the loss in two passes over the data and raise if they differ.

        Raises:
            ValueError: If the two losses differ by more than ``1000 * eps`` (relative).
        """
        first = self.loss()
        second = self.loss()
        tol = 1000 * torch.finfo(self.dtype).eps
        if not torch.isclose(first, second, rtol=tol, atol=0.0):
            raise ValueError(
                f"the loss differs between two passes over the data ({float(first)!r} vs "
                f"{float(second)!r}), so curvature products would be inconsistent. Make the "
                "evaluation deterministic: switch off data augmentation, use a DataLoader with "
                "shuffle=False (or a fixed list of batches), and keep dropout=False (and "
                "bn='eval' or fixed batches)."
            )

    # -- dataset quantities ------------------------------------------------------------
    def _finish(self, partials: list[Tensor], count: int, what: str) -> list[Tensor]:
        if self.single_batch and self.process_group is None:
            # one local batch: the accumulators hold the batch quantity itself (weight 1)
            out, total = partials, count
        else:
            out, total = dataset_reduce(partials, count, self.reduction, self.process_group)
        self._num_samples = total
        for t in out:
            lo, hi = torch.aminmax(t.reshape(-1))  # NaN propagates; cheaper than isfinite
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                raise FloatingPointError(
                    f"the {what} is not finite (NaN or Inf); check the data for NaN/Inf, the "
                    "model for overflow (try float64) and the parameters."
                )
        return out

    def loss(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Dataset loss $L$ at ``params`` (default: the base point), a detached 0-d tensor.

        Raises:
            FloatingPointError: If the loss is not finite.
        """
        p = self.resolve(params)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        count = 0
        with self._state(), torch.no_grad():
            others = self._others()
            for inputs, targets in self._iter():
                n = num_samples(inputs)
                total = total + self._weight(n) * self.batch_loss(p, inputs, targets, others=others)
                count += n
        return self._finish([total], count, "loss")[0]

    def loss_and_gradient(
        self, params: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Dataset loss and its gradient w.r.t. the selected parameters, in one pass.

        Returns:
            ``(loss, grad)``: a detached 0-d tensor and a dict name -> tensor (zeros for
            parameters the loss does not use).
        """
        p = self.resolve(params)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        acc = _zeros_like_dict(p)
        count = 0
        names = list(p)
        with self._state(), torch.enable_grad():
            others = self._others()
            for inputs, targets in self._iter():
                n = num_samples(inputs)
                w = self._weight(n)
                preq = {k: t.detach().requires_grad_(True) for k, t in p.items()}
                loss = self.batch_loss(preq, inputs, targets, others=others)
                grads = torch.autograd.grad(
                    loss, [preq[k] for k in names], allow_unused=True, materialize_grads=True
                )
                total = total + w * loss.detach()
                for k, g in zip(names, grads, strict=True):
                    acc[k].add_(g, alpha=w)
                count += n
        out = self._finish([total, *acc.values()], count, "loss or its gradient")
        return out[0], dict(zip(names, out[1:], strict=True))

    def gradient(self, params: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Gradient of the dataset loss at ``params`` as a dict (see `loss_and_gradient`)."""
        return self.loss_and_gradient(params)[1]

    # -- curvature products ------------------------------------------------------------
    def _check_block(self, V: Mapping[str, Tensor]) -> int:
        if set(V) != set(self.params):
            raise ValueError(f"V must have the selected names {list(self.params)}, got {list(V)}.")
        ks = {V[n].shape[0] for n in self.params}
        for n, ref in self.params.items():
            if tuple(V[n].shape[1:]) != tuple(ref.shape):
                raise ValueError(
                    f"V[{n!r}] must have shape (k, *{tuple(ref.shape)}), got {tuple(V[n].shape)}."
                )
        if len(ks) != 1:
            raise ValueError(f"the blocks of V have different leading sizes {sorted(ks)}.")
        return ks.pop()

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
                data) or ``"autograd"`` (double backward, one pass over the data, ``k``
                backward passes per batch).
            cache: Only for one batch and ``params=None``: keep the gradient graph between
                calls, so that each product is one more backward pass (reverse-over-reverse;
                with ``backend="func"`` through ``torch.func.vjp`` of ``torch.func.grad``).
                The graph is rebuilt when the model's non-selected parameters or buffers
                change, and holds the activations' memory until `clear_cache`.

        Returns:
            Name -> tensor of shape ``(k, *shape)``.
        """
        return self._product("hvp", V, params, backend, cache)

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
        return self._product("ggn", V, params, backend, cache)

    def _product(
        self,
        kind: str,
        V: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None,
        backend: str,
        cache: bool,
        *,
        flat: bool = False,
    ) -> Any:
        """Accumulate per-batch products into one ``(n, k)`` buffer (no extra copies).

        Returns the buffer if ``flat`` else a dict of ``(k, *shape)`` views of it.
        """
        if backend not in _VALID_BACKENDS:
            raise ValueError(f"backend must be one of {_VALID_BACKENDS}, got {backend!r}.")
        p = self.resolve(params)
        k = self._check_block(V)
        if self.process_group is not None and not self._tangents_checked:
            block = torch.cat([V[n].reshape(-1) for n in p])
            what = {"the first block of vectors (same probes/seed?)": block}
            check_ranks_agree(self.process_group, what, where=f"ModelObjective.{kind}")
            self._tangents_checked = True
        V = {n: V[n] for n in p}
        buf = torch.empty((self.numel, k), dtype=self.dtype, device=self.device)
        acc = _block_views(buf, p)
        count = 0
        use_cache = cache and params is None and self.single_batch
        with self._state():
            others = self._others()
            for inputs, targets in self._iter():
                n = num_samples(inputs)
                if use_cache:
                    out = self._cached(kind, backend, others, p, V, inputs, targets)
                elif backend == "func":
                    out = self._func_batch(kind, others, p, V, inputs, targets)
                else:
                    out = _autograd_product(self, kind, others, p, V, inputs, targets, None)
                _accumulate(acc, out, self._weight(n), count == 0)
                del out
                count += n
        what = "Hessian-vector product" if kind == "hvp" else "GGN-vector product"
        (buf,) = self._finish([buf], count, what)
        return buf if flat else _block_views(buf, p)

    def _func_batch(
        self,
        kind: str,
        others: dict[str, Tensor],
        p: dict[str, Tensor],
        V: dict[str, Tensor],
        inputs: Any,
        targets: Any,
    ) -> Any:
        try:
            return _func_product(self, kind, others, p, V, inputs, targets, self._func_mode)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            if self._func_mode != "fwd":
                raise
        # Some ops have no forward-mode formula for their backward (in torch 2.13 e.g.
        # F.mse_loss with reduction="mean"); reverse-over-reverse works for them.
        out = _func_product(self, kind, others, p, V, inputs, targets, "rev")
        self._func_mode = "rev"
        return out

    def _cached(
        self,
        kind: str,
        backend: str,
        others: dict[str, Tensor],
        p: dict[str, Tensor],
        V: dict[str, Tensor],
        inputs: Any,
        targets: Any,
    ) -> Any:
        """Products on one batch from a kept gradient graph (rebuilt when the model changes)."""
        tensors = [*others.values(), *self.model.buffers()]
        key = (kind, backend, tuple(id(t) for t in tensors), tuple(t._version for t in tensors))
        cached = self._graph_cache
        if cached is not None and cached[0] == key:
            return cached[1](V)
        self._graph_cache = None
        if backend == "autograd":
            graph = _build_graph(self, kind, others, p, inputs, targets)

            def apply(W: dict[str, Tensor]) -> Any:
                return _autograd_product(self, kind, others, p, W, inputs, targets, graph)

        else:
            apply = _func_cached(self, kind, others, p, inputs, targets)
        out = apply(V)
        self._graph_cache = (key, apply)
        return out

    def clear_cache(self) -> None:
        """Drop a cached gradient graph (see ``cache`` in `hvp`)."""
        self._graph_cache = None


# -- per-batch kernels -------------------------------------------------------------------
def _second_order(f: Callable[[Any], Tensor], primal: Any, mode: str) -> Callable[[Any], Any]:
    """Return ``v -> Hessian(f)(primal) @ v`` (pytrees) by torch.func.

    ``mode="fwd"``: forward-over-reverse (``jvp`` of ``grad``). ``mode="rev"``:
    reverse-over-reverse (``vjp`` of ``grad``, valid because the Hessian is symmetric), for
    ops without a forward-mode formula of their backward.
    """
    grad_f = torch.func.grad(f)
    if mode == "fwd":
        return lambda v: torch.func.jvp(grad_f, (primal,), (v,))[1]
    _, vjp_fn = torch.func.vjp(grad_f, primal)
    return lambda v: vjp_fn(v)[0]


def _apply_block(
    one: Callable[[Any], dict[str, Tensor]], V: dict[str, Tensor], vectorize: bool
) -> Any:
    """Apply ``one`` to the ``k`` tangents of ``V`` (``vmap``, or a loop over columns).

    Returns a dict of ``(k, *shape)`` tensors (``vmap``) or a list of ``k`` per-column dicts
    (loop; it reuses whatever ``one`` closes over, such as a gradient graph).
    """
    k = next(iter(V.values())).shape[0]
    if k == 1 or not vectorize:
        return [one({n: t[j].contiguous() for n, t in V.items()}) for j in range(k)]
    return torch.func.vmap(one, randomness="same")(V)


def _accumulate(acc: dict[str, Tensor], out: Any, w: float, first: bool) -> None:
    """``acc (+)= w * out`` for a dict of blocks or a list of per-column dicts."""

    def put(dst: Tensor, src: Tensor) -> None:
        if first and w == 1.0:
            dst.copy_(src)
        elif first:
            torch.mul(src, w, out=dst)
        else:
            dst.add_(src, alpha=w)

    if isinstance(out, list):
        for j, col in enumerate(out):
            for name, a in acc.items():
                put(a[j], col[name])
    else:
        for name, a in acc.items():
            put(a, out[name])


def _func_column(
    obj: ModelObjective,
    kind: str,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    inputs: Any,
    targets: Any,
    mode: str,
) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """Return ``v -> H v`` (``kind="hvp"``) or ``v -> J^T H_loss J v`` (``"ggn"``) on one batch.

    Built with torch.func; whatever the returned function closes over (the ``vjp`` of the
    gradient with ``mode="rev"``, the model's ``vjp``) is reused for every column.
    """
    if kind == "hvp":

        def f(q: dict[str, Tensor]) -> Tensor:
            return obj.batch_loss(q, inputs, targets, others=others)

        return _second_order(f, p, mode)

    def out_fn(q: dict[str, Tensor]) -> Any:
        return obj._forward(others, q, inputs)

    def loss_of_out(o: Any) -> Tensor:
        return obj._apply_loss(o, targets)

    outputs, vjp_fn = torch.func.vjp(out_fn, p)
    h_loss = _second_order(loss_of_out, outputs, mode)

    def one(v: dict[str, Tensor]) -> dict[str, Tensor]:
        _, jv = torch.func.jvp(out_fn, (p,), (v,))
        return vjp_fn(h_loss(jv))[0]

    return one


def _func_product(
    obj: ModelObjective,
    kind: str,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    V: dict[str, Tensor],
    inputs: Any,
    targets: Any,
    mode: str,
) -> Any:
    """One batch's product with the ``k`` tangents of ``V`` (see `_apply_block`)."""
    one = _func_column(obj, kind, others, p, inputs, targets, mode)
    return _apply_block(one, V, obj.vectorize)


def _func_cached(
    obj: ModelObjective,
    kind: str,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    inputs: Any,
    targets: Any,
) -> Callable[[dict[str, Tensor]], Any]:
    """Reverse-over-reverse through torch.func with the gradient graph kept in a closure."""
    one = _func_column(obj, kind, others, p, inputs, targets, "rev")
    return lambda V: _apply_block(one, V, obj.vectorize)


def _build_graph(
    obj: ModelObjective,
    kind: str,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    inputs: Any,
    targets: Any,
) -> dict[str, Any]:
    """The autograd graph a double-backward product needs (kept for caching)."""
    with torch.enable_grad():
        preq = {n: t.detach().requires_grad_(True) for n, t in p.items()}
        if kind == "hvp":
            loss = obj.batch_loss(preq, inputs, targets, others=others)
            grads = torch.autograd.grad(
                loss, list(preq.values()), create_graph=True, allow_unused=True
            )
            live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
            return {"preq": preq, "live": live}
        outputs = obj._forward(others, preq, inputs)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                "backend='autograd' for the GGN needs a model that returns one tensor, got "
                f"{type(outputs).__name__}; use backend='func'."
            )
        o = outputs.detach().requires_grad_(True)
        loss = obj._apply_loss(o, targets)
        (gl,) = torch.autograd.grad(loss, o, create_graph=True)
        if not gl.requires_grad:  # loss linear in the outputs: H_loss = 0
            return {"preq": preq, "live": []}
        u = torch.zeros_like(outputs, requires_grad=True)
        params = list(preq.values())
        gu = torch.autograd.grad(outputs, params, u, create_graph=True, allow_unused=True)
        live = [(i, g) for i, g in enumerate(gu) if g is not None and g.requires_grad]
        return {"preq": preq, "outputs": outputs, "o": o, "gl": gl, "u": u, "live": live}


def _autograd_product(
    obj: ModelObjective,
    kind: str,
    others: dict[str, Tensor],
    p: dict[str, Tensor],
    V: dict[str, Tensor],
    inputs: Any,
    targets: Any,
    graph: dict[str, Any] | None,
) -> Any:
    """One batch's product by double backward, column by column.

    ``graph`` is a kept graph of `_build_graph` (``None``: built here and freed after the
    last column of a Hessian product). Returns a list of ``k`` per-column dicts, or a dict
    of ``(k, *shape)`` zeros when no selected parameter enters the product.
    """
    keep = graph is not None
    if graph is None:
        graph = _build_graph(obj, kind, others, p, inputs, targets)
    preq, live = graph["preq"], graph["live"]
    names = list(preq)
    params = list(preq.values())
    k = next(iter(V.values())).shape[0]
    if not live:
        return _zeros_like_dict(p, k)
    live_grads = [g for _, g in live]
    columns = []
    with torch.enable_grad():
        for j in range(k):
            v = [V[names[i]][j].contiguous() for i, _ in live]
            if kind == "hvp":
                col = torch.autograd.grad(
                    live_grads, params, v, retain_graph=keep or j < k - 1, materialize_grads=True
                )
            else:
                (jv,) = torch.autograd.grad(live_grads, graph["u"], v, retain_graph=True)
                (hjv,) = torch.autograd.grad(graph["gl"], graph["o"], jv, retain_graph=True)
                col = torch.autograd.grad(
                    graph["outputs"], params, hjv, retain_graph=True, materialize_grads=True
                )
            columns.append(col)
    return [dict(zip(names, c, strict=True)) for c in columns]
