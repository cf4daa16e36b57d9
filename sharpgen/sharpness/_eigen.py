r"""Extreme eigenvalues of the loss Hessian of a model (Lanczos)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._validation import is_int
from sharpgen.curvature import ModelObjective, unflatten_params
from sharpgen.linalg import EigenResult, LinearOperator, lanczos
from sharpgen.linalg._lanczos import BOUNDS
from sharpgen.sharpness._common import (
    MeasureSource,
    ProgressOperator,
    check_choice,
    check_generator,
    check_int,
    check_positive,
    progress_bar,
)

__all__ = ["WHICH", "ModelEigenResult", "top_eigenvalues"]

WHICH = ("largest", "smallest", "both_ends", "magnitude")


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
    **objective_options: Any,
) -> ModelEigenResult:
    r"""The ``k`` extreme eigenvalues of the loss Hessian $\nabla^2_\theta L(\theta)$ by Lanczos.

    Runs `sharpgen.linalg.lanczos` (full reorthogonalization, thick restart, a residual
    stopping rule) on the `sharpgen.curvature.HessianOperator` of ``(model, loss_fn,
    data)``. With ``converged=True`` every returned value is within ``tol`` (relative) of
    an eigenvalue of the Hessian; otherwise the iteration hit ``max_iter`` and the values
    are the best Ritz values so far. The top eigenvalue $\lambda_{\max}$ is the sharpness
    measure that full-batch SAM and gradient descent at the edge of stability act on.

    Cost: one Hessian-vector product per Lanczos step, typically a few dozen for
    ``k=1, tol=1e-3``; memory ``p * max_basis`` numbers for the basis.

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
        Hessian", 2020 (the power-iteration baseline this replaces).
    """
    k = check_int("k", k, hint="ask for at least one eigenvalue (k=1 for the top one).")
    tol = check_positive("tol", tol, hint="pass a relative tolerance such as 1e-3.")
    which = check_choice("which", which, WHICH)
    bound = check_choice("bound", bound, BOUNDS)
    generator = check_generator(generator)
    if max_iter is not None:
        max_iter = check_int("max_iter", max_iter)
    source = MeasureSource(model, loss_fn, data, objective_options, where="top_eigenvalues")
    p = source.numel
    if k >= p:
        raise ValueError(
            f"k must be smaller than the number of selected parameters p={p}, got k={k}; for "
            "all eigenvalues compute the dense Hessian (HessianOperator(...).to_dense()) and "
            "use torch.linalg.eigvalsh."
        )
    H = source.hessian(single_vectors=True)
    with progress_bar(progress, total=max_iter, desc="top_eigenvalues", unit="matvec") as bar:
        res = lanczos(
            ProgressOperator(H, bar) if progress else H, k, which=which, tol=tol, max_iter=max_iter,
            generator=generator, max_basis=max_basis, bound=bound,
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
        param_shapes=shapes,
    )
