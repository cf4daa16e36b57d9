r"""The appendix's uniform-ball task: $x$ uniform in the ball of radius $\sqrt d$."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sharpgen.data._split import DataSplit
from sharpgen.data._xor import _check_dtype, _draw_device
from sharpgen.models._checks import check_int

__all__ = ["ball_labels", "uniform_ball"]


def ball_labels(X: Tensor) -> Tensor:
    """The labels $y = |x_1| - |x_2|$ (coordinates 0 and 1) of the uniform-ball task.

    Args:
        X: Inputs ``(n, d)`` with ``d >= 2``.

    Returns:
        ``X[:, 0].abs() - X[:, 1].abs()``.

    Raises:
        ValueError: If ``X`` is not 2-D with at least two columns.

    Examples:
        >>> import torch
        >>> ball_labels(torch.tensor([[0.5, -2.0, 1.0]]))
        tensor([-1.5000])
    """
    if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[1] < 2:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"X must be a tensor of shape (n, d) with d >= 2, got {shape}.")
    return X[:, 0].abs() - X[:, 1].abs()


def _ball_points(d: int, n: int, generator, dtype) -> Tensor:
    device = _draw_device(generator)
    g = torch.randn(n, d, generator=generator, dtype=dtype, device=device)
    u = torch.rand(n, generator=generator, dtype=dtype, device=device)
    direction = g / torch.linalg.vector_norm(g, dim=1, keepdim=True)
    return math.sqrt(d) * direction * u.pow(1.0 / d).unsqueeze(1)


def uniform_ball(
    d: int,
    n: int,
    *,
    generator: torch.Generator | None = None,
    test_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> DataSplit:
    r"""$x$ uniform in the ball of radius $\sqrt d$, $y = |x_1| - |x_2|$ (paper's appendix).

    A point is $\sqrt d \, u^{1/d} g / \lVert g \rVert$ with $g \sim N(0, I_d)$ and
    $u \sim U(0, 1)$. Draw order from ``generator``: training $g$ ``(n, d)``, training $u$
    ``(n,)``, then the same for the test set.

    Args:
        d: Dimension, at least 2 (the paper uses 10).
        n: Number of training points (the paper uses 100).
        generator: Source of randomness (global RNG when None).
        test_size: Number of i.i.d. test points; None for none.
        dtype: Floating dtype.
        device: Device of the outputs (default: the generator's, else CPU).

    Returns:
        A `DataSplit`.

    Raises:
        ValueError: For ``d < 2`` or ``n < 1``.

    Examples:
        >>> import torch
        >>> data = uniform_ball(10, 5, generator=torch.Generator().manual_seed(0))
        >>> bool((data.X.norm(dim=1) <= 10 ** 0.5).all())
        True
    """
    d = check_int("d", d, minimum=2)
    n = check_int("n", n)
    _check_dtype(dtype)
    if test_size is not None:
        test_size = check_int("test_size", test_size, minimum=0)
    if device is None and generator is not None:
        device = generator.device
    X = _ball_points(d, n, generator, dtype).to(device)
    if test_size is None:
        return DataSplit(X, ball_labels(X))
    X_test = _ball_points(d, test_size, generator, dtype).to(device)
    return DataSplit(X, ball_labels(X), X_test, ball_labels(X_test))
