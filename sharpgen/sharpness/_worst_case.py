r"""Worst-case (SAM) sharpness: the largest loss increase within a $\rho$-neighbourhood."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._distributed import check_generator_agrees, global_means
from sharpgen._validation import check_rho
from sharpgen.curvature import (
    ModelObjective,
    as_batches,
    flatten_params,
    num_samples,
    unflatten_params,
    without_sampler_padding,
)
from sharpgen.linalg import LinearOperator
from sharpgen.sharpness._chunks import concatenate_batches, split_chunks
from sharpgen.sharpness._common import (
    MeasureSource,
    check_adaptive,
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_positive,
    draw,
    progress_bar,
)
from sharpgen.sharpness._perturbation import project_perturbation, sam_perturbation

__all__ = ["NORMS", "SharpnessResult", "sam_sharpness"]

NORMS = ("l2", "linf")


@dataclass(frozen=True, repr=False)
class SharpnessResult:
    r"""The worst-case loss increase found by `sam_sharpness`.

    ``float(result)`` is ``value``.

    Attributes:
        value: $L(\theta + \varepsilon) - L(\theta)$ for the best perturbation found (for
            m-sharpness the mean of ``chunk_values``). A lower bound of the true maximum
            (the attack is a local search); exactly the SAM loss increase for ``steps=1``.
        chunk_values: The value of each chunk, shape ``(K,)`` float64 on the CPU (``K = 1``,
            the whole data, without ``m``).
        loss: $L(\theta)$ (for m-sharpness the mean of the chunk losses).
        perturbed_loss: $L(\theta + \varepsilon)$ (mean over chunks for m-sharpness).
        perturbation: The best $\varepsilon$ as a dict name -> tensor; for m-sharpness a
            list with one dict per chunk; None when ``return_perturbation=False``.
        rho: The radius.
        norm: ``"l2"`` or ``"linf"``.
        adaptive: Whether the neighbourhood was the adaptive (ASAM) one.
        steps: Ascent steps per run.
        restarts: Random restarts per chunk.
        m: Chunk size, or None.
        num_gradient_evals: Gradient evaluations spent (each one pass over the chunk or
            the data, forward and backward).
        num_loss_evals: Loss-only evaluations spent (forward passes).
    """

    value: float
    chunk_values: Tensor
    loss: float
    perturbed_loss: float
    perturbation: dict[str, Tensor] | list[dict[str, Tensor]] | None
    rho: float
    norm: str
    adaptive: bool
    steps: int
    restarts: int
    m: int | None
    num_gradient_evals: int
    num_loss_evals: int

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        extra = f", m={self.m}, chunks={self.chunk_values.numel()}" if self.m is not None else ""
        return (
            f"SharpnessResult(value={self.value:.6g}, loss={self.loss:.6g}, rho={self.rho:g}, "
            f"norm={self.norm!r}, adaptive={self.adaptive}, steps={self.steps}, "
            f"restarts={self.restarts}{extra}, num_gradient_evals={self.num_gradient_evals}, "
            f"num_loss_evals={self.num_loss_evals})"
        )


@dataclass
class _Counts:
    grad: int = 0
    loss: int = 0


def sam_sharpness(
    model: nn.Module | ModelObjective | LinearOperator,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    rho: float | None = None,
    *,
    steps: int = 1,
    step_size: float | None = None,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    m: int | None = None,
    restarts: int = 0,
    generator: torch.Generator | None = None,
    return_perturbation: bool = True,
    progress: bool = False,
    **objective_options: Any,
) -> SharpnessResult:
    r"""Worst-case sharpness $\max_{\varepsilon \in C} L(\theta+\varepsilon) - L(\theta)$.

    The neighbourhood is the one of `sam_perturbation`:
    $C = \{\varepsilon : \|T_\theta^{-1}\varepsilon\|_p \le \rho\}$ with $p = 2$
    (``norm="l2"``, a ball) or $p = \infty$ (``norm="linf"``, a box), and
    $T_\theta = \operatorname{diag}(|\theta| + \eta)$ with ``adaptive=True`` (ASAM's
    scale-invariant ellipsoid / box; $T = I$ otherwise).

    **Attack.** Projected steepest ascent. The first step from $\varepsilon = 0$ is the SAM
    step $\varepsilon_1 = $ `sam_perturbation`$(\nabla L(\theta), \theta, \rho)$, so
    ``steps=1`` returns exactly $L(\theta + \varepsilon_1) - L(\theta)$, the quantity SAM
    minimizes. With ``steps > 1`` each further step is

    $$
    \varepsilon_{t+1} = \Pi_C\bigl(\varepsilon_t +
    \texttt{sam\_perturbation}(\nabla L(\theta + \varepsilon_t), \theta, \alpha)\bigr),
    $$

    a steepest-ascent step of length $\alpha$ = ``step_size`` in the norm of $C$ followed by
    the exact Euclidean projection `project_perturbation`. Every iterate is evaluated and
    the best one is returned, so more steps never give a smaller value. ``restarts=R`` adds
    $R$ runs from random points drawn uniformly from $C$ (each with ``steps`` ascent
    steps); this matters at a stationary point, where $\nabla L(\theta) = 0$ makes the SAM
    step zero. For small $\rho$ at a minimum the value tends to $\rho^2\lambda_{\max}/2$
    ($\ell_2$), the quadratic model's maximum.

    **m-sharpness** (Foret et al. 2021; Andriushchenko & Flammarion 2022): with ``m`` the
    $n$ samples are cut into $K = n/m$ consecutive chunks of $m$ samples (batches are
    concatenated first), each chunk's own loss is attacked separately, and the result is
    the mean of the $K$ chunk values. ``m`` must divide $n$.

    Cost: per chunk and run ``steps`` gradient evaluations and one loss evaluation (the
    main run also evaluates the gradient at $\theta$ as its first). A gradient evaluation
    is one forward and backward pass over the chunk (or the data).

    Args:
        model: Any ``nn.Module`` (left exactly as it was), with ``loss_fn`` and ``data``;
            or a ready `sharpgen.curvature.ModelObjective` or curvature operator alone
            (then pass ``rho`` by keyword; with ``m`` its chunks are cut from its data).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch ``(inputs, targets)`` or an iterable of batches.
        rho: Radius $\rho \ge 0$ ($\rho = 0$ gives exactly 0).
        steps: Ascent steps per run, ``>= 1``.
        step_size: Length $\alpha > 0$ of the ascent steps after the first; default
            $\rho$ for ``"l2"`` (on a quadratic this is projected power iteration) and
            $2.5\rho/$``steps`` for ``"linf"`` (Madry et al. 2018).
        norm: ``"l2"`` or ``"linf"``.
        adaptive: Use the adaptive neighbourhood of ASAM.
        eta: Offset $\eta \ge 0$ of the adaptive scaling.
        m: Chunk size for m-sharpness (a divisor of the number of samples), or None.
        restarts: Number of extra runs from random feasible points, ``>= 0``.
        generator: Source of the random starting points; the global RNG is untouched when
            given. Without restarts the function is deterministic.
        return_perturbation: Keep the best perturbation(s) in the result (set False to
            save memory with many chunks).
        progress: Show a tqdm progress bar over the evaluations.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params`` (the perturbation acts on these), ``bn`` (``"eval"``: running
            statistics; ``"batch"``: statistics of the chunk or batch, as during SAM
            training), ``dropout`` (losses become random), ``reduction`` and
            ``process_group`` (``"auto"`` (default), ``None`` or a ``torch.distributed``
            group, see the Distributed guide: the loss and gradient are all-reduced, so
            the attack is on the global loss. With ``m`` every process cuts its own shard
            into chunks (``m`` must divide it), the values are means over the chunks of
            all processes (one all-reduce) and ``chunk_values`` holds this process's
            chunks). ``backend`` is accepted and unused (no curvature products).

    Returns:
        A `SharpnessResult`.

    Raises:
        ValueError: ``rho <= 0``, ``steps < 1``, ``restarts < 0``, ``eta < 0``,
            ``step_size <= 0``, an unknown ``norm`` (the valid ones are listed), an ``m``
            that exceeds or does not divide the number of samples, invalid model/data
            arguments.
        TypeError: Wrongly typed arguments.
        FloatingPointError: A non-finite loss or gradient.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> data = (x, model(x).detach())  # at a minimum: the gradient is zero
        >>> res = sam_sharpness(model, torch.nn.functional.mse_loss, data, rho=0.1,
        ...                     steps=20, restarts=1, generator=torch.Generator().manual_seed(0))
        >>> round(res.value, 6)  # rho^2 * lambda_max / 2 with H = diag(1, 4)
        0.02

    References:
        P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-aware minimization for
        efficiently improving generalization", ICLR 2021. J. Kwon et al., "ASAM", ICML
        2021. M. Andriushchenko, N. Flammarion, "Towards understanding sharpness-aware
        minimization", ICML 2022. A. Madry et al., "Towards deep learning models
        resistant to adversarial attacks", ICLR 2018.
    """
    source = MeasureSource(model, loss_fn, data, objective_options, where="sam_sharpness")
    if rho is None:
        raise TypeError("sam_sharpness needs the radius rho, e.g. rho=0.05.")
    rho = check_rho(rho)  # rho = 0 is allowed: the sharpness is then exactly 0
    steps = check_int("steps", steps, hint="steps=1 is one SAM step.")
    if step_size is not None:
        step_size = check_positive("step_size", step_size, hint="or None for the default.")
    norm = check_choice("norm", norm, NORMS)
    adaptive, eta = check_adaptive(adaptive, eta)
    restarts = check_int("restarts", restarts, minimum=0)
    generator = check_generator(generator)
    return_perturbation = check_bool("return_perturbation", return_perturbation)
    check_bool("progress", progress)
    group = source.process_group
    if group is not None and restarts > 0:
        check_generator_agrees(generator, group, source.device, where="sam_sharpness")
    if step_size is None:
        step_size = rho if norm == "l2" else 2.5 * rho / steps
    if m is not None:
        m = check_int("m", m, hint="m is the number of samples per chunk.")
        chunks: list[Any] = _chunks(source.raw_data, m)
    else:
        if source.ready is None:
            as_batches(data)  # validates the kind of data before any work
        chunks = [None]  # the whole data, with the process group
    options = {"rho": rho, "norm": norm, "adaptive": adaptive, "eta": eta}
    counts = _Counts()
    total = len(chunks) * (restarts + 1) * (steps + 1)
    values, losses, perturbed, best_eps = [], [], [], []
    with progress_bar(progress, total=total, desc="sam_sharpness", unit="eval") as bar:
        for chunk in chunks:
            obj = source.objective() if chunk is None else source.objective_on(chunk)
            loss0, loss1, eps = _attack(
                obj, steps, step_size, restarts, generator, options, counts, bar
            )
            losses.append(loss0)
            perturbed.append(loss1)
            values.append((loss1 - loss0).to(device="cpu", dtype=torch.float64))
            if return_perturbation:
                best_eps.append(eps)
    chunk_values = torch.stack(values)
    perturbation: Any = None
    if return_perturbation:
        perturbation = best_eps if m is not None else best_eps[0]
    stats = [chunk_values, torch.stack(losses).double().cpu(),
             torch.stack(perturbed).double().cpu()]  # fmt: skip
    if m is not None and group is not None:  # mean over the chunks of all processes
        means = global_means(stats, group, what="the m-sharpness chunk values")
    else:
        means = [float(s.mean()) for s in stats]
    return SharpnessResult(
        value=means[0],
        chunk_values=chunk_values,
        loss=means[1],
        perturbed_loss=means[2],
        perturbation=perturbation,
        rho=rho,
        norm=norm,
        adaptive=adaptive,
        steps=steps,
        restarts=restarts,
        m=m,
        num_gradient_evals=counts.grad,
        num_loss_evals=counts.loss,
    )


def _chunks(data: Any, m: int) -> list[tuple[Any, Any]]:
    """The data cut into consecutive chunks of ``m`` samples (``m`` must divide ``n``)."""
    batch = concatenate_batches(without_sampler_padding(data))
    n = num_samples(batch[0])
    if m > n:
        raise ValueError(
            f"m={m} exceeds the number of samples n={n}; pass m <= {n} (m={n} is plain "
            "full-data sharpness)."
        )
    if n % m:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(
            f"m={m} does not divide the number of samples n={n}; pass a divisor of n, "
            f"e.g. one of {divisors[:12]}."
        )
    return split_chunks(batch, m)


def _shift(theta: dict[str, Tensor], eps: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: t + eps[n] for n, t in theta.items()}


def _attack(
    obj: ModelObjective,
    steps: int,
    step_size: float,
    restarts: int,
    generator: torch.Generator | None,
    options: dict[str, Any],
    counts: _Counts,
    bar: Any,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Best ``(L(theta), L(theta + eps), eps)`` over the main run and the restarts."""
    theta = obj.params
    loss0, grad0 = obj.loss_and_gradient()
    counts.grad += 1
    bar.update(1)
    start = sam_perturbation(grad0, theta, **options)
    best_loss, best_eps = _run(obj, start, steps - 1, step_size, options, counts, bar)
    for _ in range(restarts):
        start = _random_start(theta, generator, options)
        loss, eps = _run(obj, start, steps, step_size, options, counts, bar)
        if loss > best_loss:
            best_loss, best_eps = loss, eps
    return loss0, best_loss, best_eps


