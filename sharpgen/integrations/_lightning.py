"""PyTorch Lightning: a sharpness callback and the SAM step of manual optimization.

`SharpnessMonitor` measures sharpness on a schedule; `lightning_sam_step` runs one SAM / GSAM
step inside a manual-optimization ``training_step``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen.integrations._common import MeasureCore, check_schedule
from sharpgen.optim import disable_running_stats

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same code
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "sharpgen's Lightning integration needs PyTorch Lightning; install it with "
            "`pip install 'sharpgen[lightning]'` (or `pip install lightning`)."
        ) from exc

__all__ = ["SharpnessMonitor", "lightning_sam_step"]


class SharpnessMonitor(pl.Callback):
    r"""Measure sharpness every N optimizer steps (or epochs) and log it to the trainer's loggers.

    A Lightning ``Callback`` around `sharpgen.SharpnessTracker`. With ``every_n_steps=N`` it
    measures when ``trainer.global_step`` (the number of optimizer steps taken) is a multiple
    of $N$: once at the start of training (step 0) and after every $N$-th optimizer step
    (with gradient accumulation, only when an optimizer step was taken). With
    ``every_n_epochs=N`` it measures at the end of every $N$-th training epoch. Each
    measurement is logged through every logger of the trainer, as
    ``logger.log_metrics({prefix + key: value}, step=trainer.global_step)`` (Lightning's
    loggers write on global rank 0 only), and kept in `tracker` (``tracker.history``,
    ``tracker.to_dataframe()``).

    What the trainer sees is unchanged: the model (parameters, buffers, ``training`` flags,
    ``requires_grad``, ``.grad``) through the tracker's guarantees, and the random states
    (torch CPU and CUDA, Python, numpy, and the generators of ``data`` when it is a
    ``DataLoader``, so passing the training loader itself does not change its shuffling).
    Under DDP every rank runs the measurement (the measures all-reduce over the default
    process group, so give each rank its shard, or the same batch everywhere); checkpoints
    store the history (`state_dict`).

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning the scalar loss (a mean); None: the
            loss the model returns (`sharpgen.model_loss`: ``outputs.loss``, e.g. a Hugging
            Face model with the labels in its dict batch, given as ``data`` as it comes).
        data: The data to measure on: one held batch ``(inputs, targets)`` or a dict batch
            (a Hugging Face batch with its labels, read as ``(batch, None)``), a list of
            batches or a ``DataLoader`` (a validation loader, or the training loader); moved
            to the module's device batch by batch. Keep it small: every measure passes over
            it several times.
        every_n_steps: Measure every this many optimizer steps (exclusive with
            ``every_n_epochs``).
        every_n_epochs: Measure at the end of every this many epochs.
        measures: What to measure (see `sharpgen.SharpnessTracker`), default the loss and
            the Hessian trace.
        options: Options of the built-in measures, e.g. ``{"trace": {"num_matvecs": 20}}``.
        generator: Randomness of the stochastic measures (seed it for reproducible values).
        module: Which part of the LightningModule to measure: an attribute name such as
            ``"net"`` or a callable ``module(pl_module) -> nn.Module`` (default: the
            LightningModule itself, called as ``pl_module(inputs)``).
        prefix: Prepended to every logged key.
        **tracker_options: Further keyword arguments of `sharpgen.SharpnessTracker`
            (``params``, ``bn``, ``reduction``).

    Raises:
        ValueError: Not exactly one of ``every_n_steps`` / ``every_n_epochs``, a
            ``DataLoader`` with persistent workers, or what `sharpgen.SharpnessTracker`
            rejects (checked here, before training).
        TypeError: Wrongly typed arguments.

    Examples:
        >>> import torch
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> monitor = SharpnessMonitor(torch.nn.functional.mse_loss, batch, every_n_steps=10)
        >>> monitor.unit, monitor.every
        ('steps', 10)
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        data: Any,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        measures: Sequence[str] | Mapping[str, Any] = ("loss", "trace"),
        options: Mapping[str, Mapping[str, Any]] | None = None,
        generator: torch.Generator | None = None,
        module: str | Callable[[Any], nn.Module] | None = None,
        prefix: str = "sharpness/",
        **tracker_options: Any,
    ) -> None:
        super().__init__()
        self.unit, self.every = check_schedule(every_n_steps, every_n_epochs)
        if isinstance(module, str):
            module = operator.attrgetter(module)
        if module is not None and not callable(module):
            raise TypeError(
                "module must be an attribute name such as 'net' or a callable pl_module -> "
                f"nn.Module (e.g. lambda m: m.net), got {type(module).__name__}."
            )
        self._module_fn = module
        self._core = MeasureCore(
            loss_fn,
            data,
            prefix=prefix,
            tracker_options={
                "measures": measures,
                "options": options,
                "generator": generator,
                **tracker_options,
            },
        )
        self._last_step: int | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def tracker(self) -> Any:
        """The `sharpgen.SharpnessTracker` holding the history (None before the first fit)."""
        return self._core.tracker

    def _measure(self, trainer: Any, pl_module: Any, extra: Mapping[str, float]) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:
            return
        model = self._ready(pl_module)
        metrics = self._core.measure(model, pl_module.device, step)
        metrics.update(extra)
        self._last_step = step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _ready(self, pl_module: Any) -> Any:
        """The measured model, its tracker built (a checkpoint's history applied)."""
        model = pl_module if self._module_fn is None else self._module_fn(pl_module)
        if self._core.tracker is None and self._pending_state is not None:
            self._core.tracker_for(model, pl_module.device).load_state_dict(self._pending_state)
            self._pending_state = None
        return model

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the tracker (the model is checked before training); measure if on schedule.

        The starting step is 0, or the resumed one.
        """
        self._core.tracker_for(self._ready(pl_module), pl_module.device)
        if self.unit == "steps" and trainer.global_step % self.every == 0:
            self._measure(trainer, pl_module, {})

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Measure after an optimizer step whose index is a multiple of ``every_n_steps``."""
        step = trainer.global_step
        if self.unit == "steps" and step != self._last_step and step % self.every == 0:
            self._measure(trainer, pl_module, {})

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Measure at the end of every ``every_n_epochs``-th epoch (logging ``epoch`` too)."""
        if self.unit == "epochs" and (trainer.current_epoch + 1) % self.every == 0:
            self._measure(trainer, pl_module, {"epoch": float(trainer.current_epoch)})

    def state_dict(self) -> dict[str, Any]:
        """The tracker's history and costs (saved in Lightning checkpoints)."""
        if self._core.tracker is not None:
            return {"tracker": self._core.tracker.state_dict()}
        return {"tracker": self._pending_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history from a checkpoint (applied when the tracker is built)."""
        state = state_dict.get("tracker")
        if state is not None and state["history"]:
            self._last_step = int(state["history"][-1]["step"])
        if self._core.tracker is not None and state is not None:
            self._core.tracker.load_state_dict(state)
        else:
            self._pending_state = state


def _unwrap_optimizer(module: Any, optimizer: Any) -> tuple[Any, Any]:
    if optimizer is None:
        optimizer = module.optimizers()
    if isinstance(optimizer, (list, tuple)):
        raise ValueError(
            f"the module has {len(optimizer)} optimizers; pass the SAM one as optimizer=."
        )
    sam = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the real one
    if not all(callable(getattr(sam, m, None)) for m in ("first_step", "restore", "step")):
        raise TypeError(
            "lightning_sam_step needs a SAM-family optimizer (sharpgen.SAM or sharpgen.GSAM) "
            f"from configure_optimizers, got {type(sam).__name__}."
        )
    return optimizer, sam


def lightning_sam_step(
    module: Any, closure: Callable[[], Tensor], *, optimizer: Any = None
) -> Tensor:
    r"""One SAM / GSAM step inside a manual-optimization ``training_step``.

    ``closure`` follows the SAM contract, written with Lightning's backward: it clears the
    gradients, runs the forward pass, calls ``self.manual_backward(loss)`` and returns the
    loss. The step goes through Lightning's optimizer wrapper, so it counts as one optimizer
    step (``trainer.global_step``) and the precision plugin does its part:

    * without a gradient scaler (32-bit, ``bf16-mixed``): ``optimizer.step(closure)``; SAM
      calls the closure at $w$ and at $w + \varepsilon$, restores $w$ and steps;
    * with a gradient scaler (``16-mixed`` on a GPU): the two-call recipe of the SAM guide:
      first pass, ``first_step(grad_scale=scaler.get_scale())``, second pass, ``restore()``,
      then the plugin unscales, skips the step on an overflow in either pass and calls
      ``scaler.step`` (which completes the SAM step).

    The second pass always runs inside `sharpgen.disable_running_stats` (BatchNorm
    statistics updated once per step, at $w$). For gradient accumulation with one global
    perturbation, let the closure loop over micro-batches (see the Lightning guide).

    Args:
        module: The ``LightningModule`` (with ``automatic_optimization = False``).
        closure: See above.
        optimizer: The Lightning-wrapped SAM optimizer, default ``module.optimizers()``.

    Returns:
        The loss of the first pass (at the unperturbed weights).

    Raises:
        RuntimeError: The module uses automatic optimization.
        TypeError: The optimizer is not from the SAM family.
        ValueError: Several optimizers and no ``optimizer=``.
    """
    if getattr(module, "automatic_optimization", False):
        raise RuntimeError(
            "lightning_sam_step is for manual optimization: set "
            "`self.automatic_optimization = False` in the module's __init__ (or return the SAM "
            "optimizer from configure_optimizers and let automatic optimization call "
            "optimizer.step(closure) itself)."
        )
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}.")
    optimizer, sam = _unwrap_optimizer(module, optimizer)
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    if scaler is None:
        calls = 0

        def both_passes() -> Tensor:
            nonlocal calls
            frozen = disable_running_stats(module) if calls else nullcontext()
            calls += 1
            with frozen:
                return closure()

        return optimizer.step(closure=both_passes)
    loss = closure()
    if sam.first_step(zero_grad=True, grad_scale=float(scaler.get_scale())):
        with disable_running_stats(module):
            closure()
        sam.restore()
    optimizer.step()  # unscale, skip on overflow, scaler.step(sam) -> sam.step()
    return loss
