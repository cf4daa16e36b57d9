r"""1-D and 2-D loss landscapes: $L(\theta + t d)$ and $L(\theta + x d_1 + y d_2)$."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor, nn

from sharpgen._validation import check_choice, check_generator
from sharpgen.curvature import ModelObjective
from sharpgen.curvature._params import ParamSelection
from sharpgen.landscape._args import (
    check_direction_like,
    check_grid_options,
    check_num_points,
    check_span,
    check_span_2d,
    check_tensor_map,
)
from sharpgen.landscape._directions import (
    NORMALIZATIONS,
    ONE_DIM,
    hessian_directions,
    normalize_direction,
    random_direction,
)
from sharpgen.landscape._grid import DEFAULT_MEMORY, evaluate_points, points_per_chunk
from sharpgen.landscape._results import Landscape1D, Landscape2D
from sharpgen.sharpness._objective_arg import objective_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["loss_landscape_1d", "loss_landscape_2d"]

Direction = str | Mapping[str, Tensor]


class _GridOptions(TypedDict, total=False):
    """Keyword options shared by `loss_landscape_1d` and `loss_landscape_2d`."""

    metric: Callable[[Any, Any], Tensor] | None
    generator: torch.Generator | None
    chunk_size: int | None
    memory: int
    progress: bool
    params: ParamSelection
    bn: str
    reduction: str
    process_group: Any


_DEFAULTS: dict[str, Any] = dict(
    metric=None, generator=None, chunk_size=None, memory=DEFAULT_MEMORY, progress=False,
    params=None, bn="eval", reduction="mean", process_group="auto",
)  # fmt: skip


def _options(where: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with their defaults, checked before any work is done."""
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(
            f"{where}() got unexpected keyword argument(s) {unknown}; the options are "
            f"{sorted(_DEFAULTS)} besides the direction, normalization, span and grid ones."
        )
    opts = {**_DEFAULTS, **options}
    opts["generator"] = check_generator(opts["generator"])
    opts["chunk_size"], opts["memory"] = check_grid_options(
        metric=opts["metric"], chunk_size=opts["chunk_size"], memory=opts["memory"],
        progress=opts["progress"], reduction=opts["reduction"],
    )  # fmt: skip
    return opts


def _check_how(how: Any, k: int, normalization: Any, one_dim: Any) -> None:
    """The direction arguments, checked before any work (the names and shapes come later)."""
    if normalization is not None:
        check_choice("normalization", normalization, NORMALIZATIONS)
    check_choice("one_dim", one_dim, ONE_DIM)
    name = "direction" if k == 1 else "directions"
    if isinstance(how, str):
        check_choice(name, how, ("random", "hessian"))
        return
    if k == 2 and isinstance(how, Mapping):
        raise TypeError("directions must be 'random', 'hessian' or a pair of dicts, got one dict.")
    given = [how] if isinstance(how, Mapping) else how
    if not isinstance(given, Sequence) or len(given) != k:
        raise TypeError(
            f"{name} must be 'random', 'hessian' or {k} dict(s) name -> tensor shaped "
            f"like the parameters, got {type(how).__name__}."
        )
    for i, d in enumerate(given):
        check_tensor_map(name if k == 1 else f"directions[{i}]", d)


def _grid(
    where: str,
    model: Any,
    loss_fn: Any,
    data: Any,
    opts: dict[str, Any],
    how: Any,
    k: int,
    normalization: str | None,
    one_dim: str,
) -> tuple[ModelObjective, list[dict[str, Tensor]], str, str, Tensor | None]:
    """Objective and directions of a landscape: ``(obj, dirs, kind, norm, eigs)``."""
    obj = objective_of(model, loss_fn, data, opts["params"], bn=opts["bn"],
                       reduction=opts["reduction"], process_group=opts["process_group"],
                       where=where)  # fmt: skip
    if obj.dropout:
        raise ValueError(
            f"{where} needs a deterministic loss; build the objective with dropout=False."
        )
    return (obj, *_directions(obj, how, k, normalization, one_dim, opts["generator"]))