def _run(
    obj: ModelObjective,
    eps: dict[str, Tensor],
    updates: int,
    step_size: float,
    options: dict[str, Any],
    counts: _Counts,
    bar: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Evaluate ``eps`` and ``updates`` projected ascent steps from it; keep the best."""
    theta = obj.params
    best_loss: Tensor | None = None
    best_eps = eps
    for t in range(updates + 1):
        if t < updates:
            loss, grad = obj.loss_and_gradient(_shift(theta, eps))
            counts.grad += 1
        else:
            loss = obj.loss(_shift(theta, eps))
            counts.loss += 1
        bar.update(1)
        if best_loss is None or loss > best_loss:
            best_loss, best_eps = loss, eps
        if t < updates:
            step = sam_perturbation(
                grad, theta, step_size, norm=options["norm"], adaptive=options["adaptive"],
                eta=options["eta"],
            )  # fmt: skip
            eps = project_perturbation(_shift(eps, step), theta, **options)
    assert best_loss is not None
    return best_loss, best_eps


def _random_start(
    theta: dict[str, Tensor], generator: torch.Generator | None, options: dict[str, Any]
) -> dict[str, Tensor]:
    r"""A point drawn uniformly from $C = \{\varepsilon: \|T^{-1}\varepsilon\|_p \le \rho\}$."""
    flat = flatten_params(theta)
    n, dtype, device = flat.numel(), flat.dtype, flat.device
    rho = options["rho"]
    if options["norm"] == "linf":
        u = draw("uniform", (n,), generator=generator, dtype=dtype, device=device) * rho
    else:
        z = draw("gaussian", (n,), generator=generator, dtype=dtype, device=device)
        direction = z / torch.linalg.vector_norm(z).clamp_min(torch.finfo(dtype).tiny)
        r = draw("uniform", (1,), generator=generator, dtype=dtype, device=device).abs()
        radius = rho * float(r) ** (1.0 / n)  # |U(-1, 1)| is uniform on [0, 1]
        u = direction * radius
    if options["adaptive"]:
        u = u * (flat.abs() + options["eta"])
    if not math.isfinite(float(u.abs().max())):
        raise FloatingPointError("the random starting point is not finite; check the parameters.")
    # the projection only removes rounding beyond the boundary
    return project_perturbation(unflatten_params(u, theta), theta, **options)
