"""A small helper that measures sharpness every N steps of any training loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen.curvature import ModelObjective, as_batches, model_loss, preserve_model_state
from sharpgen.curvature._options import OBJECTIVE_OPTIONS
from sharpgen.curvature._resolve import check_objective_args
from sharpgen.sharpness._average import average_sharpness
from sharpgen.sharpness._common import check_generator, check_int, check_positive
from sharpgen.sharpness._eigen import top_eigenvalues
from sharpgen.sharpness._trace import hessian_trace
from sharpgen.sharpness._tracker_checks import (
    BUILTIN_MEASURES,
    COST_KEYS,
    check_measure_options,
    check_measures_for_loss,
    check_tracked_model,
    resolve_measures,
    resolve_options,
)
from sharpgen.sharpness._tracker_measures import EXTRA_MEASURES
from sharpgen.sharpness._tracker_plot import plot_history
from sharpgen.sharpness._worst_case import sam_sharpness

__all__ = ["BUILTIN_MEASURES", "SharpnessTracker"]

_COST_KEYS = COST_KEYS
_OBJECTIVE_KEYS = frozenset(OBJECTIVE_OPTIONS)


class SharpnessTracker:
    r"""Compute sharpness measures every ``every`` steps on a fixed evaluation batch.

    Call `step` (or the tracker itself) once per training step; on steps that are
    multiples of ``every`` it computes the chosen measures of the model *as it is now* on
    ``eval_batch``, appends a record to `history` and returns it (otherwise it returns
    None and costs nothing). The model is never altered: every measure runs through
    `sharpgen.curvature.ModelObjective` or inside
    `sharpgen.curvature.preserve_model_state`, so parameters, buffers, ``training``
    flags, ``requires_grad`` and ``.grad`` are exactly as before (also when a measure
    raises), and the optimizer's state is untouched.

    Built-in measures (record keys in parentheses) and their default options:

    * ``"loss"``: $L(\theta)$ on the evaluation batch (``loss``); 1 loss evaluation.
    * ``"trace"``: `hessian_trace` (``trace``, ``trace_stderr``); exact for at most 2000
      parameters, XTrace to 1% otherwise.
    * ``"top_eigenvalue"``: `top_eigenvalues` with ``k=1, tol=1e-3``
      (``top_eigenvalue``, ``top_eigenvalue_converged``). From the second measurement on,
      Lanczos is warm-started from the previous measurement's top eigenvector
      (``start=`` that vector, plus a random part; pass ``options={"top_eigenvalue":
      {"start": "auto"}}`` for a cold start): the top eigenvector moves slowly during
      training, and in ``benchmarks/bench_tracker_warm.py`` this took 24-39% fewer products
      than the gradient start.
    * ``"sam"``: `sam_sharpness` with ``rho=0.05``, one SAM step (``sam``).
    * ``"average"``: `average_sharpness` with ``rho=0.01, num_samples=16`` (``average``,
      ``average_stderr``).
    * ``"ggn_trace"`` (`ggn_trace`), ``"fisher_rao"`` (`fisher_rao_norm`),
      ``"relative_flatness"`` (`relative_flatness`; needs ``options={"relative_flatness":
      {"layer": ...}}``), ``"pac_bayes"`` (`pac_bayes_sigma`, ``target=0.1``) and
      ``"block_traces"`` (`block_traces`: the total, and ``<name>/<block>`` per block).

    With ``lr`` given, `plot` draws the edge-of-stability line $2/\eta$ on the
    ``top_eigenvalue`` panel (gradient descent with step $\eta$ is unstable along
    directions with $\lambda > 2/\eta$; Cohen et al. 2021).

    Every record also holds ``step`` and its cost: ``matvecs`` (Hessian-vector products),
    ``gradient_evals`` and ``loss_evals``; the running totals are `total_cost`.

    At each measurement ONE `sharpgen.curvature.ModelObjective` at the model's current
    parameters serves every built-in measure (a measure whose ``options`` entry holds
    objective options gets its own).

    Args:
        model: The model being trained, with ``loss_fn`` and ``eval_batch``; or a ready
            `sharpgen.curvature.ModelObjective` alone (its model, loss, data and options;
            it is refreshed to the model's current parameters at each measurement).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar; None: the loss the model
            returns (`sharpgen.model_loss`: ``outputs.loss`` of a Hugging Face model with the
            labels in the batch), as in every measure. The Gauss-Newton measures
            (``"ggn_trace"``, ``"fisher_rao"``) need a loss of the outputs.
        eval_batch: A fixed batch ``(inputs, targets)`` (or a list of batches) to measure on;
            keep it small, every measure passes over it several times.
        every: Measure when ``step_index % every == 0``.
        measures: Names of built-in measures, or a dict name -> built-in name or callable
            ``fn(model, loss_fn, eval_batch) -> float`` (a result object with ``float()``
            and optionally ``num_matvecs`` is accepted).
        options: Dict built-in name -> keyword arguments for its function (merged with the
            defaults above), e.g. ``{"trace": {"num_matvecs": 20}, "sam": {"rho": 0.1}}``.
        generator: Source of randomness of the stochastic measures (advanced at each
            measurement); the global RNG is untouched when given.
        lr: The learning rate $\eta$, for the $2/\eta$ line of `plot` (None: no line).
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` for all built-in measures (``params``,
            ``bn``, ``dropout``, ``reduction``, ``backend``, ``process_group``, ...).

    Raises:
        ValueError: ``every < 1``, an unknown measure name (the valid ones are listed), a
            Gauss-Newton measure on the model's own loss (``loss_fn=None``),
            options for a measure that is not tracked, an option value out of range, a
            model without parameters, empty data.
        TypeError: Wrongly typed arguments, an option the measure does not take. Every
            argument and measure option is checked here, not at the first measurement.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> batch = (x, torch.zeros(8, 1, dtype=torch.float64))
        >>> tracker = SharpnessTracker(model, torch.nn.functional.mse_loss, batch, every=2,
        ...                            measures=("loss", "trace"))
        >>> for step in range(4):
        ...     _ = tracker.step(step)  # the training step would go here
        >>> [r["step"] for r in tracker.history], tracker.total_cost["matvecs"]
        ([0, 2], 8)
    """

    def __init__(
        self,
        model: nn.Module | ModelObjective,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        eval_batch: Any = None,
        *,
        every: int = 100,
        measures: Sequence[str] | Mapping[str, str | Callable[..., Any]] = (
            "trace",
            "top_eigenvalue",
            "sam",
        ),
        options: Mapping[str, Mapping[str, Any]] | None = None,
        generator: torch.Generator | None = None,
        lr: float | None = None,
        **objective_options: Any,
    ) -> None:
        self._configure(model, loss_fn, eval_batch, every, measures, options, generator, lr,
                        objective_options)  # fmt: skip
        check_tracked_model(self.model, self.options)

    @classmethod
    def check_arguments(cls, loss_fn: Any, eval_batch: Any, **tracker_options: Any) -> None:
        """Check a tracker's arguments before its model exists (the callbacks' check).

        Everything `SharpnessTracker` checks except what needs the model (its parameters,
        a named layer), with the same errors.
        """
        tracker = cls.__new__(cls)
        args = {"every": 1, "measures": ("trace", "top_eigenvalue", "sam"), "options": None,
                "generator": None, "lr": None, **tracker_options}  # fmt: skip
        every, measures, options, generator, lr = (
            args.pop(k) for k in ("every", "measures", "options", "generator", "lr")
        )
        tracker._configure(nn.Module(), loss_fn, eval_batch, every, measures, options,
                           generator, lr, args)  # fmt: skip

    def _configure(
        self,
        model: Any,
        loss_fn: Any,
        eval_batch: Any,
        every: Any,
        measures: Any,
        options: Any,
        generator: Any,
        lr: Any,
        objective_options: dict[str, Any],
    ) -> None:
        ready = check_objective_args(
            model, loss_fn, eval_batch, objective_options, where="SharpnessTracker"
        )
        if ready is None and loss_fn is None:
            loss_fn = model_loss  # the loss the model returns, as in every measure
        if ready is None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, targets) (or None: the loss "
                f"the model returns), got {type(loss_fn).__name__}."
            )
        self.every = check_int("every", every, hint="measure every N steps, e.g. every=100.")
        self.generator = check_generator(generator)
        self.lr = None if lr is None else check_positive("lr", lr)
        self._ready = ready
        self.model: nn.Module
        self.loss_fn: Callable[[Any, Any], Tensor]
        if ready is None:
            as_batches(eval_batch)  # validate the kind of data early
            self.model, self.loss_fn, self.eval_batch = model, loss_fn, eval_batch
        else:
            self.model, self.loss_fn, self.eval_batch = ready.model, ready.loss_fn, ready.data
        self.objective_options = dict(objective_options)
        self.measures = resolve_measures(measures)
        self.options = resolve_options(self.measures, options)
        check_measure_options(self.options)
        check_measures_for_loss(self.loss_fn, self.measures, self.options)
        self._history: list[dict[str, Any]] = []
        self._totals = dict.fromkeys(_COST_KEYS, 0)
        self._counter = 0
        # the last top eigenvector: the warm start of the next "top_eigenvalue" measurement
        self._top_vector: torch.Tensor | None = None

    # -- measuring -------------------------------------------------------------------------
    def step(self, step_index: int | None = None) -> dict[str, Any] | None:
        """Measure if ``step_index`` is a multiple of ``every``; return the record or None.

        Args:
            step_index: The training step; None uses an internal counter (0, 1, 2, ...
                over the calls that pass None).
        """
        if step_index is None:
            step_index = self._counter
            self._counter += 1
        step_index = check_int("step_index", step_index, minimum=0)
        if step_index % self.every:
            return None
        return self.measure(step_index)

    __call__ = step

    def measure(self, step_index: int) -> dict[str, Any]:
        """Compute every measure now (whatever ``every`` says) and record it."""
        record: dict[str, Any] = {"step": int(step_index)}
        cost = dict.fromkeys(_COST_KEYS, 0)
        shared: dict[str, ModelObjective] = {}  # one objective for the built-in measures
        for name, what in self.measures.items():
            if isinstance(what, str):
                self._builtin(name, what, record, cost, shared)
            else:
                with preserve_model_state(self.model):
                    out = what(self.model, self.loss_fn, self.eval_batch)
                record[name] = float(out)
                cost["matvecs"] += int(getattr(out, "num_matvecs", 0))
        record.update(cost)
        for k in _COST_KEYS:
            self._totals[k] += cost[k]
        self._history.append(record)
        return dict(record)

    def _objective(self, overrides: Mapping[str, Any]) -> ModelObjective:
        """The objective now: the tracker's options, with a measure's own ones on top."""
        if self._ready is not None:
            if overrides:
                raise ValueError(
                    f"options {sorted(overrides)} are objective options, fixed by the ready "
                    "ModelObjective this tracker was given; set them where it is built."
                )
            return self._ready.refreshed()
        options = {**self.objective_options, **overrides}
        return ModelObjective(self.model, self.loss_fn, self.eval_batch, **options)

    def _builtin(
        self,
        name: str,
        kind: str,
        record: dict[str, Any],
        cost: dict[str, int],
        shared: dict[str, ModelObjective],
    ) -> None:
        opts = dict(self.options[kind])
        own = {k: opts.pop(k) for k in list(opts) if k in _OBJECTIVE_KEYS}
        if own:
            obj = self._objective(own)
        else:
            if "obj" not in shared:
                shared["obj"] = self._objective({})
            obj = shared["obj"]
        if kind == "loss":
            record[name] = float(obj.loss())
            cost["loss_evals"] += 1
        elif kind == "trace":
            est = hessian_trace(obj, generator=self.generator, **opts)
            record[name], record[f"{name}_stderr"] = est.value, est.stderr
            cost["matvecs"] += est.num_matvecs
        elif kind == "top_eigenvalue":
            warm = self._top_vector
            if "start" not in opts and warm is not None and warm.numel() == obj.numel:
                opts["start"] = warm
            res = top_eigenvalues(obj, k=1, generator=self.generator, **opts)
            self._top_vector = res.eigenvectors[:, 0].detach().clone()
            record[name] = float(res.eigenvalues[0])
            record[f"{name}_converged"] = bool(res.converged)
            cost["matvecs"] += res.num_matvecs
        elif kind == "sam":
            sam = sam_sharpness(obj, generator=self.generator, **opts)
            record[name] = sam.value
            cost["gradient_evals"] += sam.num_gradient_evals
            cost["loss_evals"] += sam.num_loss_evals
        elif kind in EXTRA_MEASURES:
            values, spent = EXTRA_MEASURES[kind](obj, self.generator, **opts)
            record.update({f"{name}{suffix}": v for suffix, v in values.items()})
            for key, n in spent.items():
                cost[key] += n
        else:
            avg = average_sharpness(obj, generator=self.generator, **opts)
            record[name], record[f"{name}_stderr"] = avg.value, avg.stderr
            cost["loss_evals"] += avg.num_loss_evals

    # -- results ---------------------------------------------------------------------------
    @property
    def history(self) -> list[dict[str, Any]]:
        """The records so far (copies), oldest first."""
        return [dict(r) for r in self._history]

    @property
    def total_cost(self) -> dict[str, int]:
        """Cumulative ``matvecs``, ``gradient_evals`` and ``loss_evals`` of all records."""
        return dict(self._totals)

    def to_dict(self) -> dict[str, list[Any]]:
        """The history as columns: key -> list over records (None where a key is missing)."""
        keys: list[str] = []
        for r in self._history:
            keys.extend(k for k in r if k not in keys)
        return {k: [r.get(k) for r in self._history] for k in keys}

    def to_dataframe(self) -> Any:
        """The history as a pandas DataFrame indexed by ``step`` (needs pandas).

        See `sharpgen.sharpness._export.history_to_dataframe`.
        """
        from sharpgen.sharpness._export import history_to_dataframe

        return history_to_dataframe(self._history)

    def to_csv(self, path: Any) -> Any:
        """Write the history to a CSV file and return its path (needs no pandas).

        See `sharpgen.integrations.history_to_csv`.
        """
        from sharpgen.sharpness._export import history_to_csv

        return history_to_csv(self._history, path)

    def log_to(self, writer: Any, *, prefix: str = "sharpness/", last: bool = False) -> int:
        """Write the records to TensorBoard (a ``SummaryWriter``, or anything with ``add_scalar``).

        See `sharpgen.integrations.log_history`; ``last=True`` writes only the newest record.
        """
        from sharpgen.sharpness._export import log_history

        return log_history(writer, self._history, prefix=prefix, last=last)

    def state_dict(self) -> dict[str, Any]:
        """The history, the cost totals and the step counter (for checkpoints).

        The generator is not included: save and restore it yourself
        (``generator.get_state()``) to resume a stochastic series exactly.
        """
        return {
            "history": self.history,
            "totals": dict(self._totals),
            "counter": self._counter,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (the measures and options are not changed)."""
        if not isinstance(state, Mapping) or set(state) != {"history", "totals", "counter"}:
            raise ValueError(
                "state must be a dict from SharpnessTracker.state_dict() with the keys "
                "'history', 'totals' and 'counter'."
            )
        try:  # everything converted first: a bad state leaves the tracker as it was
            history = [dict(r) for r in state["history"]]
            totals = {k: check_int(f"totals[{k!r}]", state["totals"][k], minimum=0)
                      for k in _COST_KEYS}  # fmt: skip
            counter = check_int("counter", state["counter"], minimum=0)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"state is not a SharpnessTracker.state_dict() ({type(err).__name__}: {err}); "
                "the tracker is unchanged."
            ) from err
        self._history, self._totals, self._counter = history, totals, counter

    def plot(
        self,
        keys: str | Sequence[str] | None = None,
        *,
        axes: Any = None,
        label: str | None = None,
        **plot_kwargs: Any,
    ) -> Any:
        r"""Plot each measure against the step (matplotlib, imported only here).

        One panel per key. Where the history has a ``<key>_stderr`` entry (``trace``,
        ``average``) a band $\text{value} \pm 2\,\text{stderr}$ is drawn around the line in
        its colour (points with a missing or infinite stderr are left out of the band).
        Pass the ``axes`` of an earlier call to overlay several runs on the same panels.

        Args:
            keys: Record key(s) to plot; default every tracked measure.
            axes: Where to draw: one matplotlib ``Axes`` (for one key) or a sequence of
                ``Axes``, one per key; new ones (a new figure) when None.
            label: Legend label of this run's lines; a legend is drawn when given.
            **plot_kwargs: Passed on to ``Axes.plot`` (default ``marker="."``).

        Returns:
            The matplotlib ``Figure`` holding the axes (the one of ``axes`` when given).

        Raises:
            ValueError: Empty history, an unrecorded key, or a number of axes different
                from the number of keys.
            ImportError: matplotlib is not installed.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1).double()
            >>> x = torch.ones(4, 2, dtype=torch.float64)
            >>> batch = (x, torch.zeros(4, 1, dtype=torch.float64))
            >>> a = SharpnessTracker(model, torch.nn.functional.mse_loss, batch, every=1,
            ...                      measures=("loss",))
            >>> b = SharpnessTracker(model, torch.nn.functional.mse_loss, batch, every=1,
            ...                      measures=("loss",))
            >>> _, _ = a.step(0), b.step(0)
            >>> fig = a.plot(label="a")
            >>> fig is b.plot(axes=fig.axes, label="b")  # both runs on one panel
            True
            >>> len(fig.axes[0].lines)
            2
            >>> import matplotlib.pyplot as plt
            >>> plt.close(fig)
        """
        return plot_history(self, keys, axes=axes, label=label, **plot_kwargs)

    def __repr__(self) -> str:
        return (
            f"SharpnessTracker(every={self.every}, measures={list(self.measures)}, "
            f"records={len(self._history)}, total_cost={self._totals})"
        )
