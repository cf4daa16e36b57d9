r"""Per-layer curvature: the blocks, the Hessian diagonal and top eigenvalues per block.

`block_traces` is in `sharpgen.sharpness._block_traces`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sharpgen._validation import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_positive,
)
from sharpgen.curvature import ModelObjective, unflatten_params
from sharpgen.curvature._auto_micro import micro_batch_budget, micro_plan_fields
from sharpgen.curvature._plan import MemoryPlan, check_memory_budget, plan_memory
from sharpgen.curvature._resolve import resolve_objective
from sharpgen.linalg import EigenResult, lanczos
from sharpgen.linalg._diagonal import (
    diagpp_diagonal,
    exact_diagonal,
    hutchinson_diagonal,
    xdiag_diagonal,
)
from sharpgen.sharpness._common import progress_bar
from sharpgen.sharpness._operators import BlockOperator, ObjectiveOperator

__all__ = [
    "Blocks",
    "HessianDiagonal",
    "block_top_eigenvalues",
    "check_blocks",
    "hessian_diagonal",
    "resolve_blocks",
]

Blocks = str | Mapping[str, Sequence[str]]


def check_blocks(blocks: object) -> Blocks:
    """The shape of a ``blocks`` argument, checked before any work (names come later).

    ``"module"``, ``"parameter"``, or a non-empty dict block name (str) -> a non-empty list
    of parameter names (a string alone is refused: ``{"a": "0.weight"}`` would be its
    characters).
    """
    if isinstance(blocks, str):
        return check_choice("blocks", blocks, ("module", "parameter"))
    if not isinstance(blocks, Mapping):
        raise TypeError(
            f"blocks must be 'module', 'parameter' or a dict block name -> parameter names, "
            f"got {type(blocks).__name__}."
        )
    if not blocks:
        raise ValueError(
            "blocks is an empty dict; give at least one block, e.g. {'first': ['0.weight', "
            "'0.bias']}, or use blocks='module' or 'parameter'."
        )
    for name, names in blocks.items():
        if not isinstance(name, str):
            raise TypeError(f"block names must be str, got {name!r}.")
        if isinstance(names, (str, bytes)):
            raise TypeError(
                f"blocks[{name!r}] must be a list of parameter names, got the string "
                f"{names!r}; write {{{name!r}: [{names!r}]}}."
            )
        if not isinstance(names, Sequence) and not isinstance(names, (set, frozenset)):
            raise TypeError(
                f"blocks[{name!r}] must be a list of parameter names, got {type(names).__name__}."
            )
        if len(names) == 0:
            raise ValueError(
                f"blocks[{name!r}] is empty; a block needs at least one parameter name "
                "(drop the block, or add its parameters)."
            )
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"blocks[{name!r}] must hold parameter names (str), got {n!r}.")
    return blocks


def resolve_blocks(params: Mapping[str, Tensor], blocks: Blocks) -> dict[str, list[str]]:
    """Group parameter names into blocks: per ``"module"``, per ``"parameter"`` or given."""
    blocks = check_blocks(blocks)
    if isinstance(blocks, str):
        if blocks == "parameter":
            return {n: [n] for n in params}
        out: dict[str, list[str]] = {}
        for n in params:
            out.setdefault(n.rsplit(".", 1)[0] if "." in n else "", []).append(n)
        return out
    seen: set[str] = set()
    for name, names in blocks.items():
        for n in names:
            if n not in params:
                raise ValueError(
                    f"blocks[{name!r}] names {n!r}, which is not a selected parameter; "
                    f"the selected ones are {list(params)[:8]}."
                )
            if n in seen:
                raise ValueError(f"parameter {n!r} is in two blocks; blocks must not overlap.")
            seen.add(n)
    return {k: list(v) for k, v in blocks.items()}


@dataclass(frozen=True, repr=False)
class HessianDiagonal:
    r"""The diagonal of the Hessian, per parameter.

    Attributes:
        values: Name -> tensor shaped like the parameter: $H_{ii}$.
        stderr: Name -> standard errors of the same shape (zeros when exact).
        num_matvecs: Hessian-vector products spent.
        method: ``"exact"``, ``"hutchinson"`` or ``"diagpp"``.
        memory: The memory plan of ``"exact"`` and ``"hutchinson"`` (their blocks of
            basis vectors or probes; `sharpgen.curvature.MemoryPlan`), else None.
    """

    values: dict[str, Tensor]
    stderr: dict[str, Tensor]
    num_matvecs: int
    method: str
    memory: MemoryPlan | None = None

    def __repr__(self) -> str:
        total = sum(float(v.sum()) for v in self.values.values())
        return (
            f"HessianDiagonal(params={list(self.values)[:4]}, sum={total:.6g}, "
            f"method={self.method!r}, num_matvecs={self.num_matvecs})"
        )


def hessian_diagonal(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    method: str = "auto",
    num_matvecs: int = 99,
    exact_threshold: int = 2000,
    generator: torch.Generator | None = None,
    progress: bool = False,
    memory_budget: int | str | None = "auto",
    **objective_options: Any,
) -> HessianDiagonal:
    r"""The diagonal of the Hessian, $H_{ii} = \partial^2 L / \partial\theta_i^2$.

    ``"exact"``: $p$ Hessian-vector products with basis vectors (blocks of 64 through
    ``vmap``). ``"hutchinson"``: $\frac1m\sum_j z_j \odot Hz_j$ with a per-entry standard
    error (`sharpgen.linalg.hutchinson_diagonal`). ``"diagpp"``: a rank-$m/3$ sketch of
    $H$ plus Hutchinson on the rest (`sharpgen.linalg.diagpp_diagonal`), much more
    accurate when a few eigenvalues dominate. ``"xdiag"``: XDiag, every probe used for
    the sketch and for Hutchinson (a rank-$m/2$ sketch; `sharpgen.linalg.xdiag_diagonal`),
    more accurate than Diag++ at the same budget on such spectra, with a rough
    leave-one-out standard error. ``"auto"``: exact up to ``exact_threshold``
    parameters, else Diag++.

    Args:
        model: Any ``nn.Module`` or a ready `sharpgen.ModelObjective`.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        method: ``"auto"``, ``"exact"``, ``"hutchinson"``, ``"diagpp"`` or ``"xdiag"``.
        num_matvecs: Budget of the stochastic methods.
        exact_threshold: Largest parameter count ``"auto"`` treats exactly.
        generator: Source of the probes.
        progress: A tqdm bar (exact method).
        memory_budget: Bytes the call may hold beyond what the process holds: ``"auto"``
            (default, 80% of what the device has free), None (no limit) or an int. The
            plan (``result.memory``, `sharpgen.curvature.plan_memory`) sets the block of
            ``"exact"`` (basis vectors) and ``"hutchinson"`` (probes, streamed: the call
            holds $2B + 2$ vectors, not all $m$ probes); the sketches of ``"diagpp"``
            and ``"xdiag"`` (probes, basis and products: $m$ to $3m$ parameter-sized
            vectors at once) are theirs and not planned.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout``, ``reduction``, ``backend``, ``process_group``,
            ``func_mode``, ``vectorize``, ``micro_batch_size`` (``"auto"``: the largest
            micro-batch whose graph fits ``memory_budget`` beside $2 + 2$ vectors).

    Returns:
        A `HessianDiagonal` (dicts shaped like the parameters).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> data = (x, torch.zeros(2, 1, dtype=torch.float64))
        >>> d = hessian_diagonal(model, torch.nn.functional.mse_loss, data)
        >>> d.values["weight"].tolist()
        [[1.0, 9.0]]

    References:
        C. Bekas, E. Kokiopoulou, Y. Saad (2007); R. A. Baston, Y. Nakatsukasa (2022);
        E. N. Epperly, J. A. Tropp, R. J. Webber (2024).
    """
    method = check_choice("method", method, ("auto", "exact", "hutchinson", "diagpp", "xdiag"))
    num_matvecs = check_int("num_matvecs", num_matvecs)
    exact_threshold = check_int("exact_threshold", exact_threshold, minimum=0)
    check_bool("progress", progress)
    generator = check_generator(generator)
    memory_budget = check_memory_budget(memory_budget)
    with micro_batch_budget(memory_budget, 4):  # "auto" micro-batches: beside 2 + 2 vectors
        obj = resolve_objective(model, loss_fn, data, objective_options, where="hessian_diagonal")
    op = ObjectiveOperator(obj, "hvp")
    if method == "auto":
        method = "exact" if op.shape[0] <= exact_threshold else "diagpp"
    # the plan's block of basis vectors or probes (for Hutchinson at most all m probes:
    # the one (n, m) draw of before where they fit); the sketches of Diag++/XDiag are theirs
    asked = {"exact": 64, "hutchinson": num_matvecs}.get(method, 0)
    plan = plan_memory("hessian_diagonal", numel=op.shape[0], dtype=op.dtype, device=op.device,
                       memory_budget=memory_budget, work_vectors=2,
                       process_group=obj.process_group,
                       **micro_plan_fields(obj, 0, asked)) if asked else None  # fmt: skip
    if method == "exact":
        with progress_bar(progress, total=op.shape[0], desc="hessian_diagonal",
                          unit="matvec") as bar:  # fmt: skip
            est = exact_diagonal(op, block_size=plan.block_width, bar=bar)  # type: ignore[union-attr]
    elif method == "hutchinson":
        est = hutchinson_diagonal(op, num_matvecs=num_matvecs, block_size=plan.block_width,  # type: ignore[union-attr]
                                  generator=generator)  # fmt: skip
    elif method == "xdiag":
        est = xdiag_diagonal(op, num_matvecs=num_matvecs, generator=generator)
    else:
        est = diagpp_diagonal(op, num_matvecs=num_matvecs, generator=generator)
    return HessianDiagonal(
        values={n: t.clone() for n, t in unflatten_params(est.values, obj.params).items()},
        stderr={n: t.clone() for n, t in unflatten_params(est.stderr, obj.params).items()},
        num_matvecs=est.num_matvecs, method=est.method,
        memory=None if plan is None else plan.with_peak(op.device),
    )  # fmt: skip


def block_top_eigenvalues(
    model: nn.Module | ModelObjective,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    data: Any = None,
    *,
    blocks: Blocks = "module",
    k: int = 1,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    **objective_options: Any,
) -> dict[str, EigenResult]:
    r"""The top eigenvalues of each diagonal block $H_{bb}$ (the Hessian of one layer).

    Lanczos (`sharpgen.lanczos`) on the operator $v_b \mapsto (H [v_b; 0])_b$, i.e. the
    Hessian with respect to the block's parameters with the others fixed (a block with at
    most ``k`` entries is formed densely and diagonalized, ``method="dense"``). By Cauchy
    interlacing $\lambda_{\max}(H_{bb}) \le \lambda_{\max}(H)$.

    Args:
        model: Any ``nn.Module`` or a ready `sharpgen.ModelObjective`.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One batch or an iterable of batches.
        blocks: ``"module"``, ``"parameter"`` or a dict block name -> parameter names.
        k: Eigenvalues per block.
        tol: Relative accuracy (see `sharpgen.lanczos`).
        generator: Source of the start vectors.
        **objective_options: With a model: the keyword arguments of
            `sharpgen.curvature.ModelObjective` (`sharpgen.curvature.ObjectiveOptions`):
            ``params``, ``bn``, ``dropout``, ``reduction``, ``backend``, ``process_group``,
            ``func_mode``, ``vectorize``.

    Returns:
        Block name -> `sharpgen.EigenResult` (eigenvectors over the block's parameters).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> res = block_top_eigenvalues(model, torch.nn.functional.mse_loss,
        ...                             (x, torch.zeros(2, 1).double()), blocks="parameter",
        ...                             generator=torch.Generator().manual_seed(0))
        >>> [round(float(r.eigenvalues[0]), 6) for r in res.values()]
        [9.0, 2.0]
    """
    k = check_int("k", k)
    tol = check_positive("tol", tol)
    generator = check_generator(generator)
    check_blocks(blocks)
    obj = resolve_objective(model, loss_fn, data, objective_options, where="block_top_eigenvalues")
    groups = resolve_blocks(obj.params, blocks)
    out = {}
    for name, names in groups.items():
        op = BlockOperator(obj, names)
        if k < op.shape[0]:
            out[name] = lanczos(op, k=k, tol=tol, generator=generator)
            continue
        dense = op.to_dense()  # a block this small: all its eigenvalues, exactly
        evals, evecs = torch.linalg.eigh((dense + dense.T) / 2)
        evals, evecs = evals.flip(0), evecs.flip(1)
        res = (dense @ evecs - evecs * evals).norm(dim=0)
        out[name] = EigenResult(evals, evecs, res, True, op.shape[0], 1, method="dense", tol=tol)
    return out
