r"""Study specifications: which models a study trains, on what data, until when.

A study (Jiang et al. 2020; Dziugaite et al. 2020) trains a grid of models that differ in their
hyperparameters, then asks which complexity measure ranks them by their generalization gap. A
`StudySpec` states

* the **data** (scikit-learn's ``"digits"`` and ``"breast_cancer"`` sets, the paper's
  ``"xor"`` cube and ``"ball"`` distributions),
* the **model family** (``"mlp"``: ReLU MLP of a given width and depth, biases everywhere or
  nowhere; ``"two_layer"``: the paper's $f(x) = W_2 \cdot \mathrm{relu}(W_1 x + b_1)$ with or
  without $b_1$, scalar output, as `sharpgen.models.TwoLayerNet`),
* a **grid** of hyperparameter axes (`HYPERPARAMETERS`; every axis not named keeps its
  default), crossed with the **seeds**,
* a **stopping rule** (`StopRule`): train until the training loss (or 0-1 error) reaches a
  threshold, with a step cap; a model that does not reach it is recorded as such and left
  out of the analysis.

Classification sets train with cross-entropy (one output per class, error = wrong argmax);
``"xor"`` and ``"ball"`` train a scalar output with the paper's squared loss
$(f - y)^2$ (no 1/2), error = $\operatorname{sign} f \ne \operatorname{sign} y$ (an output of
exactly 0 counts as wrong).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sharpgen._validation import check_choice, check_int, check_interval, check_positive

__all__ = [
    "DATASETS",
    "MODELS",
    "OPTIMIZERS",
    "HYPERPARAMETERS",
    "StopRule",
    "StudySpec",
]

DATASETS = ("digits", "breast_cancer", "xor", "ball")
MODELS = ("mlp", "two_layer")
OPTIMIZERS = ("sgd", "sam", "usam", "asam")
DTYPES = ("float32", "float64")
CLASSES = {"digits": 10, "breast_cancer": 2, "xor": 1, "ball": 1}

#: Every hyperparameter axis and its default. ``train_size=None`` uses the whole training pool.
HYPERPARAMETERS: dict[str, Any] = {
    "width": 64,
    "depth": 1,
    "bias": True,
    "lr": 0.1,
    "batch_size": 32,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "dropout": 0.0,
    "optimizer": "sgd",
    "rho": 0.0,
    "label_noise": 0.0,
    "train_size": None,
}

#: Axes on which models of one stack must agree (the rest may differ model by model).
STACK_KEYS = ("width", "depth", "bias", "batch_size", "train_size", "optimizer")


def _check_value(axis: str, value: Any) -> Any:
    """Validate one value of a hyperparameter axis and return it normalized."""
    name = f"axes[{axis!r}] value"
    if axis in ("width", "depth", "batch_size"):
        return check_int(name, value)
    if axis == "train_size":
        return None if value is None else check_int(name, value)
    if axis == "bias":
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
        return value
    if axis == "lr":
        return check_positive(name, value)
    if axis in ("weight_decay", "rho"):
        return check_positive(name, value, allow_zero=True)
    if axis in ("momentum", "dropout", "label_noise"):
        return check_interval(name, value, 0.0, 1.0, closed="[)")
    return check_choice(name, value, OPTIMIZERS)


@dataclass(frozen=True)
class StopRule:
    r"""When a model counts as trained: training loss or 0-1 error at or below a threshold.

    Jiang et al. (2020) train every model to cross-entropy 0.01; Dziugaite et al. (2020) to a
    fixed training error. The rule is checked on the model's whole training set (its own labels,
    label noise included; dropout off) every ``check_every`` steps (default: every epoch,
    ``ceil(train_size / batch_size)`` steps). A model that meets it stops (its learning rate
    becomes 0) and its step count is recorded; one still short of it after ``max_steps``
    steps is recorded as not converged and left out of the analysis.

    Args:
        metric: ``"loss"`` or ``"error"`` (training 0-1 error).
        threshold: Stop when ``metric <= threshold``.
        max_steps: Step cap.
        check_every: Steps between checks, or None for once an epoch.

    Examples:
        >>> StopRule("error", 0.0, max_steps=500)
        StopRule(metric='error', threshold=0.0, max_steps=500, check_every=None)
    """

    metric: str = "loss"
    threshold: float = 0.01
    max_steps: int = 10_000
    check_every: int | None = None

    def __post_init__(self) -> None:
        check_choice("StopRule metric", self.metric, ("loss", "error"))
        t = check_positive("StopRule threshold", self.threshold, allow_zero=True)
        if self.metric == "error" and t >= 1:
            raise ValueError(f"StopRule threshold={t!r} for metric='error' must be < 1.")
        object.__setattr__(self, "threshold", t)
        check_int("StopRule max_steps", self.max_steps)
        if self.check_every is not None:
            check_int("StopRule check_every", self.check_every)


@dataclass(frozen=True)
class StudySpec:
    """A grid of models to train and compare.

    Args:
        name: Identifier (letters, digits, ``-``, ``_``), used in file names.
        data: One of `DATASETS`.
        model: ``"mlp"`` or ``"two_layer"`` (only with ``"xor"`` / ``"ball"``; ``depth`` 1,
            ``bias`` selects the paper's bias or no-bias net).
        axes: Hyperparameter axis -> values (any of `HYPERPARAMETERS`); the grid is their
            product, crossed with ``seeds``. SGD models ignore ``rho`` (one model per other
            setting); ``rho`` must be > 0 for the SAM family.
        seeds: Model seeds: a seed fixes the initialization, training subset, label noise and
            data order, so two models with the same seed and architecture differ only in the
            other hyperparameters (the coupled pairs of Dziugaite et al. 2020).
        stop: The `StopRule`.
        d: Input dimension of ``"xor"`` / ``"ball"`` (fixed by the data otherwise).
        pool_size: Training pool of ``"xor"`` / ``"ball"``: ``train_size`` points are drawn from
            it per seed (default: the largest ``train_size``).
        test_size: Test points of ``"xor"`` / ``"ball"`` (default 1000); for scikit-learn
            sets the held-out fraction, in (0, 1) (default 0.3).
        data_seed: Seed of the data draw and the train/test split (the same for all models).
        dtype: ``"float32"`` or ``"float64"``.
        description: Free text, shown by ``--list``.

    Raises:
        ValueError, TypeError: For any bad field, naming it.

    Examples:
        >>> spec = StudySpec("s", "xor", axes={"width": (8, 16)}, seeds=(0, 1), d=4, pool_size=32)
        >>> len(spec.grid()), spec.grid()[1]["width"], spec.grid()[1]["seed"]
        (4, 8, 1)
    """

    name: str
    data: str
    model: str = "mlp"
    axes: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    stop: StopRule = field(default_factory=StopRule)
    d: int | None = None
    pool_size: int | None = None
    test_size: float | None = None
    data_seed: int = 0
    dtype: str = "float32"
    description: str = ""

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not self.name
            or not all(c.isalnum() or c in "-_" for c in self.name)
        ):
            raise ValueError(
                f"StudySpec name={self.name!r} must be a non-empty string of letters, digits, "
                "'-' and '_' (it names files)."
            )
        check_choice("StudySpec data", self.data, DATASETS)
        check_choice("StudySpec model", self.model, MODELS)
        check_choice("StudySpec dtype", self.dtype, DTYPES)
        if not isinstance(self.stop, StopRule):
            raise TypeError(f"StudySpec stop must be a StopRule, got {type(self.stop).__name__}.")
        object.__setattr__(self, "axes", self._checked_axes())
        seeds = tuple(self.seeds) if isinstance(self.seeds, (list, tuple, range)) else None
        if not seeds:
            raise ValueError(f"StudySpec seeds={self.seeds!r} must be a non-empty tuple of ints.")
        seeds = tuple(check_int("StudySpec seeds entry", s, minimum=0) for s in seeds)
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"StudySpec seeds={seeds!r} has duplicates.")
        object.__setattr__(self, "seeds", seeds)
        check_int("StudySpec data_seed", self.data_seed, minimum=0)
        self._check_data()
        self._check_model()

    def _checked_axes(self) -> dict[str, tuple[Any, ...]]:
        if not isinstance(self.axes, Mapping):
            raise TypeError(f"StudySpec axes must be a dict, got {type(self.axes).__name__}.")
        out = {}
        for axis, values in self.axes.items():
            if axis not in HYPERPARAMETERS:
                raise ValueError(
                    f"unknown hyperparameter axis {axis!r}; valid axes are "
                    f"{', '.join(HYPERPARAMETERS)}."
                )
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise TypeError(
                    f"axes[{axis!r}] must be a tuple or list of values, got {values!r}; "
                    f"write ({values!r},) for a single value."
                )
            if not values:
                raise ValueError(f"axes[{axis!r}] is empty; give at least one value.")
            vals = tuple(_check_value(axis, v) for v in values)
            if len(set(vals)) != len(vals):
                raise ValueError(f"axes[{axis!r}]={vals!r} has duplicates.")
            out[axis] = vals
        return out

    def values(self, axis: str) -> tuple[Any, ...]:
        """The values of ``axis`` in the grid (its default alone if the axis is not varied)."""
        return tuple(self.axes.get(axis, (HYPERPARAMETERS[axis],)))

    def _check_data(self) -> None:
        sizes = [s for s in self.values("train_size") if s is not None]
        if self.data in ("xor", "ball"):
            if self.d is None:
                raise ValueError(f"StudySpec d is required for data={self.data!r}.")
            check_int("StudySpec d", self.d, minimum=2)
            if self.test_size is None:
                object.__setattr__(self, "test_size", 1000)
            check_int("StudySpec test_size", self.test_size)
            pool = self.pool_size if self.pool_size is not None else max(sizes, default=None)
            if pool is None:
                raise ValueError(
                    f"data={self.data!r} needs pool_size or an explicit train_size axis "
                    "(the number of training points to draw)."
                )
            check_int("StudySpec pool_size", pool)
            object.__setattr__(self, "pool_size", pool)
        else:
            if self.d is not None or self.pool_size is not None:
                raise ValueError(
                    f"StudySpec d and pool_size are fixed by data={self.data!r}; leave them None."
                )
            if self.test_size is None:
                object.__setattr__(self, "test_size", 0.3)
            check_interval("StudySpec test_size", self.test_size, 0.0, 1.0, closed="()")
        if self.pool_size is not None and sizes and max(sizes) > self.pool_size:
            raise ValueError(
                f"train_size {max(sizes)} exceeds pool_size={self.pool_size}; raise pool_size."
            )

    def _check_model(self) -> None:
        if self.model == "two_layer":
            if self.data not in ("xor", "ball"):
                raise ValueError(
                    f"model='two_layer' (scalar output, squared loss) needs data 'xor' or "
                    f"'ball', got {self.data!r}; use model='mlp'."
                )
            if self.values("depth") != (1,):
                raise ValueError("model='two_layer' has one hidden layer; drop the depth axis.")
        sam = [o for o in self.values("optimizer") if o != "sgd"]
        if sam and 0.0 in self.values("rho"):
            raise ValueError(
                f"optimizer {sam[0]!r} with rho=0 is plain SGD; give rho values > 0 (or add "
                "'sgd' to the optimizer axis)."
            )
        smallest = min((s for s in self.values("train_size") if s is not None), default=None)
        if smallest is not None and max(self.values("batch_size")) > smallest:
            raise ValueError(
                f"batch_size {max(self.values('batch_size'))} exceeds train_size {smallest}."
            )

    @property
    def classes(self) -> int:
        """Outputs of the models: classes of a classification set, 1 for xor / ball."""
        return CLASSES[self.data]

    def grid(self) -> list[dict[str, Any]]:
        """Every model's hyperparameters (with ``"seed"``), in a fixed order.

        SGD models take ``rho = 0`` and appear once per setting of the other axes.
        """
        axes = list(HYPERPARAMETERS)
        seen: set[tuple] = set()
        out = []
        for combo in itertools.product(*(self.values(a) for a in axes), self.seeds):
            hp = dict(zip([*axes, "seed"], combo, strict=True))
            if hp["optimizer"] == "sgd":
                hp["rho"] = 0.0
            key = tuple(hp.values())
            if key not in seen:
                seen.add(key)
                out.append(hp)
        return out

    def n_models(self) -> int:
        """Number of models in the grid."""
        return len(self.grid())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (`from_dict` inverts it)."""
        return {
            "name": self.name,
            "data": self.data,
            "model": self.model,
            "axes": {k: list(v) for k, v in self.axes.items()},
            "seeds": list(self.seeds),
            "stop": {
                "metric": self.stop.metric,
                "threshold": self.stop.threshold,
                "max_steps": self.stop.max_steps,
                "check_every": self.stop.check_every,
            },
            "d": self.d,
            "pool_size": self.pool_size,
            "test_size": self.test_size,
            "data_seed": self.data_seed,
            "dtype": self.dtype,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudySpec:
        """The spec of `to_dict`'s dict."""
        kw = dict(data)
        kw["axes"] = {k: tuple(v) for k, v in kw["axes"].items()}
        kw["seeds"] = tuple(kw["seeds"])
        kw["stop"] = StopRule(**kw["stop"])
        return cls(**kw)


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Steps of one pass over ``train_size`` points (the last batch may be smaller)."""
    return math.ceil(train_size / batch_size)