def _evaluate(
    where: str, obj: ModelObjective, dirs: list[dict[str, Tensor]], coeffs: Tensor,
    opts: dict[str, Any],
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    return evaluate_points(obj, dirs, coeffs, metric=opts["metric"],
                           chunk_size=opts["chunk_size"],
                           max_chunk=points_per_chunk(obj, opts["memory"]),
                           progress=opts["progress"], desc=where)  # fmt: skip


def _directions(
    obj: ModelObjective,
    how: Any,
    k: int,
    normalization: str | None,
    one_dim: str,
    generator: torch.Generator | None,
) -> tuple[list[dict[str, Tensor]], str, str, Tensor | None]:
    """Resolve ``how`` into ``k`` normalized directions; returns (dirs, kind, norm, eigs)."""
    eigs = None
    if isinstance(how, str):
        if how == "random":
            norm = normalization or "filter"
            dirs = [random_direction(obj.params, norm, one_dim=one_dim, generator=generator)
                    for _ in range(k)]  # fmt: skip
            return dirs, "random", norm, None
        dirs, eigs = hessian_directions(obj, k=k, generator=generator)
        if len(dirs) < k:
            raise ValueError(f"the Hessian has fewer than {k} eigenvectors; use random ones.")
        kind = "hessian"
    else:
        given = [how] if isinstance(how, Mapping) else list(how)
        names = ["direction"] if k == 1 else [f"directions[{i}]" for i in range(k)]
        dirs = [
            {n: t.detach().to(obj.dtype) for n, t in check_direction_like(d, obj.params, m).items()}
            for m, d in zip(names, given, strict=True)
        ]
        kind = "given"
    norm = normalization or "none"
    dirs = [normalize_direction(d, obj.params, norm, one_dim="keep" if norm == "none" else one_dim)
            for d in dirs]  # fmt: skip
    return dirs, kind, norm, eigs


def loss_landscape_1d(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    direction: Direction = "random",
    normalization: str | None = None,
    one_dim: str = "zero",
    span: tuple[float, float] = (-1.0, 1.0),
    num_points: int = 51,
    **options: Unpack[_GridOptions],
) -> Landscape1D:
    r"""The loss along a line, $t \mapsto L(\theta + t\,d)$, on an even grid of ``span``.

    The direction $d$ is random and filter-normalized (Li et al. 2018; ``"random"``,
    default), the top Hessian eigenvector (``"hessian"``, a unit vector) or a dict given
    by the caller; see `random_direction` and `normalize_direction` for the
    normalizations (default ``"filter"`` for random directions, ``"none"`` otherwise).

    The grid is evaluated by batching parameter points through ``torch.func.vmap`` over
    ``torch.func.functional_call`` (``chunk_size`` points per forward pass; by default the
    chunk size is tuned while the first batch is evaluated, among sizes that fit in
    ``memory`` bytes); the model is never written to and is left
    exactly as it was. BatchNorm layers use the running statistics of the model at
    $\theta$ at every point (``bn="eval"``) or the batch statistics (``bn="batch"``).

    Args:
        model: Any ``nn.Module`` or a ready `sharpgen.ModelObjective`.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar; None: the loss the model
            returns (`sharpgen.model_loss`, a Hugging Face model with the labels in the batch).
        data: One batch or an iterable of batches (visited once).
        direction: ``"random"``, ``"hessian"`` or a dict name -> tensor.
        normalization: ``"filter"``, ``"layer"``, ``"none"`` or None (the default above).
        one_dim: Handling of 1-D parameters by the normalization (``"zero"``, default, as
            in Li et al.; ``"normalize"``; ``"keep"``).
        span: ``(low, high)`` of $t$.
        num_points: Grid points ($\ge 2$).
        **options: The keyword options below, shared with `loss_landscape_2d`.

    Keyword Args:
        metric (Callable | None): Optional ``metric(outputs, targets)`` (e.g. accuracy)
            evaluated from the same forward passes and combined over batches like the loss.
        generator (torch.Generator | None): Source of random directions; the global RNG is
            untouched when given.
        chunk_size (int | None): Points per vectorized forward pass; None: tuned (see above).
        memory (int): Byte budget of the largest chunk tried (parameters plus activations,
            estimated from one forward pass; default 256 MiB).
        progress (bool): A tqdm bar over the chunks.
        params (ParamSelection): Parameter selection (the others stay fixed).
        bn (str): ``"eval"`` (default) or ``"batch"``.
        reduction (str): ``"mean"`` (default) or ``"sum"``.
        process_group (Any): See `sharpgen.ModelObjective` (default ``"auto"``).

    Returns:
        A `Landscape1D` (``.plot()`` draws the curve with the minimum marked).

    Raises:
        ValueError: Bad ``span`` (a pair of finite numbers, low < high), ``num_points``,
            ``direction`` names or shapes, ``normalization``, ``one_dim`` or option values.
        TypeError: An unknown keyword option, or an argument of the wrong type; every
            argument is checked before any work is done.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> y = model(x).detach()
        >>> d = {"weight": torch.tensor([[1.0, 0.0]], dtype=torch.float64)}
        >>> res = loss_landscape_1d(model, torch.nn.functional.mse_loss, (x, y), direction=d,
        ...                         span=(-1, 1), num_points=3)
        >>> res.loss.tolist()  # L(t) = t^2 / 2
        [0.5, 0.0, 0.5]

    References:
        H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the loss landscape
        of neural nets", NeurIPS 2018.
    """
    lo, hi = check_span("span", span)
    (num_points,) = check_num_points(num_points)
    opts = _options("loss_landscape_1d", options)
    _check_how(direction, 1, normalization, one_dim)
    obj, dirs, kind, norm, _ = _grid("loss_landscape_1d", model, loss_fn, data, opts, direction,
                                     1, normalization, one_dim)  # fmt: skip
    t = torch.linspace(lo, hi, num_points, dtype=torch.float64)
    loss, met = _evaluate("loss_landscape_1d", obj, dirs, t[:, None], opts)
    return Landscape1D(coords=t, loss=loss, metric=met, center_loss=float(obj.loss()),
                       direction=kind, normalization=norm, num_loss_evals=num_points)  # fmt: skip


def loss_landscape_2d(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    directions: str | Sequence[Mapping[str, Tensor]] = "random",
    normalization: str | None = None,
    one_dim: str = "zero",
    span: Any = (-1.0, 1.0),
    num_points: int | tuple[int, int] = 41,
    **options: Unpack[_GridOptions],
) -> Landscape2D:
    r"""The loss on a plane, $(x, y) \mapsto L(\theta + x\,d_1 + y\,d_2)$, on an even grid.

    Directions: two independent random filter-normalized ones (``"random"``, default; Li
    et al. 2018), the top-2 Hessian eigenvectors (``"hessian"``; their eigenvalues are in
    the result) or two dicts from the caller. Evaluation, model contract, BatchNorm and
    arguments (and the keyword ``**options``: ``metric``, ``generator``, ``chunk_size``,
    ``memory``, ``progress``, ``params``, ``bn``, ``reduction``, ``process_group``) as in
    `loss_landscape_1d`; ``span`` is one pair for both axes or a pair of pairs,
    ``num_points`` one int or ``(nx, ny)``.

    Returns:
        A `Landscape2D` (``.plot("contour")`` or ``.plot("surface")``, minimum marked).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> e = [{"weight": torch.eye(2, dtype=torch.float64)[i : i + 1]} for i in range(2)]
        >>> res = loss_landscape_2d(model, torch.nn.functional.mse_loss, (x, model(x).detach()),
        ...                         directions=e, num_points=3)
        >>> res.loss.tolist()  # (x^2 + y^2) / 2
        [[1.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 1.0]]

    References:
        H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the loss landscape
        of neural nets", NeurIPS 2018.
    """
    (xlo, xhi), (ylo, yhi) = check_span_2d(span)
    nx, ny = check_num_points(num_points, 2)
    opts = _options("loss_landscape_2d", options)
    _check_how(directions, 2, normalization, one_dim)
    obj, dirs, kind, norm, eigs = _grid("loss_landscape_2d", model, loss_fn, data, opts,
                                        directions, 2, normalization, one_dim)  # fmt: skip
    xs = torch.linspace(xlo, xhi, nx, dtype=torch.float64)
    ys = torch.linspace(ylo, yhi, ny, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, ys, indexing="ij")
    coeffs = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    loss, met = _evaluate("loss_landscape_2d", obj, dirs, coeffs, opts)
    return Landscape2D(
        x=xs, y=ys, loss=loss.reshape(nx, ny),
        metric=None if met is None else met.reshape(nx, ny),
        center_loss=float(obj.loss()), direction=kind, normalization=norm,
        num_loss_evals=nx * ny, eigenvalues=eigs,
    )  # fmt: skip
