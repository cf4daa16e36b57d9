"""The Hessian of the dataset loss as a matrix-free linear operator."""

from __future__ import annotations

from torch import Tensor

from sharpgen.curvature._base import CurvatureOperator
from sharpgen.curvature._kernels import HESSIAN
from sharpgen.curvature._products import kept_gradient

__all__ = ["HessianOperator"]


class HessianOperator(CurvatureOperator):
    r"""Hessian $H = \nabla^2_\theta L(\theta)$ of the dataset loss, as a `LinearOperator`.

    $L$ is the dataset loss of `ModelObjective` (sample-weighted mean of batch means for
    ``reduction="mean"``, sum of batch sums for ``reduction="sum"``). Products are exact
    (no finite differences):

    * ``backend="func"``: ``torch.func`` through ``torch.func.functional_call``. With
      ``func_mode="reverse"`` (default) $Hv$ is the vjp of ``torch.func.grad``
      (reverse-over-reverse, exact because $H$ is symmetric); with ``func_mode="forward"``
      it is $\frac{\partial}{\partial t} \nabla L(\theta + t v)\big|_{t=0}$, the jvp of
      ``torch.func.grad`` (forward-over-reverse). A block ``matmat(V)`` of ``k`` columns is
      one pass over the data, with ``vmap`` over the tangents (``vectorize=True``, the
      default off the CPU) or column by column reusing each batch's gradient graph
      (``vectorize=False``, the default on the CPU). On the CPU benchmark
      (`benchmarks/bench_curvature.py`) reverse-over-reverse was as fast or faster and
      needed less memory, hence the default.
    * ``backend="autograd"``: double backward (``torch.autograd.grad`` with
      ``create_graph=True``), for models ``torch.func`` cannot trace (custom autograd
      Functions without ``setup_context``, data-dependent Python control flow, ...). One
      pass over the data; per batch one forward/backward plus one backward per column.
    * ``backend="auto"`` (default): on a CPU ``"autograd"`` (the fastest single product in
      ``benchmarks/bench_kernels.py``); elsewhere ``"func"``, falling back to
      ``"autograd"`` with a ``RuntimeWarning`` on the first product if ``torch.func`` fails.

    By default (``cache_graph="auto"``) the gradient graph is kept between calls (as
    PyHessian does for one batch) and each product is one more backward pass
    (reverse-over-reverse; for ``"func"`` through ``torch.func.vjp`` of
    ``torch.func.grad``, one batch only). With ``"autograd"`` on several batches
    (BatchNorm on running statistics, no dropout) every batch's graph is kept while their
    saved tensors total at most 1 GiB; products through kept graphs neither touch the model
    nor iterate the data. The graphs are rebuilt when the model's non-selected parameters
    or buffers, or the tensors of a single batch, are written in place; they hold the
    activations' memory (about what one product needs) until `clear_cache` or until the
    operator is dropped. ``"auto"`` keeps nothing with ``dropout=True`` (every product
    draws new masks), ``True`` keeps even then (one mask for all products), ``False``
    builds the graph on every product.

    The vectors are flat: entry order is the order of `params` (see `flatten_params`);
    use `flatten` / `unflatten` to convert.

    Args:
        model: Any ``nn.Module`` (left exactly as it was, see `preserve_model_state`) with
            ``loss_fn`` and ``data``; or a ready `ModelObjective` alone (its options and
            caches are shared; then only the operator options below may be given).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar (batch mean, or batch sum
            with ``reduction="sum"``).
        data: One batch ``(inputs, targets)`` or a re-iterable of batches.
        params: Parameter selection (see `select_params`); default all trainable ones.
        backend: ``"auto"``, ``"func"`` or ``"autograd"`` (default: the objective's,
            ``"auto"`` unless it was built with another).
        check_deterministic: Evaluate the loss in two passes at construction and raise if
            they differ (augmentation, dropout, shuffling).
        cache_graph: ``"auto"`` (default), ``True`` or ``False``: keep the gradient graphs
            between products (see above; memory stays allocated until `clear_cache`).
        max_block: At most this many columns of a block go through ``vmap`` in one pass
            over the data (memory grows with it); wider blocks are split. ``None``: no
            limit.
        **objective_options: With a model: the other keyword arguments of `ModelObjective`
            (`ObjectiveOptions`): ``bn`` (``"eval"``: BatchNorm uses running statistics;
            ``"batch"``: batch statistics, running buffers untouched), ``dropout``
            (``True``: dropout active, products random), ``reduction`` (``"mean"`` or
            ``"sum"``), ``func_mode`` (``"reverse"`` or ``"forward"``, see above),
            ``vectorize`` (``vmap`` over a block's columns, a loop, or ``None``: ``vmap``
            except on the CPU) and ``process_group`` (``"auto"``, default: the
            initialized default group, or the DDP model's, if any; ``None``: no
            communication; or a ``torch.distributed`` group; see the Distributed guide),
            ``second_order`` (``"raise"``, ``"warn"`` or ``"ignore"``: what to do when the
            loss goes through an operation without a second derivative),
            ``micro_batch_size`` (batches evaluated in micro-batches of at most this many
            samples, values unchanged) and ``graphs`` (``"auto"``, ``"keep"`` or
            ``"recompute"``: whether graphs are kept between products, see
            `ModelObjective`).

    Raises:
        ValueError: Unknown ``bn``/``backend``/``reduction``; no parameters selected; empty
            data; a batch not a pair; data on another device; non-scalar loss; loss not
            depending on the parameters; non-deterministic loss with
            ``check_deterministic=True``.
        FloatingPointError: Non-finite loss; NaN or Inf in a product.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> y = torch.zeros(8, 1, dtype=torch.float64)
        >>> H = HessianOperator(model, torch.nn.functional.mse_loss, (x, y))
        >>> H.shape
        (4, 4)
        >>> v = torch.ones(4, dtype=torch.float64)
        >>> bool(torch.allclose(H @ v, H.to_dense() @ v))
        True
    """

    kernel = HESSIAN

    def gradient(self) -> Tensor:
        """Flat gradient of the dataset loss at the base point.

        With ``cache_graph=True`` and double backward it is read off the kept gradient
        graphs (built now if they are not yet): free when products follow. Otherwise one
        pass over the data.
        """
        if self.cache_graph:
            g = kept_gradient(self.objective, self.kernel, self._backend)
            if g is not None:
                return g
        return super().gradient()
