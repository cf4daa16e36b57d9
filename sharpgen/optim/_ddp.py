r"""One SAM / GSAM step under `DistributedDataParallel` (or any process group).

Two choices of perturbation, with $R$ processes, process $r$ holding the batch $B_r$ and
$g_r = \nabla L(w; B_r)$:

* ``perturbation="per_rank"`` (default; what Foret et al. did on TPUs): every process
  perturbs by its own gradient, $\varepsilon_r = \varepsilon(g_r)$, and the update uses
  $\frac1R\sum_r \nabla L(w + \varepsilon_r; B_r)$: m-SAM with $m$ = the per-process batch.
  One gradient all-reduce per step (DDP's, in the second pass), like plain DDP training.
* ``perturbation="synchronized"``: the first-pass gradient is averaged first (one
  bucketed all-reduce), so every process perturbs by the same
  $\varepsilon(\frac1R\sum_r g_r)$; with equal per-process batches and a mean loss this is
  exactly single-process SAM on the global batch. Two all-reduces per step.

The first pass always runs under ``no_sync()`` (forward and backward), so DDP does not
reduce it. For `GSAM` with ``"per_rank"`` the second pass also runs under ``no_sync()``,
each process forms its own GSAM gradient $g_{p,r} - \alpha g_{\perp,r}$ from its local
$g_r$ and $g_{p,r}$, and the final gradients are averaged in one bucketed all-reduce (the
decomposition needs both gradients of the same process; with ``"synchronized"`` both are
global and no extra communication is needed).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from sharpgen._distributed import (
    AUTO,
    average_gradients_,
    check_ranks_agree,
    resolve_process_group,
    unwrap_model,
)
from sharpgen.optim._batchnorm import disable_running_stats
from sharpgen.optim._gsam import GSAM
from sharpgen.optim._rng import replay_rng, rng_snapshot
from sharpgen.optim._sam import SAM

__all__ = ["DDP_PERTURBATIONS", "ddp_sam_step"]

DDP_PERTURBATIONS = ("per_rank", "synchronized")


def _is_ddp(model: nn.Module) -> bool:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # torch without distributed support
        return False
    return isinstance(model, DistributedDataParallel)


def ddp_sam_step(
    model: nn.Module,
    optimizer: SAM,
    closure: Callable[[], Any],
    *,
    perturbation: str = "per_rank",
    process_group: Any = AUTO,
    check: bool = False,
) -> Any:
    r"""One SAM (or GSAM, ASAM, ...) step of a model trained with data parallelism.

    Runs the closure twice, as ``optimizer.step(closure)`` does, with the gradient
    synchronization described in the module docstring:

    1. first pass (forward and backward) under ``model.no_sync()``: the local gradient
       $g_r$; with ``perturbation="synchronized"`` it is then averaged over the processes
       (one bucketed all-reduce);
    2. ``optimizer.first_step()``: perturb by $\varepsilon(g_r)$ (or by the averaged one);
    3. second pass inside `disable_running_stats` (BatchNorm statistics are updated once,
       in the first pass): DDP averages the gradient at the perturbed point (for `GSAM`
       with ``"per_rank"`` the pass runs under ``no_sync()`` and the GSAM gradients are
       averaged after the decomposition);
    4. ``optimizer.second_step()``: restore $w$ exactly and take the base step with the
       averaged gradient, identical on every process.

    Every process runs both passes even when its own perturbation is skipped (zero or
    non-finite local gradient), so the collectives always match; a non-finite gradient on
    any process makes the averaged gradient non-finite everywhere, so every process skips
    the base step together. ``same_dropout=True`` of the optimizer is honoured.

    A model that is not wrapped in `DistributedDataParallel` is accepted too (for example a
    model whose gradients you synchronize yourself): both passes then run without DDP and
    the gradients are averaged over ``process_group`` by this function. Without any group
    (single process) the step equals ``optimizer.step(closure)``.

    Args:
        model: The `DistributedDataParallel`-wrapped model (or a plain module).
        optimizer: A `SAM` or `GSAM` instance over the model's parameters.
        closure: Clears the gradients, runs forward and backward through ``model`` and
            returns the loss (the `SAM` closure contract).
        perturbation: ``"per_rank"`` or ``"synchronized"``.
        process_group: ``"auto"`` (the DDP model's group, else the default group if
            initialized), ``None`` (no communication) or a process group.
        check: Verify once that every process uses the same ``perturbation`` and optimizer
            type and the same number of parameters (one small all-gather); useful when
            setting up a run.

    Returns:
        The loss returned by the first call of the closure (this process's loss).

    Raises:
        ValueError: An unknown ``perturbation``; with ``check=True``, processes that
            disagree.
        TypeError: ``optimizer`` is not a `SAM`/`GSAM`, ``closure`` not callable, ``model``
            not a module.
        RuntimeError: Called while the optimizer's weights are perturbed (a two-call step
            in progress).
        ConnectionError: A collective of this function failed (another process raised or
            exited); `TimeoutError` when it timed out. DDP's own all-reduce raises its own
            errors.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import SAM, ddp_sam_step
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = ddp_sam_step(model, opt, closure)  # single process: a plain SAM step
        >>> opt.last_step_info.perturbed
        True

    References:
        P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-aware minimization for
        efficiently improving generalization", ICLR 2021 (m-sharpness and the per-device
        perturbation). J. Zhuang et al., "Surrogate gap minimization improves
        sharpness-aware training", ICLR 2022.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(optimizer, SAM):
        raise TypeError(
            "optimizer must be a sharpgen.optim.SAM or GSAM instance, got "
            f"{type(optimizer).__name__}; wrap the base optimizer, e.g. "
            "SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)."
        )
    if type(optimizer) not in (SAM, GSAM) or optimizer._interval != 1:
        raise TypeError(
            f"ddp_sam_step supports SAM (interval=1) and GSAM, got {type(optimizer).__name__}; "
            "for the other variants wrap the model in DistributedDataParallel and call "
            "optimizer.step(closure): every pass is then averaged over the processes."
        )
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}.")
    if perturbation not in DDP_PERTURBATIONS:
        raise ValueError(
            f"perturbation must be one of {DDP_PERTURBATIONS} ('per_rank': each process "
            "perturbs by its own gradient, m-SAM with m = per-process batch; 'synchronized': "
            f"one perturbation from the averaged gradient), got {perturbation!r}."
        )
    if optimizer.perturbed:
        raise RuntimeError(
            "ddp_sam_step() called while the optimizer's weights are perturbed; finish the "
            "two-call step with second_step() first."
        )
    group = resolve_process_group(process_group, model)
    ddp = _is_ddp(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if check and group is not None:
        check_ranks_agree(
            group,
            {
                "perturbation": perturbation,
                "optimizer": type(optimizer).__name__,
                "number of parameters": sum(p.numel() for p in params),
            },
            where="ddp_sam_step",
        )
    local: Any = model.no_sync if ddp else nullcontext
    per_rank_gsam = isinstance(optimizer, GSAM) and perturbation == "per_rank"
    snapshot = rng_snapshot(optimizer.param_groups) if optimizer._same_dropout else None

    with local(), torch.enable_grad():
        loss = closure()
    if group is not None and perturbation == "synchronized":
        average_gradients_(params, group, what="the first-pass gradients of ddp_sam_step")
    optimizer.first_step()
    try:
        replay = replay_rng(snapshot) if snapshot is not None else nullcontext()
        second_local = local() if per_rank_gsam else nullcontext()
        with replay, disable_running_stats(unwrap_model(model)), second_local, torch.enable_grad():
            closure()
    except BaseException:
        if optimizer.perturbed:
            with torch.no_grad():
                saved = optimizer._saved
                torch._foreach_copy_(list(saved), [saved[p] for p in saved])
        optimizer._reset()
        raise
    if group is not None and not ddp and not per_rank_gsam:
        average_gradients_(params, group, what="the second-pass gradients of ddp_sam_step")
    optimizer.restore()  # GSAM forms its gradient here (from g and g_p of this process)
    if group is not None and per_rank_gsam:
        average_gradients_(params, group, what="the GSAM gradients of ddp_sam_step")
    optimizer.second_step()
    return loss
