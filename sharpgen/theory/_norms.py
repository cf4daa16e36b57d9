r"""Norms of two-layer nets that control the trace (Theorem 3.1) and the zero-one error."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sharpgen.models._checks import check_cube, check_pm_one

__all__ = ["memorizer_test_error", "no_bias_norm", "path_norm", "zero_one_error"]


def _weights(model: nn.Module | Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    params = dict(model.named_parameters()) if isinstance(model, nn.Module) else model
    if not isinstance(params, Mapping) or "W1" not in params or "W2" not in params:
        raise ValueError(
            "model must be a two-layer net (or a dict of its parameters) with 'W1' (m, d) and "
            f"'W2' (m,); got {type(model).__name__} with keys {sorted(params)[:6]}."
        )
    W1, W2 = params["W1"], params["W2"]
    if W1.ndim < 2 or W2.shape != W1.shape[:-1]:
        raise ValueError(
            f"W1 must have shape (..., m, d) and W2 (..., m); got {tuple(W1.shape)} and "
            f"{tuple(W2.shape)} (a deep net's W2 is not a second layer)."
        )
    return W1.detach(), W2.detach()


def no_bias_norm(model: nn.Module | Mapping[str, Tensor]) -> Tensor:
    r"""$\lVert W_1 \rVert_F^2 + d \lVert W_2 \rVert^2$, within constants of the no-bias trace.

    At an interpolating no-bias net on xor data the Hessian trace is within constant
    factors of this quantity (Theorem 3.1), which bounds the path norm:
    $2\sqrt d\, \sum_j \lVert W_{1,j} \rVert |W_{2,j}| \le \lVert W_1 \rVert_F^2 +
    d\lVert W_2\rVert^2$ (AM-GM per neuron).

    Args:
        model: A two-layer net with parameters ``W1`` $(m, d)$ and ``W2`` $(m,)$, or a dict
            of them; stacked parameters ``(..., m, d)`` / ``(..., m)`` give a result per run.

    Returns:
        A tensor of shape ``W2.shape[:-1]`` (0-dim for one net).

    Raises:
        ValueError: If ``W1``/``W2`` are missing or of inconsistent shapes.

    Examples:
        >>> import torch
        >>> from sharpgen.models import xor_realizer_no_bias
        >>> net = xor_realizer_no_bias(16, dtype=torch.float64)
        >>> float(no_bias_norm(net))  # 6 * sqrt(d)
        24.0
    """
    W1, W2 = _weights(model)
    return W1.square().sum((-2, -1)) + W1.shape[-1] * W2.square().sum(-1)


def path_norm(model: nn.Module | Mapping[str, Tensor]) -> Tensor:
    r"""The path norm $\sum_j \lVert W_{1,j} \rVert_2 \, |W_{2,j}|$ (first-layer rows only).

    The first-layer bias is not included.

    Args:
        model: A two-layer net with ``W1`` $(m, d)$ and ``W2`` $(m,)$, or a dict of them
            (stacked ``(..., m, d)`` / ``(..., m)`` allowed).

    Returns:
        A tensor of shape ``W2.shape[:-1]``.

    Raises:
        ValueError: If ``W1``/``W2`` are missing or of inconsistent shapes.

    Examples:
        >>> import torch
        >>> from sharpgen.models import xor_realizer_no_bias
        >>> net = xor_realizer_no_bias(16, dtype=torch.float64)
        >>> float(path_norm(net))  # 4 * (sqrt(2) a) * c with 2ac = 1
        2.8284271247461903
    """
    W1, W2 = _weights(model)
    return (torch.linalg.vector_norm(W1, dim=-1) * W2.abs()).sum(-1)


def zero_one_error(model: nn.Module, X: Tensor, y: Tensor) -> float:
    r"""The fraction of points with $\operatorname{sign} f(x_i) \ne y_i$; an output 0 is wrong.

    Args:
        model: A scalar-output network (called under ``torch.no_grad()``).
        X: Inputs ``(n, d)``.
        y: Labels ``(n,)`` in $\{-1, +1\}$.

    Returns:
        The error rate as a Python float.

    Raises:
        ValueError: If the labels are not $\pm 1$ or the shapes do not match.

    Examples:
        >>> import torch
        >>> from sharpgen.data import full_cube, xor_labels
        >>> from sharpgen.models import flattest_generalizer
        >>> X = full_cube(5)
        >>> zero_one_error(flattest_generalizer(5), X, xor_labels(X))
        0.0
    """
    if not isinstance(X, Tensor) or not isinstance(y, Tensor) or y.ndim != 1:
        raise ValueError("X must be a tensor (n, d) and y a tensor (n,).")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels.")
    check_pm_one("y", y)
    with torch.no_grad():
        out = model(X).reshape(-1)
    return float((torch.sign(out) != y.to(out.dtype)).to(torch.float64).mean())


def memorizer_test_error(X_train: Tensor, X_test: Tensor | None = None) -> float:
    r"""Zero-one test error of a flattest memorizer: the share of test points not seen in training.

    A memorizer (`sharpgen.models.flattest_memorizer`) reproduces the labels of its
    training points and outputs 0 (counted wrong) on every other cube point. With ``X_test``
    this is $1 - $ (fraction of test points that occur in ``X_train``); without, its
    expectation over fresh uniform cube points, $1 - (\text{distinct training points}) / 2^d$.

    Args:
        X_train: Training points ``(n, d)`` on the cube.
        X_test: Test points ``(n_test, d)`` on the cube, or None.

    Returns:
        The error as a Python float.

    Raises:
        ValueError: If the points are not on the cube or the dimensions differ.

    Examples:
        >>> from sharpgen.data import full_cube
        >>> memorizer_test_error(full_cube(3)[:2])
        0.75
    """
    for name, X in (("X_train", X_train), ("X_test", X_test)):
        if X is not None and (not isinstance(X, Tensor) or X.ndim != 2):
            raise ValueError(f"{name} must be a tensor of shape (n, d).")
        if X is not None:
            check_cube(name, X)
    d = X_train.shape[1]
    if X_test is None:
        n_distinct = torch.unique(X_train, dim=0).shape[0]
        return 1.0 - n_distinct / 2**d
    if X_test.shape[1] != d:
        raise ValueError(f"X_test has d={X_test.shape[1]} but X_train has d={d}.")
    seen = (X_test.unsqueeze(1) == X_train.unsqueeze(0).to(X_test)).all(-1).any(1)
    return 1.0 - float(seen.to(torch.float64).mean())
