r"""Extreme eigenvalues of the loss Hessian of a model (Lanczos)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._validation import is_int
from sharpgen.curvature import HessianOperator, ModelObjective, unflatten_params
from sharpgen.curvature._auto_micro import micro_plan_fields
from sharpgen.curvature._plan import check_memory_budget, plan_memory
from sharpgen.curvature._products import release_gradients
from sharpgen.linalg import EigenResult, LinearOperator, lanczos
from sharpgen.linalg._basis import STORAGES
from sharpgen.linalg._lanczos import BOUNDS, check_basis_dtype
from sharpgen.linalg._probes import random_unit_vector
from sharpgen.linalg._reorth import REORTH
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

__all__ = [
    "START",
    "WHICH",
    "ModelEigenResult",
    "gradient_start",
    "top_eigenvalues",
    "warm_start",
]

WHICH = ("largest", "smallest", "both_ends", "magnitude")
START = ("auto", "gradient", "random")

#: Weight of the random unit vector added to the unit gradient in the gradient start.
GRADIENT_MIX = 0.3
#: Parameter-sized vectors a Lanczos step holds beside the graph and the basis: the two
#: latest basis rows (held so that a step never reads the basis: partial
#: reorthogonalization) and the product (the start: the gradient and the start).
WORK_VECTORS = 3


def gradient_start(
    gradient: Tensor, generator: torch.Generator | None, mix: float = GRADIENT_MIX
) -> Tensor | None:
    r"""The start vector $g/\|g\| + \mathrm{mix}\, r/\|r\|$, $r$ Gaussian from ``generator``.

    None when the gradient is zero or not finite (then the start is purely random).
    """
    norm = torch.linalg.vector_norm(gradient)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return None
    r = random_unit_vector(gradient.numel(), generator=generator, dtype=gradient.dtype,
                           device=gradient.device)  # fmt: skip
    # in place on r: mix * r + g / norm, the same numbers as g / norm + mix * r, in one
    # vector beside the gradient instead of three
    return r.mul_(mix).addcdiv_(gradient, norm)


def warm_start(start: Tensor, p: int, generator: torch.Generator | None) -> Tensor:
    r"""The start $u/\|u\| + 0.3\, r/\|r\|$ from a flat vector ``start`` of length ``p``.

    Raises:
        TypeError: If ``start`` is not a floating-point tensor.
        ValueError: If its shape is not ``(p,)``, or it is zero or not finite.
    """
    if not start.is_floating_point():
        raise TypeError(f"start must be a floating-point tensor, got dtype {start.dtype}.")
    if tuple(start.shape) != (p,):
        raise ValueError(
            f"start must be a flat vector of shape ({p},) (one entry per selected "
            f"parameter), got shape {tuple(start.shape)}; pass a previous result's "
            "eigenvectors[:, 0]."
        )
    v0 = gradient_start(start.detach(), generator)
    if v0 is None:
        raise ValueError(
            "start must be a finite nonzero vector; pass start='auto' for the default start."
        )
    return v0


def _start_vector(
    H: LinearOperator, start: str, k: int, which: str, generator: torch.Generator | None
) -> Tensor | None:
    """The Lanczos start of `top_eigenvalues` (None: random, drawn by `lanczos`)."""
    if start == "random" or (start == "auto" and (k > 1 or which not in ("largest", "magnitude"))):
        return None
    if not isinstance(H, HessianOperator):
        if start == "gradient":
            raise ValueError(
                f"start='gradient' needs the Hessian of a model (a model, an objective or a "
                f"HessianOperator), got a {type(H).__name__}; pass start='random'."
            )
        return None
    return gradient_start(H.gradient(), generator)


@dataclass(frozen=True, repr=False)
class ModelEigenResult(EigenResult):
    """A `sharpgen.linalg.EigenResult` whose eigenvectors belong to model parameters.

    Everything of `EigenResult` (``eigenvalues``, ``eigenvectors`` as flat unit columns,
    ``residuals``, ``converged``, ``num_matvecs``, ...), plus the layout of the parameters
    so that an eigenvector can be turned back into a parameter dict.

    Attributes:
        param_shapes: ``((name, shape), ...)`` of the selected parameters, in the order
            of the flat vectors.
    """

    param_shapes: tuple[tuple[str, tuple[int, ...]], ...] = field(default=())

    def eigenvector_dict(self, i: int = 0) -> dict[str, Tensor]:
        """Eigenvector ``i`` as a dict name -> tensor shaped like the parameter.

        Args:
            i: Index into ``eigenvalues``.

        Returns:
            A dict of views of ``eigenvectors[:, i]``.
        """
        k = self.eigenvalues.numel()
        if not is_int(i) or not -k <= i < k:
            raise IndexError(f"i must be an int in [{-k}, {k}), got {i!r}.")
        return unflatten_params(self.eigenvectors[:, i], self._like())

    def eigenvector_dicts(self) -> list[dict[str, Tensor]]:
        """All eigenvectors as parameter dicts, in the order of ``eigenvalues``."""
        return [self.eigenvector_dict(i) for i in range(self.eigenvalues.numel())]

    def _like(self) -> dict[str, Tensor]:
        return {n: torch.empty(s, device="meta") for n, s in self.param_shapes}


def top_eigenvalues(
    model: nn.Module | ModelObjective | LinearOperator,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    k: int = 1,
    *,
    tol: float = 1e-3,
    which: str = "largest",
    max_iter: int | None = None,
    max_basis: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    bound: str = "residual",
    start: str | Tensor = "auto",
    memory_budget: int | str | None = "auto",
    basis_storage: str | None = None,
    basis_dtype: torch.dtype | None = None,
    reorth: str = "auto",
    **objective_options: Any,
) -> ModelEigenResult:
    r"""The ``k`` extreme eigenvalues of the loss Hessian $\nabla^2_\theta L(\theta)$ by Lanczos.

    Runs `sharpgen.linalg.lanczos` (partial reorthogonalization for ``k=1``, full otherwise;
    thick restart; a residual stopping rule) on the `sharpgen.curvature.HessianOperator` of
    ``(model, loss_fn, data)``. With ``converged=True`` every returned value is within
    ``tol`` (relative) of an eigenvalue of the Hessian; otherwise the iteration hit
    ``max_iter`` and the values are the best Ritz values so far. The top eigenvalue
    $\lambda_{\max}$ is the sharpness measure that full-batch SAM and gradient descent at
    the edge of stability act on.

    Cost: one Hessian-vector product per Lanczos step, typically a few dozen for
    ``k=1, tol=1e-3``, and beside it, for ``k=1``, a few passes over one parameter-sized
    vector (the basis is read only where Simon's estimate asks for a reorthogonalization,
    and at a thick restart); for ``k > 1`` an orthogonalization against the whole basis.

    **Memory.** Beyond the model, with $v = p\,b$ the bytes of a parameter-sized vector
    ($b$ bytes per number): the kept gradient graph $G$ (built and counted before the
    plan; `result.memory.graph_bytes`), three working vectors (the two latest basis rows,
    held so that a step never reads the basis, and the product, written in place into
    one buffer and orthogonalized in place), what a product's backward pass holds beyond
    its result, $P$ (one part of the largest parameter's product at a time, and the pass's
    values; planned as the largest parameter plus $G - v$, `result.memory.product_bytes`)
    and the basis of $m$ vectors, $G + P + (3 + m)\,v$; the start (gradient and
    random part) takes two vectors before the first product; with a model (not a ready
    objective) the gradient's values are freed from the kept graph once the start is
    formed, and the whole graph before the $k$ eigenvectors are, so the end holds
    $(k + m)\,v$. The plan (`sharpgen.curvature.plan_memory`, reported as
    ``result.memory``) gives the basis at most a tenth of ``memory_budget`` (on a CPU at
    most 256 MiB) and at least $k + 3$ vectors (thick restart keeps the certificate; a
    small basis costs 10-30% more products); a basis that does not fit goes to host
    memory (CUDA) or a temporary file (CPU). See the Memory guide.

    **Gradient start.** Lanczos converges to $\lambda_{\max}$ at a rate set by the
    spectrum and by the start vector's share of the top eigenvector. The loss gradient $g$
    of a trained network lies mostly in the span of the top few Hessian eigenvectors
    (Gur-Ari, Roberts, Dyer 2018), so a start along $g$ begins with a large share of them:
    with ``start="gradient"`` (the default for the top eigenvalue) Lanczos starts from
    $g/\|g\| + 0.3\, r/\|r\|$; the random part $r$ keeps every eigenvector in the Krylov
    space, so no eigenvalue is hidden, only found later if the gradient happens to be
    orthogonal to it. With kept graphs (the default on one batch, and on several with
    BatchNorm on running statistics) $g$ is a by-product of building them; otherwise it
    costs one gradient pass. On the models of ``benchmarks/bench_topk.py`` (5 seeds,
    ``tol=1e-3``) it cut the products of ``k=1`` from 13-17 to 12-13 (MLP) and 5-6 to 4
    (client), with ``bound="gap"`` from 11-14 to 8-10 and 4-5 to 3, at the same true
    errors; for ``k=5`` it saved at most one product, and on the MLP one ``bound="gap"``
    run in five stopped on a wrong fifth value (error 5e-2): a start biased towards the
    top eigenvectors leaves the gap estimate less to go on for the lower ones. Hence the
    default is the gradient start for ``k=1`` only. The guarantee of ``converged=True``
    (the residual bound) does not depend on the start.

    Args:
        model: Any ``nn.Module`` (left exactly as it was), with ``loss_fn`` and ``data``;
            or a ready `sharpgen.curvature.ModelObjective` or curvature operator alone
            (then pass ``k`` by keyword).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        k: Number of eigenvalues, ``1 <= k < p`` ($p$ = number of selected parameters).
        tol: Relative tolerance, ``> 0``.
        which: ``"largest"`` (algebraic, default), ``"smallest"``, ``"both_ends"`` or
            ``"magnitude"``.
        max_iter: Cap on Lanczos steps (see `sharpgen.linalg.lanczos`).
        max_basis: Basis vectors kept in memory (see `sharpgen.linalg.lanczos`).
        generator: Source of the random start vector; the global RNG is untouched when
            given.
        progress: Show a tqdm progress bar over the products.
        bound: What the stopping rule compares with ``tol``: ``"residual"`` (default, the
            guarantee above) or ``"gap"``, the quadratic error estimate
            $\|r\|^2/\delta$ with the gap $\delta$ read from the other Ritz values (see
            `sharpgen.linalg.lanczos`): 1-5 fewer products, an estimate rather than a
            certificate (true errors below ``tol`` on every model of
            ``benchmarks/bench_topk.py``).
        start: The Lanczos start vector: ``"gradient"``, $v_0 = g/\|g\| + 0.3\, r/\|r\|$
            with $g$ the gradient of the dataset loss and $r$ Gaussian from ``generator``
            (see the note above); ``"random"``, $r$ alone; ``"auto"`` (default):
            ``"gradient"`` for ``k=1`` with ``which="largest"`` or ``"magnitude"`` on the
            Hessian of a model, ``"random"`` otherwise. A zero or non-finite gradient
            falls back to ``"random"``. Or a warm start: a flat tensor $u$ of shape
            ``(p,)``, typically the previous call's ``eigenvectors[:, 0]`` while training,
            and then $v_0 = u/\|u\| + 0.3\, r/\|r\|$. `SharpnessTracker` does this
            between its measurements: 24-39% fewer products than the gradient start on
            the anchors' MLP and CNN (see the tracker section of the measuring guide).
        memory_budget: Bytes the call may hold beyond what the process holds: ``"auto"``
            (default, 80% of what the device has free), None (no limit: the basis of
            `sharpgen.linalg.lanczos`'s default) or an int.
        basis_storage: ``"device"``, ``"host"`` or ``"disk"`` (default: the plan's).
        basis_dtype: Stored dtype of the basis (default: the parameters'); see
            `sharpgen.linalg.lanczos` for the certificate of a rounded basis.
        reorth: ``"auto"`` (default: ``"partial"`` for ``k=1``, ``"full"`` otherwise),
            ``"partial"`` (each step works on the two latest basis rows only, and
            orthogonalizes against the whole basis where Simon's estimate of the loss of
            orthogonality asks for it) or ``"full"`` (every step); see
            `sharpgen.linalg.lanczos`. The certificate is the same.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout`` (products become random; Lanczos then has no
            meaning, so leave it off), ``reduction``, ``process_group`` (see the
            Distributed guide), ``func_mode``, ``vectorize``, and ``backend``: with
            ``"auto"`` (default) and one batch of data the double-backward graph is built
            once and kept for all Lanczos steps (``backend="autograd", cache_graph=True``,
            as PyHessian does; on a ready objective it stays in the objective's cache until
            ``objective.clear_cache()``), which made one product 2 to 5 times cheaper than
            forward-over-reverse in our CPU measurements; with several batches it is the
            operator's ``"auto"``. ``"func"`` or ``"autograd"`` force a backend.
            ``micro_batch_size="auto"``: the largest micro-batch whose graph fits
            ``memory_budget`` beside the working vectors (None, and the graph kept,
            where the whole batch fits; ``result.memory.micro_batch_size``).

    Returns:
        A `ModelEigenResult`: eigenvalues (descending, ascending for ``"smallest"``),
        flat unit eigenvectors as columns, residuals, ``converged``, ``num_matvecs``;
        ``result.eigenvector_dict(i)`` gives eigenvector ``i`` as a parameter dict.

    Raises:
        ValueError: ``k <= 0`` or ``k >= p``, ``tol <= 0``, an unknown ``which`` (the valid
            ones are listed), invalid model/data arguments.
        TypeError: Wrongly typed arguments.
        FloatingPointError: A non-finite loss or product.

    Examples:
        >>> import torch
        >>> x = torch.eye(3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0]).double()
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> res = top_eigenvalues(model, torch.nn.functional.mse_loss,
        ...                       (x, torch.zeros(3, 1, dtype=torch.float64)), k=2,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> [round(v, 6) for v in res.eigenvalues.tolist()]  # H = (2/3) diag(1, 4, 9)
        [6.0, 2.666667]
        >>> res.eigenvector_dict(0)["weight"].shape
        torch.Size([1, 3])

    References:
        C. Lanczos (1950); K. Wu, H. Simon (2000), thick restart. Z. Yao, A. Gholami,
        K. Keutzer, M. Mahoney, "PyHessian: Neural networks through the lens of the
        Hessian", 2020 (the power-iteration baseline this replaces). G. Gur-Ari,
        D. A. Roberts, E. Dyer, "Gradient descent happens in a tiny subspace", 2018.
    """
    k = check_int("k", k, hint="ask for at least one eigenvalue (k=1 for the top one).")
    tol = check_positive("tol", tol, hint="pass a relative tolerance such as 1e-3.")
    which = check_choice("which", which, WHICH)
    bound = check_choice("bound", bound, BOUNDS)
    reorth = check_choice("reorth", reorth, REORTH)
    generator = check_generator(generator)
    if max_iter is not None:
        max_iter = check_int("max_iter", max_iter)
    if max_basis is not None:
        max_basis = check_int("max_basis", max_basis, minimum=k + 2 if is_int(k) else 3)
    memory_budget = check_memory_budget(memory_budget)
    if basis_storage is not None:
        basis_storage = check_choice("basis_storage", basis_storage, STORAGES)
    source = MeasureSource(model, loss_fn, data, objective_options, where="top_eigenvalues",
                           memory_budget=memory_budget, reserve_vectors=WORK_VECTORS)  # fmt: skip
    p = source.numel
    if k >= p:
        raise ValueError(
            f"k must be smaller than the number of selected parameters p={p}, got k={k}; for "
            "all eigenvalues compute the dense Hessian (HessianOperator(...).to_dense()) and "
            "use torch.linalg.eigvalsh."
        )
    warm = None
    if isinstance(start, Tensor):  # checked before any forward pass
        warm = warm_start(start.to(device=source.device), p, generator)
    else:
        start = check_choice("start", start, START)
    device = source.device
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    owned = source.ready is None  # an objective built here: its graph is freed at the end
    H = source.hessian(single_vectors=True)
    basis_dtype = check_basis_dtype(basis_dtype, H.dtype)
    graph = kept_graph(H, device, held)
    fields = micro_plan_fields(getattr(H, "objective", None), graph)
    plan = plan_memory(
        "top_eigenvalues", numel=p, dtype=H.dtype, device=device, memory_budget=memory_budget,
        work_vectors=WORK_VECTORS, k=k, max_basis=max_basis, basis_storage=basis_storage,
        basis_dtype=basis_dtype, result_vectors=k, process_group=source.process_group,
        product_bytes=product_bytes_of(H, p, fields["graph_bytes"]), **fields,
    )  # fmt: skip
    # the start is handed over, not kept here: lanczos frees it once it is in the basis
    starts = [warm if warm is not None else _start_vector(H, str(start), k, which, generator)]
    del warm
    if owned and isinstance(H, HessianOperator):  # the gradient's values are read: free them
        release_gradients(H.objective)
    with progress_bar(progress, total=max_iter, desc="top_eigenvalues", unit="matvec") as bar:
        res = lanczos(
            ProgressOperator(H, bar) if progress else H, k, which=which, tol=tol, max_iter=max_iter,
            generator=generator, max_basis=plan.basis_vectors, bound=bound, v0=starts.pop(),
            basis_storage=plan.basis_storage, basis_dtype=basis_dtype, reorth=reorth,
            on_finish=H.clear_cache if owned else None,
        )  # fmt: skip
    shapes = tuple((n, tuple(t.shape)) for n, t in H.params.items())
    return ModelEigenResult(
        eigenvalues=res.eigenvalues,
        eigenvectors=res.eigenvectors,
        residuals=res.residuals,
        converged=res.converged,
        num_matvecs=res.num_matvecs,
        num_iterations=res.num_iterations,
        method=res.method,
        which=res.which,
        tol=res.tol,
        num_restarts=res.num_restarts,
        memory=plan.with_peak(device),
        num_reorth=res.num_reorth,
        param_shapes=shapes,
    )
