r"""The trace of the loss Hessian of a model, exactly or by randomized estimators."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen.curvature import ModelObjective
from sharpgen.curvature._auto_micro import micro_plan_fields
from sharpgen.curvature._plan import check_memory_budget, plan_memory
from sharpgen.linalg import LinearOperator, TraceEstimate, trace
from sharpgen.linalg._adaptive import PILOT_PROBES
from sharpgen.linalg._trace import TRACE_METHODS, resolve_trace_method
from sharpgen.sharpness._common import (
    MeasureSource,
    ProgressOperator,
    check_choice,
    check_generator,
    check_int,
    check_positive,
    kept_graph,
    product_bytes_of,
    progress_bar,
)

__all__ = ["TRACE_METHODS", "hessian_trace"]

#: Probes per block of `sharpgen.linalg.hutchinson_trace` (its default).
HUTCHINSON_BLOCK = 32
_MIN_MATVECS = {"adaptive": 1, "hutchinson": 1, "hutchpp": 3, "xtrace": 4}


def hessian_trace(
    model: nn.Module | ModelObjective | LinearOperator,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    method: str = "auto",
    num_matvecs: int | None = None,
    rtol: float | None = None,
    max_matvecs: int = 1000,
    generator: torch.Generator | None = None,
    progress: bool = False,
    block_size: int = 64,
    exact_threshold: int = 2000,
    memory_budget: int | str | None = "auto",
    **objective_options: Any,
) -> TraceEstimate:
    r"""Trace of the Hessian of the dataset loss, $\operatorname{tr} \nabla^2_\theta L(\theta)$.

    $L$ is the dataset loss of `sharpgen.curvature.ModelObjective` (sample-weighted mean of
    batch means, or the sum with ``reduction="sum"``) and the Hessian is taken with respect
    to the selected parameters (default: every trainable one). The trace is the sharpness
    measure of Wen, Li & Ma (2023); for the MSE loss at an interpolating point it equals
    $\frac{2}{n}\sum_i \|\nabla_\theta f(x_i)\|^2$ (their Lemma 4.1).

    Methods (cost in Hessian-vector products, "matvecs"; one matvec costs about two
    gradient evaluations):

    * ``"exact"``: $\sum_i e_i^\top H e_i$ with the $p$ basis vectors, ``block_size`` at a
      time (each block is one pass over the data with the tangents batched by
      `torch.func.vmap`). Exactly $p$ matvecs; ``stderr`` is 0.
    * ``"hutchinson"``: $\frac1m\sum_j z_j^\top H z_j$ with Rademacher probes.
    * ``"hutchpp"``: Hutch++ (Meyer et al. 2021), a low-rank sketch plus Hutchinson on the
      remainder.
    * ``"xtrace"``: XTrace (Epperly et al. 2024), the exchangeable version of Hutch++; the
      most accurate at equal budget on spectra with decaying eigenvalues (what Hessians of
      trained networks have), see the `sharpgen.linalg` tests.
    * ``"adaptive"``: Hutchinson or Hutch++ with Rademacher probes, decided from the first
      probes (see `sharpgen.linalg.trace`): Hutchinson with the whole budget on a flat
      spectrum, deflation when a few eigenvalues dominate; a calibrated standard error.
    * ``"auto"`` (default): the rule of `sharpgen.linalg.trace`: ``"exact"`` when
      $p \le$ ``exact_threshold`` and the budget allows $p$ products (``num_matvecs >= p``,
      or ``max_matvecs >= p`` with ``rtol``), else ``"adaptive"`` -- or ``"hutchinson"``
      where the adaptive sketch ($2 \cdot 16$ parameter-sized vectors with ``rtol``,
      $2 \lfloor m/3 \rfloor$ with a budget $m$) does not fit ``memory_budget``.

    The stochastic methods run a fixed budget of ``num_matvecs`` products, or add products
    until the relative standard error is below ``rtol`` (capped by ``max_matvecs``;
    ``converged=False`` in the result when the cap was hit). With neither given,
    ``rtol=0.01`` is used.

    Args:
        model: Any ``nn.Module`` (left exactly as it was), with ``loss_fn`` and ``data``;
            or a ready `sharpgen.curvature.ModelObjective` (its options and caches are
            reused) or curvature operator (then the trace is that matrix's) alone.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch ``(inputs, targets)`` or an iterable of batches.
        method: One of ``"auto"``, ``"exact"``, ``"adaptive"``, ``"hutchinson"``,
            ``"hutchpp"``, ``"xtrace"``; the resolved method runs as `sharpgen.linalg.trace` of the
            Hessian operator.
        num_matvecs: Fixed budget of products (stochastic methods; at least 1 for
            Hutchinson, 3 for Hutch++, 4 for XTrace).
        rtol: Target relative standard error (stochastic methods), instead of
            ``num_matvecs``.
        max_matvecs: Cap on the products when ``rtol`` is used.
        generator: Source of the probes; the global RNG is untouched when given.
        progress: Show a tqdm progress bar over the products.
        block_size: Basis vectors per product block of ``"exact"`` (memory grows with it).
        exact_threshold: Largest parameter count for which ``"auto"`` computes the trace
            exactly.
        memory_budget: Bytes the call may hold beyond what the process holds: ``"auto"``
            (default, 80% of what the device has free), None (no limit) or an int. The
            plan (``result.memory``, `sharpgen.curvature.plan_memory`) narrows the probe
            block of ``"exact"`` and ``"hutchinson"`` to the widest that fits: the call
            holds the kept graph, the gradient and $2B$ parameter-sized vectors for a
            block of $B$ probes and its products (the sketches of Hutch++, XTrace and
            ``"adaptive"`` are their own and not planned).
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout`` (products become random), ``reduction``,
            ``backend`` (of the `sharpgen.curvature.HessianOperator`), ``process_group``
            (see the Distributed guide), ``func_mode``, ``vectorize``,
            ``micro_batch_size`` (``"auto"``: the largest micro-batch whose graph fits
            ``memory_budget`` beside the gradient, one probe and its product; None where
            the whole batch fits; reported as ``result.memory.micro_batch_size``),
            ``graphs``.

    Returns:
        A `sharpgen.linalg.TraceEstimate` (``method`` is the method actually used;
        ``float(result)`` is the value).

    Raises:
        ValueError: Unknown ``method`` (the valid ones are listed), a budget below the
            method's minimum or, for ``"exact"``, below $p$; non-positive ``rtol``,
            ``block_size`` or ``exact_threshold``; invalid model/data arguments.
        TypeError: Wrongly typed arguments.
        FloatingPointError: A non-finite loss or product.

    Examples:
        >>> import torch
        >>> x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> model = torch.nn.Linear(3, 1).double()
        >>> loss = torch.nn.functional.mse_loss
        >>> est = hessian_trace(model, loss, (x, torch.zeros(16, 1, dtype=torch.float64)))
        >>> est.method, est.num_matvecs, est.stderr  # 4 parameters: exact
        ('exact', 4, 0.0)
        >>> round(est.value, 10) == round(float(2 * (x**2).sum(1).mean() + 2), 10)
        True

    References:
        M. Hutchinson (1989). R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++:
        Optimal stochastic trace estimation", SOSA 2021. E. N. Epperly, J. A. Tropp,
        R. J. Webber, "XTrace", SIAM J. Matrix Anal. Appl. 2024. K. Wen, Z. Li, T. Ma,
        "Sharpness minimization algorithms do not only minimize sharpness to achieve
        better generalization", NeurIPS 2023.
    """
    method = check_choice("method", method, TRACE_METHODS)
    if num_matvecs is not None and rtol is not None:
        raise ValueError(
            f"pass at most one of num_matvecs (a fixed budget) and rtol (a target relative "
            f"standard error); got num_matvecs={num_matvecs!r} and rtol={rtol!r}."
        )
    if num_matvecs is not None:
        minimum = _MIN_MATVECS.get(method, 1)
        num_matvecs = check_int(
            "num_matvecs",
            num_matvecs,
            minimum=minimum,
            hint=f"method={method!r} needs at least {minimum} Hessian-vector products.",
        )
    if rtol is not None:
        rtol = check_positive("rtol", rtol, hint="pass a relative standard error such as 0.01.")
    max_matvecs = check_int("max_matvecs", max_matvecs)
    block_size = check_int("block_size", block_size)
    exact_threshold = check_int("exact_threshold", exact_threshold, minimum=0)
    generator = check_generator(generator)
    memory_budget = check_memory_budget(memory_budget)
    # "auto" micro-batches fit the graph beside the gradient, one probe and its product
    source = MeasureSource(model, loss_fn, data, objective_options, where="hessian_trace",
                           memory_budget=memory_budget, reserve_vectors=3)  # fmt: skip
    p = source.numel
    asked = method
    method = _resolve_method(method, p, num_matvecs, rtol, max_matvecs, exact_threshold)
    device = source.device
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    H = source.hessian()
    graph = kept_graph(H, device, held)  # built now and counted, on every device
    objective = getattr(H, "objective", None)
    if asked == "auto" and method == "adaptive":
        method = _fits_adaptive(p, H.dtype, device, memory_budget,
                                micro_plan_fields(objective, graph)["graph_bytes"],
                                num_matvecs, source.process_group)  # fmt: skip
    total = p if method == "exact" else (num_matvecs or max_matvecs)
    # the probe blocks the plan may narrow: exact's basis block and Hutchinson's probes
    planned = {"exact": block_size, "hutchinson": HUTCHINSON_BLOCK}.get(method, 0)
    fields = micro_plan_fields(objective, graph, min(planned, total))
    plan = plan_memory(
        "hessian_trace", numel=p, dtype=H.dtype, device=device, memory_budget=memory_budget,
        work_vectors=1, process_group=source.process_group,
        product_bytes=product_bytes_of(H, p, fields["graph_bytes"]), **fields,
    )  # fmt: skip
    block = plan.block_width if method == "exact" else block_size
    probe_block = plan.block_width if method == "hutchinson" else None
    desc = f"hessian_trace ({method})"
    with progress_bar(progress, total=total, desc=desc, unit="matvec") as bar:
        est = trace(
            ProgressOperator(H, bar), method=method, num_matvecs=num_matvecs, rtol=rtol,
            max_matvecs=max_matvecs, block_size=block, generator=generator,
            probe_block=probe_block,
        )  # fmt: skip
    return replace(est, memory=plan.with_peak(device))


def _fits_adaptive(
    p: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_budget: int | str | None,
    graph: int,
    num_matvecs: int | None,
    group: Any,
) -> str:
    """``"adaptive"`` where its sketch fits the budget, else the streamed ``"hutchinson"``.

    The adaptive estimator keeps its sketch probes and their products: $2s$ vectors with
    $s$ = `PILOT_PROBES` (``rtol``) or ``num_matvecs // 3`` (a fixed budget), and more if
    it grows the sketch. Where even those do not fit (GPT-2 small: 16 GB for $s = 16$),
    ``"auto"`` takes Hutchinson, which holds one probe block at a time. Over a process
    group the ranks decide on the plan they agree on.
    """
    s = PILOT_PROBES if num_matvecs is None else num_matvecs // 3
    plan = plan_memory("hessian_trace", numel=p, dtype=dtype, device=device,
                       memory_budget=memory_budget, graph_bytes=graph, work_vectors=1,
                       process_group=group)  # fmt: skip
    if plan.budget is not None and plan.planned_bytes + 2 * s * plan.vector_bytes > plan.budget:
        return "hutchinson"
    return "adaptive"


def _resolve_method(
    method: str,
    p: int,
    num_matvecs: int | None,
    rtol: float | None,
    max_matvecs: int,
    exact_threshold: int,
) -> str:
    """``"auto"`` resolved by `sharpgen.linalg.trace`'s rule; budget checks in parameters."""
    if method == "auto":
        method, _, _ = resolve_trace_method(
            "auto", p, num_matvecs=num_matvecs, rtol=rtol, max_matvecs=max_matvecs,
            exact_threshold=exact_threshold,
        )  # fmt: skip
    if method == "exact" and num_matvecs is not None and num_matvecs < p:
        raise ValueError(
            f"num_matvecs={num_matvecs} is too small for method='exact', which needs one "
            f"product per parameter ({p}); raise num_matvecs or use method='xtrace'."
        )
    if method == "xtrace" and num_matvecs is not None and num_matvecs // 2 > p:
        raise ValueError(
            f"num_matvecs={num_matvecs} is too large for XTrace on {p} parameters (it uses "
            f"num_matvecs // 2 probes, at most {p}); use method='exact' ({p} products)."
        )
    return method
