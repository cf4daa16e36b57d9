"""Hugging Face Transformers: a sharpness ``TrainerCallback`` and a SAM ``Trainer``.

`SharpnessTrainerCallback` measures sharpness on a schedule; `SAMTrainer` runs both SAM passes
in its training step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen.integrations._common import MeasureCore, check_schedule
from sharpgen.optim import disable_running_stats

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # transformers is an optional dependency
    raise ImportError(
        "sharpgen's Hugging Face integration needs transformers; install it with "
        "`pip install 'sharpgen[hf]'` (or `pip install transformers`)."
    ) from exc

__all__ = ["SAMTrainer", "SharpnessTrainerCallback"]


class SharpnessTrainerCallback(TrainerCallback):
    r"""Measure sharpness every N optimizer steps (or epochs) of a Hugging Face ``Trainer``.

    A ``TrainerCallback`` around `sharpgen.SharpnessTracker`. With ``every_n_steps=N`` it
    measures when ``state.global_step`` is a multiple of $N$: at the start of training and
    after every $N$-th optimizer step; with ``every_n_epochs=N`` at the end of every $N$-th
    epoch. The batches are the model's own: a dict with ``input_ids``, ``labels`` ..., and by
    default the loss is the one the model returns (``outputs.loss``), so
    ``SharpnessTrainerCallback(batch, every_n_steps=50)`` is all it takes.

    Each measurement (keys ``prefix + name``) goes to the trainer's log: with `attach`
    through ``trainer.log`` (so to ``state.log_history`` and to every reporting integration:
    TensorBoard, W&B, ...); when only passed in ``callbacks=[...]``, into
    ``state.log_history`` (saved with the trainer state). The tracker's history is `tracker`.
    The model, the random states (torch, Python, numpy, the generators of a ``DataLoader``
    given as ``data``) and ``.grad`` are what they were; under DDP every rank measures (the
    measures all-reduce over the default process group).

    Args:
        data: One batch (a dict of tensors with the labels, or an ``(inputs, targets)``
            pair), a list of batches or a ``DataLoader``; moved to the model's device.
        loss_fn: ``loss_fn(outputs, targets)``; default (None) the model's own
            ``outputs.loss`` (`sharpgen.model_loss`). The Gauss-Newton measures
            (``"ggn_trace"``, ``"fisher_rao"``) need a loss of the outputs, e.g.
            ``lambda out, y: F.cross_entropy(out.logits, y)`` with ``(inputs, labels)``
            batches.
        every_n_steps: Measure every this many optimizer steps (exclusive with
            ``every_n_epochs``).
        every_n_epochs: Measure at the end of every this many epochs.
        measures: What to measure (see `sharpgen.SharpnessTracker`), default loss and trace.
        options: Options of the built-in measures, e.g. ``{"trace": {"num_matvecs": 20}}``.
        generator: Randomness of the stochastic measures (seed it for reproducible values).
        prefix: Prepended to every logged key.
        **tracker_options: Further keyword arguments of `sharpgen.SharpnessTracker`
            (``params``, ``bn``, ``reduction``).

    Raises:
        ValueError: Not exactly one of ``every_n_steps`` / ``every_n_epochs``, a
            ``DataLoader`` with persistent workers, or what `sharpgen.SharpnessTracker`
            rejects (checked here).
        TypeError: Wrongly typed arguments.

    Examples:
        >>> import torch
        >>> batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
        ...          "labels": torch.zeros(2, 4, dtype=torch.long)}
        >>> callback = SharpnessTrainerCallback(batch, every_n_steps=50, measures=("loss",))
        >>> callback.unit, callback.every
        ('steps', 50)
    """

    def __init__(
        self,
        data: Any,
        *,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        measures: Sequence[str] | Mapping[str, Any] = ("loss", "trace"),
        options: Mapping[str, Mapping[str, Any]] | None = None,
        generator: torch.Generator | None = None,
        prefix: str = "sharpness/",
        **tracker_options: Any,
    ) -> None:
        self.unit, self.every = check_schedule(every_n_steps, every_n_epochs)
        self._core = MeasureCore(
            loss_fn,  # None: the model's own loss (sharpgen.model_loss), as in every measure
            data,
            prefix=prefix,
            tracker_options={
                "measures": measures,
                "options": options,
                "generator": generator,
                **tracker_options,
            },
        )
        self.trainer: Any = None
        self._last_step: int | None = None

    @property
    def tracker(self) -> Any:
        """The `sharpgen.SharpnessTracker` holding the history (None before training)."""
        return self._core.tracker

    def attach(self, trainer: Any) -> SharpnessTrainerCallback:
        """Log through ``trainer.log`` (reaching its integrations); add self if not there yet.

        Returns:
            ``self``.
        """
        if not callable(getattr(trainer, "log", None)):
            raise TypeError(
                f"trainer must be a transformers.Trainer, got {type(trainer).__name__}."
            )
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    def _measure(self, state: Any, model: nn.Module, extra: Mapping[str, float]) -> None:
        step = int(state.global_step)
        if step == self._last_step:
            return
        metrics = self._core.measure(model, self._core.device_of(model), step)
        metrics.update(extra)
        self._last_step = step
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:
            entry: dict[str, Any] = {**metrics, "step": step}
            if state.epoch is not None:
                entry["epoch"] = state.epoch
            state.log_history.append(entry)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the tracker (the model is checked before training); measure if on schedule.

        The starting step is 0, or the resumed one.
        """
        model = kwargs["model"]
        self._core.tracker_for(model, self._core.device_of(model))
        if self.unit == "steps" and state.global_step % self.every == 0:
            self._measure(state, kwargs["model"], {})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure after an optimizer step whose index is a multiple of ``every_n_steps``."""
        if self.unit == "steps" and state.global_step % self.every == 0:
            self._measure(state, kwargs["model"], {})

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure at the end of every ``every_n_epochs``-th epoch."""
        if self.unit == "epochs" and round(state.epoch) % self.every == 0:
            self._measure(state, kwargs["model"], {})


