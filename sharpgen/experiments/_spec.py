"""Experiment specifications: what one group of runs trains, and how."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sharpgen.experiments._batched import ARCHITECTURES, LOSSES

__all__ = ["METHODS", "Phase", "ExperimentSpec"]

METHODS = ("sam1", "projected_sam1", "sgd")
SAMPLINGS = ("uniform", "permutation")
DATASETS = ("xor_cube", "uniform_ball")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Phase:
    r"""A stretch of training with a constant learning rate and SAM radius.

    Args:
        epochs: Number of epochs (one epoch is ``n / batch_size`` steps).
        lr: Learning rate $\\eta$.
        rho: SAM radius $\\rho$ (ignored by ``method="sgd"``; ``rho=0`` makes 1-SAM plain SGD).
    """

    epochs: int
    lr: float
    rho: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"Phase epochs={self.epochs!r} must be a positive integer")
        if not self.lr >= 0:
            raise ValueError(f"Phase lr={self.lr!r} must be >= 0")
        if not self.rho >= 0:
            raise ValueError(f"Phase rho={self.rho!r} must be >= 0")


@dataclass(frozen=True)
class ExperimentSpec:
    r"""One group of runs (one per seed) of the paper's experiments.

    Args:
        name: Identifier, e.g. ``"paper-fig1b"`` or ``"quick-no-bias-sam"``.
        arch: ``"no_bias"``, ``"bias"``, ``"simplified_bn"`` or ``"simplified_ln"``.
        method: ``"sam1"`` (1-SAM: normalized SAM on one example per step,
            $\theta \leftarrow \theta - \eta \nabla L_k(\theta + \rho \nabla L_k(\theta) /
            \lVert \nabla L_k(\theta) \rVert)$), ``"projected_sam1"`` (1-SAM, then the first
            layer $(W_1, b_1)$ is projected onto the Frobenius ball of radius
            ``projection_radius``) or ``"sgd"`` (mini-batch SGD / full-batch GD with weight
            decay $\theta \leftarrow \theta - \eta(\nabla L_B(\theta) + \lambda \theta)$).
        phases: Learning-rate / radius schedule, run one after the other.
        d: Input dimension.
        n: Number of training points.
        width: Hidden width $m$.
        data: ``"xor_cube"`` ($x$ uniform on $\{-1,1\}^d$, $y = x_1 x_2$) or
            ``"uniform_ball"`` ($x$ uniform in the ball of radius $\sqrt d$,
            $y = |x_1| - |x_2|$).
        loss: ``"mse"`` ($(f - y)^2$, no 1/2) or ``"logistic"`` (label smoothing below).
        label_smoothing: Label smoothing $p$ of the logistic loss.
        weight_decay: $\lambda$ of ``"sgd"``.
        batch_size: Examples per step (1 for 1-SAM; ``n`` for full-batch GD).
        sampling: ``"uniform"`` (each step's examples drawn uniformly with replacement, as the
            paper's 1-SAM) or ``"permutation"`` (a fresh permutation every epoch).
        projection_radius: Radius of ``"projected_sam1"``.
        init_scale: Multiplies every initial parameter.
        first_layer_init_scale: Multiplies the initial ``W1`` and ``b1`` (0.01 = "init / 100").
        gamma_init: Initial value of the Sim-BN scale $\gamma$.
        eps: The $\varepsilon$ of Sim-LN, $h / \max(\lVert h\rVert, \varepsilon)$.
        activation: ``"relu"`` or ``"softplus"`` (the paper's Fig. 5 variant).
        depth: Number of layers; ``depth > 2`` is the deep net with bias in the first layer
            only (``arch="bias"``, every hidden layer of size ``width``; the paper's Fig. 11).
            Softplus and deep nets train with the autograd backend (``torch.func.vmap``),
            slower than the closed form of the two-layer ReLU nets.
        test_size: Fresh test points per run.
        eval_every: Metrics are recorded every this many epochs (and at the start and end).
        dtype: ``"float32"`` or ``"float64"``.
        paper: Which figure of the paper this reproduces, e.g. ``"Fig. 1b"``.
        notes: Deviations from the paper and why.
    """

    name: str
    arch: str
    method: str
    phases: tuple[Phase, ...]
    d: int = 30
    n: int = 100
    width: int = 500
    data: str = "xor_cube"
    loss: str = "mse"
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 1
    sampling: str = "uniform"
    projection_radius: float | None = None
    init_scale: float = 1.0
    first_layer_init_scale: float = 1.0
    gamma_init: float = 1.0
    eps: float = 1e-3
    activation: str = "relu"
    depth: int = 2
    test_size: int = 2000
    eval_every: int = 10
    dtype: str = "float32"
    paper: str = ""
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(self.phases))
        self._check_choices()
        self._check_sizes()
        self._check_method_options()
        self._check_model()

    def _check_choices(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch={self.arch!r} is not one of {ARCHITECTURES}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {LOSSES}")
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r} is not one of {DATASETS}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling={self.sampling!r} is not one of {SAMPLINGS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")

    def _check_sizes(self) -> None:
        if not self.phases or not all(isinstance(p, Phase) for p in self.phases):
            raise ValueError(f"phases={self.phases!r} must be a non-empty sequence of Phase")
        for key in ("d", "n", "width", "batch_size", "test_size", "eval_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if self.batch_size > self.n:
            raise ValueError(f"batch_size={self.batch_size} must be <= n={self.n}")
        if self.sampling == "permutation" and self.n % self.batch_size:
            raise ValueError(
                f"sampling='permutation' needs batch_size={self.batch_size} to divide n={self.n}"
            )

    def _check_method_options(self) -> None:
        if self.method == "projected_sam1" and not (
            self.projection_radius is not None and self.projection_radius > 0
        ):
            raise ValueError(
                f"method='projected_sam1' needs projection_radius > 0, got "
                f"{self.projection_radius!r}"
            )
        if self.method != "sgd" and self.weight_decay:
            raise ValueError(
                f"weight_decay={self.weight_decay} is only used by method='sgd'; set it to 0"
            )

    def _check_model(self) -> None:
        if self.activation not in ("relu", "softplus"):
            raise ValueError(f"activation={self.activation!r} is not 'relu' or 'softplus'")
        if not isinstance(self.depth, int) or self.depth < 2:
            raise ValueError(f"depth={self.depth!r} must be an integer >= 2")
        if self.depth > 2 and self.arch != "bias":
            raise ValueError(
                f"depth={self.depth} nets have a bias in the first layer only: use arch='bias', "
                f"not {self.arch!r}"
            )
        if self.activation != "relu" and self.arch == "simplified_bn":
            raise ValueError("activation='softplus' is not supported with arch='simplified_bn'")
        if self.eps <= 0:
            raise ValueError(f"eps={self.eps!r} must be > 0")

    @property
    def epochs(self) -> int:
        """Total number of epochs over all phases."""
        return sum(p.epochs for p in self.phases)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, ``ceil(n / batch_size)``."""
        return -(-self.n // self.batch_size)

    def to_dict(self) -> dict:
        """A JSON-serializable dict (``from_dict`` inverts it)."""
        out = dataclasses.asdict(self)
        out["phases"] = [dataclasses.asdict(p) for p in self.phases]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentSpec:
        """Inverse of `to_dict`."""
        data = dict(data)
        data["phases"] = tuple(Phase(**p) for p in data["phases"])
        return cls(**data)

    def replace(self, **changes) -> ExperimentSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
