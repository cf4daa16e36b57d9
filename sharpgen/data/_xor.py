r"""The xor distribution on the hypercube, complete training sets and cube enumeration.

$P_{\mathrm{xor}}$: $x$ uniform on $\{-1, +1\}^d$ and $y = x_1 x_2$ (coordinates 0 and 1 in
code). A point is encoded by $d$ bits, bit value 0 meaning $+1$ and 1 meaning $-1$; the cube's
points are numbered by reading the bits as a binary number with the first coordinate most
significant, so point 0 is $(+1, \dots, +1)$.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sharpgen.data._split import DataSplit
from sharpgen.models._checks import check_int

__all__ = ["complete_xor", "full_cube", "xor_cube", "xor_labels"]

# Up to this dimension the cube's points are numbered explicitly (2**20 int64 indices);
# above it, distinct points are drawn by rejection.
_ENUMERATE_MAX_D = 20
_FULL_CUBE_MAX_D = 20


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    return dtype


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _bits_to_points(bits: Tensor, dtype: torch.dtype, device) -> Tensor:
    return (1 - 2 * bits.to(torch.int64)).to(dtype=dtype, device=device)


def _index_to_bits(index: Tensor, d: int) -> Tensor:
    shifts = torch.arange(d - 1, -1, -1, device=index.device)
    return (index.unsqueeze(-1) >> shifts) & 1


def _row_keys(bits: Tensor) -> list[bytes]:
    packed = np.packbits(bits.to(torch.uint8).cpu().numpy(), axis=1)
    return [row.tobytes() for row in packed]


def _draw_bits(d: int, n: int, *, unique: bool, exclude: set[bytes] | None, generator) -> Tensor:
    """``n`` uniform points of the cube as bits ``(n, d)``.

    ``unique``: without replacement; ``exclude``: keys of points never to return.
    """
    device = _draw_device(generator)
    if n == 0:
        return torch.zeros(0, d, dtype=torch.int64, device=device)
    if not unique and not exclude:
        return torch.randint(0, 2, (n, d), generator=generator, device=device)
    if d <= _ENUMERATE_MAX_D:
        size = 2**d
        if exclude:
            all_bits = _index_to_bits(torch.arange(size, device=device), d)
            keep = [k not in exclude for k in _row_keys(all_bits)]
            allowed = torch.arange(size, device=device)[torch.tensor(keep, device=device)]
        else:
            allowed = torch.arange(size, device=device)
        if unique:
            pick = torch.randperm(allowed.numel(), generator=generator, device=device)[:n]
        else:
            pick = torch.randint(0, allowed.numel(), (n,), generator=generator, device=device)
        return _index_to_bits(allowed[pick], d)
    # rejection for large d (collisions are rare there)
    rows: list[Tensor] = []
    seen: set[bytes] = set()
    exclude = exclude or set()
    while len(rows) < n:
        block = torch.randint(0, 2, (n - len(rows), d), generator=generator, device=device)
        for key, row in zip(_row_keys(block), block, strict=True):
            if key in exclude or (unique and key in seen):
                continue
            seen.add(key)
            rows.append(row)
    return torch.stack(rows)


def xor_labels(X: Tensor) -> Tensor:
    """The xor labels $y = x_1 x_2$ (coordinates 0 and 1) of inputs ``X`` of shape ``(n, d)``.

    Args:
        X: Inputs with ``d >= 2``.

    Returns:
        ``X[:, 0] * X[:, 1]``.

    Raises:
        ValueError: If ``X`` is not 2-D with at least two columns.

    Examples:
        >>> import torch
        >>> xor_labels(torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]]))
        tensor([-1.,  1.])
    """
    if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[1] < 2:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"X must be a tensor of shape (n, d) with d >= 2, got {shape}.")
    return X[:, 0] * X[:, 1]


def full_cube(
    d: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    r"""All $2^d$ points of $\{-1, +1\}^d$, one per row, point $k$ = the bits of $k$.

    Row $k$ has $x_j = 1 - 2 \cdot \mathrm{bit}_{d-1-j}(k)$, so row 0 is all $+1$ and the
    last row all $-1$.

    Args:
        d: Dimension, ``1 <= d <= 20``.
        dtype: Floating dtype.
        device: Device.

    Returns:
        A tensor of shape ``(2**d, d)``.

    Raises:
        ValueError: If ``d`` is out of range.

    Examples:
        >>> full_cube(2)
        tensor([[ 1.,  1.],
                [ 1., -1.],
                [-1.,  1.],
                [-1., -1.]])
    """
    d = check_int("d", d)
    if d > _FULL_CUBE_MAX_D:
        raise ValueError(
            f"full_cube enumerates 2**d points; d={d} is too large (at most {_FULL_CUBE_MAX_D}). "
            "Sample with xor_cube instead."
        )
    _check_dtype(dtype)
    bits = _index_to_bits(torch.arange(2**d), d)
    return _bits_to_points(bits, dtype, device)


def xor_cube(
    d: int,
    n: int,
    *,
    generator: torch.Generator | None = None,
    unique: bool = False,
    test_size: int | None = None,
    disjoint_test: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> DataSplit:
    r"""A sample of $P_{\mathrm{xor}}$: $x$ uniform on $\{-1,+1\}^d$, $y = x_1 x_2 \in \{\pm 1\}$.

    The paper's experiments use ``d=30``, ``n=100``.

    Randomness comes only from ``generator`` (the global RNG when None), on its device,
    in this order: the training inputs, then the test inputs. The training points are i.i.d.
    (``unique=False``) or a uniformly random set of ``n`` distinct points in random order
    (``unique=True``). The test points are i.i.d. fresh draws from $P_{\mathrm{xor}}$
    (duplicates among them are possible), or, with ``disjoint_test=True``, i.i.d. uniform
    on the cube minus the training points. For ``d <= 20`` constrained draws index the
    enumerated cube; above, they use rejection.

    Args:
        d: Dimension, at least 2.
        n: Number of training points, at least 1 (at most $2^d$ when ``unique``).
        generator: Source of randomness.
        unique: Draw the training points without duplicates.
        test_size: Number of test points; None for no test set.
        disjoint_test: Exclude the training points from the test distribution.
        dtype: Floating dtype of ``X`` and ``y``.
        device: Device of the outputs (default: the generator's, else CPU).

    Returns:
        A `DataSplit` with ``X (n, d)``, ``y (n,)`` and, when ``test_size`` is given,
        ``X_test``, ``y_test``.

    Raises:
        ValueError: For ``d < 2``, ``n < 1``, ``unique`` with ``n > 2**d``,
            ``disjoint_test`` without ``test_size`` or when the training set covers the cube.

    Examples:
        >>> import torch
        >>> data = xor_cube(5, 10, test_size=3, generator=torch.Generator().manual_seed(0))
        >>> data.X.shape, data.X_test.shape
        (torch.Size([10, 5]), torch.Size([3, 5]))
        >>> bool((data.y == data.X[:, 0] * data.X[:, 1]).all())
        True
    """
    d = check_int("d", d, minimum=2)
    n = check_int("n", n)
    _check_dtype(dtype)
    if unique and d < 63 and n > 2**d:
        raise ValueError(
            f"n={n} distinct points requested but the cube {{-1,1}}^{d} has only {2**d}; "
            "lower n or set unique=False."
        )
    if test_size is not None:
        test_size = check_int("test_size", test_size, minimum=0)
    if disjoint_test and test_size is None:
        raise ValueError("disjoint_test=True needs a test set: pass test_size=... as well.")
    if device is None and generator is not None:
        device = generator.device
    bits = _draw_bits(d, n, unique=unique, exclude=None, generator=generator)
    X = _bits_to_points(bits, dtype, device)
    if test_size is None:
        return DataSplit(X, xor_labels(X))
    exclude = None
    if disjoint_test:
        exclude = set(_row_keys(bits))
        if d < 63 and len(exclude) >= 2**d:
            raise ValueError(
                f"the {len(exclude)} distinct training points cover the whole cube {{-1,1}}^{d}; "
                "no disjoint test point exists. Lower n or set disjoint_test=False."
            )
    test_bits = _draw_bits(d, test_size, unique=False, exclude=exclude, generator=generator)
    X_test = _bits_to_points(test_bits, dtype, device)
    return DataSplit(X, xor_labels(X), X_test, xor_labels(X_test))


def _check_condition_one(S: Tensor, d: int) -> None:
    if S.ndim != 2 or S.shape[1] != d - 2 or S.shape[0] == 0:
        raise ValueError(
            f"S must have shape (k, d - 2) = (k, {d - 2}) with k >= 1, got {tuple(S.shape)}."
        )
    if not bool(((S == 1) | (S == -1)).all()):
        raise ValueError("S must contain only entries -1 and +1 (points of {-1,1}^(d-2)).")
    if torch.unique(S, dim=0).shape[0] != S.shape[0]:
        raise ValueError("S has duplicate rows; each element of S must be distinct.")
    if d > 2:
        diffs = (S[1:] - S[0]).to(torch.float64)
        rank = int(torch.linalg.matrix_rank(diffs)) if diffs.shape[0] else 0
        if rank != d - 2:
            raise ValueError(
                f"Condition 1 needs the differences of S to span d - 2 = {d - 2} dimensions, "
                f"but they span {rank}; add points to S (e.g. all-ones and its single-coordinate "
                "flips)."
            )


def complete_xor(
    d: int,
    S: Tensor | None = None,
    *,
    size: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> DataSplit:
    r"""A complete training set (the paper's Condition 1) for the xor task.

    Given $S \subset \{-1,1\}^{d-2}$ whose differences span $d-2$ dimensions, the training
    set is every $x$ with $x_{3:} \in S$ and all four sign patterns of $(x_1, x_2)$, labelled
    $y = x_1 x_2$. Rows come in the order of ``S``, each with the patterns
    $(+,+), (+,-), (-,+), (-,-)$, so ``X`` has ``4 * len(S)`` rows.

    ``S`` is chosen as follows: given explicitly (it is validated); else, without
    ``generator``, the canonical $S$ = the all-ones vector followed by its $d-2$
    single-coordinate flips ($d-1$ points); else ``size`` distinct uniform points (default
    $d-1$), redrawn until their differences span.

    Args:
        d: Dimension, at least 2 (``d = 2`` gives the four points of $\{-1,1\}^2$).
        S: Optional ``(k, d - 2)`` tensor of $\pm 1$ entries.
        size: Number of random points of ``S`` (only with ``generator``), at least $d-1$.
        generator: Draw ``S`` at random from this generator.
        dtype: Floating dtype.
        device: Device.

    Returns:
        A `DataSplit` without test set.

    Raises:
        ValueError: If ``S`` violates Condition 1 or ``size`` is out of range.

    Examples:
        >>> data = complete_xor(4)
        >>> data.X.shape
        torch.Size([12, 4])
        >>> data.X[:4, :2].tolist()
        [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]
    """
    d = check_int("d", d, minimum=2)
    _check_dtype(dtype)
    k = d - 2
    if S is not None:
        if generator is not None or size is not None:
            raise ValueError("pass either S or (generator, size), not both.")
        if not isinstance(S, Tensor):
            raise TypeError(f"S must be a torch.Tensor, got {type(S).__name__}.")
        _check_condition_one(S, d)
        S_bits = (S < 0).to(torch.int64).cpu()
    elif generator is None:
        if size is not None:
            raise ValueError("size selects a random S; pass generator=... as well (or S=...).")
        S_bits = torch.cat([torch.zeros(1, k, dtype=torch.int64), torch.eye(k, dtype=torch.int64)])
    else:
        size = d - 1 if size is None else check_int("size", size)
        if size < d - 1 or (k < 63 and size > 2**k):
            raise ValueError(
                f"size must be between d - 1 = {d - 1} (to span d - 2 dimensions) and "
                f"2**(d - 2) = {2**k if k < 63 else 'inf'}, got {size}."
            )
        for _ in range(1000):
            S_bits = _draw_bits(k, size, unique=True, exclude=None, generator=generator).cpu()
            diffs = (S_bits[1:] - S_bits[0]).to(torch.float64)
            if k == 0 or int(torch.linalg.matrix_rank(diffs)) == k:
                break
        else:  # pragma: no cover - probability ~0 for size >= d - 1 random points
            raise RuntimeError("could not draw a spanning S in 1000 attempts; pass S explicitly.")
    patterns = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.int64)
    n_s = S_bits.shape[0]
    bits = torch.cat([patterns.repeat(n_s, 1), S_bits.repeat_interleave(4, dim=0)], dim=1)
    X = _bits_to_points(bits, dtype, device)
    return DataSplit(X, xor_labels(X))