_NOT_SAM = (
    "SAMTrainer needs a SAM-family optimizer: pass optimizers=(sharpgen.SAM("
    "model.parameters(), torch.optim.AdamW, rho=0.05, lr=...), None); got {got}."
)


def _is_sam(opt: Any) -> bool:
    """A SAM-family optimizer (instance or class): it has ``first_step`` and ``restore``."""
    return all(callable(getattr(opt, m, None)) for m in ("first_step", "restore"))


class SAMTrainer(Trainer):
    r"""A ``Trainer`` whose training step runs both passes of a SAM-family optimizer.

    Pass the optimizer as usual, ``optimizers=(sharpgen.SAM(model.parameters(),
    torch.optim.AdamW, rho=0.05, lr=...), None)`` (``GSAM`` works the same way). Each call
    of `training_step` (one micro-batch) runs the first forward/backward pass at $w$, the
    SAM perturbation (``first_step``), the second pass at $w + \varepsilon$ (BatchNorm
    statistics untouched) and ``restore()``; the Trainer then clips the final gradient
    (``max_grad_norm``), and its ``optimizer.step()`` takes the base step (with fp16 AMP,
    the gradient scaler unscales and skips the step on an overflow in either pass).

    With ``gradient_accumulation_steps = k > 1`` each micro-batch is perturbed by its own
    gradient and the final gradients are summed (m-SAM with $m$ the micro-batch size,
    `sharpgen.SAM.accumulate`'s semantics); with $k = 1$ it is SAM's step on the batch,
    equal to ``SAM.step(closure)`` in a bare loop.

    Raises:
        TypeError: (when it is built) the optimizer given (``optimizers=`` or
            ``optimizer_cls_and_kwargs=``) is not from the SAM family, or none is given and
            ``create_optimizer`` is not overridden (the Trainer's default is not SAM); a
            subclass's own ``create_optimizer`` is checked at the first step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls_kwargs = getattr(self, "optimizer_cls_and_kwargs", None)
        if self.optimizer is not None:
            self._sam_optimizer()
        elif cls_kwargs is not None:
            if not _is_sam(cls_kwargs[0]):
                raise TypeError(_NOT_SAM.format(got=getattr(cls_kwargs[0], "__name__", cls_kwargs)))
        elif type(self).create_optimizer is Trainer.create_optimizer:
            raise TypeError(_NOT_SAM.format(got="no optimizer (the Trainer's default AdamW)"))

    def _sam_optimizer(self) -> Any:
        sam = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if not _is_sam(sam):
            raise TypeError(_NOT_SAM.format(got=type(sam).__name__))
        return sam

    def _grad_scale(self) -> float | None:
        scaler = getattr(self.accelerator, "scaler", None)
        return None if scaler is None else float(scaler.get_scale())

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        """Both SAM passes on one micro-batch; ``.grad`` holds the (summed) final gradient."""
        sam = self._sam_optimizer()
        params = [p for group in sam.param_groups for p in group["params"]]
        carried = [p.grad for p in params]  # final gradients of earlier micro-batches
        for p in params:
            p.grad = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if sam.first_step(zero_grad=True, grad_scale=self._grad_scale()):
            with disable_running_stats(model):
                super().training_step(model, inputs, num_items_in_batch)
            sam.restore()
        with torch.no_grad():
            for p, g in zip(params, carried, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return loss
