"""The linear-operator protocol every estimator in `sharpgen.linalg` accepts.

An estimator takes one of three things and turns it into a `LinearOperator` with
`as_linear_operator`:

* a dense square `torch.Tensor`;
* any object with ``shape``, ``dtype``, ``device`` and ``matmat(V)`` (for example the
  curvature operators of `sharpgen.curvature`, which subclass `LinearOperator`);
* a callable ``matvec(v)`` on 1-D tensors, together with its ``size``.

The base class owns what every operator needs once: input validation, the matvec counter,
the non-finite check and the SciPy bridge. Subclasses implement only `LinearOperator._matmat`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sharpgen._validation import is_int

__all__ = ["LinearOperator", "as_linear_operator"]


def check_product(out: Tensor) -> None:
    """Raise `FloatingPointError` if a product holds NaN or Inf.

    One reduction is much cheaper than an elementwise check; a non-finite sum is confirmed
    elementwise (a finite product can overflow its sum).
    """
    if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
        raise FloatingPointError(
            "the operator product contains NaN or Inf; check the model, the loss and "
            "the data for non-finite values (or use float64)."
        )


class LinearOperator:
    r"""A square linear operator $A \in \mathbb{R}^{n \times n}$ acting on torch tensors.

    Subclasses implement `_matmat` on an ``(n, k)`` block. The public `matmat`
    and `matvec` validate shapes, dtypes and devices, count products (one per column)
    and raise `FloatingPointError` on NaN or Inf.

    Args:
        size: The dimension ``n``.
        dtype: Floating dtype of the vectors the operator acts on.
        device: Device of those vectors.

    Examples:
        >>> import torch
        >>> from sharpgen.linalg import as_linear_operator
        >>> A = as_linear_operator(torch.eye(3, dtype=torch.float64))
        >>> A.matvec(torch.ones(3, dtype=torch.float64)).tolist()
        [1.0, 1.0, 1.0]
        >>> A.num_matvecs
        1
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if not is_int(size) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}.")
        self._size = int(size)
        self._dtype = dtype
        self._device = torch.device(device)
        self.num_matvecs = 0

    # -- properties -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self._size, self._size)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the vectors the operator acts on."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the vectors the operator acts on."""
        return self._device

    # -- products ---------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_input(self, V: Tensor, name: str) -> None:
        if not isinstance(V, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(V).__name__}.")
        if V.shape[0] != self._size:
            raise ValueError(
                f"{name} has {V.shape[0]} rows but the operator has size {self._size}; "
                f"pass a vector of length {self._size} (use .flatten() on a parameter dict)."
            )
        if V.dtype != self._dtype:
            raise TypeError(
                f"{name} has dtype {V.dtype} but the operator works in {self._dtype}; "
                f"convert it with .to({self._dtype})."
            )
        if V.device != self._device:
            raise ValueError(
                f"{name} is on device {V.device} but the operator is on {self._device}; "
                f"move it with .to('{self._device}')."
            )

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for a block ``V`` of shape ``(n, k)``; counts ``k`` products."""
        self._check_input(V, "V")
        if V.ndim != 2:
            raise ValueError(f"V must be 2-D of shape (n, k), got shape {tuple(V.shape)}.")
        out = self._matmat(V)
        self.num_matvecs += V.shape[1]
        check_product(out)
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for a vector ``v`` of shape ``(n,)``; counts one product."""
        self._check_input(v, "v")
        if v.ndim != 1:
            raise ValueError(f"v must be 1-D of shape (n,), got shape {tuple(v.shape)}.")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def __matmul__(self, other: Tensor) -> Tensor:
        """``A @ v`` or ``A @ V``."""
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def to_dense(self) -> Tensor:
        """Materialize the operator as a dense ``(n, n)`` tensor (``n`` products)."""
        eye = torch.eye(self._size, dtype=self._dtype, device=self._device)
        return self.matmat(eye)

    def to_scipy(self) -> Any:
        """Return a `scipy.sparse.linalg.LinearOperator` view (float64 numpy I/O).

        Examples:
            >>> import torch
            >>> from scipy.sparse.linalg import eigsh
            >>> from sharpgen.linalg import as_linear_operator
            >>> A = as_linear_operator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
            >>> round(float(eigsh(A.to_scipy(), k=1, which="LA")[0][0]), 8)
            5.0
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        def _mm(X: np.ndarray) -> np.ndarray:
            X2 = np.asarray(X).reshape(self._size, -1)
            T = torch.as_tensor(X2, dtype=self._dtype, device=self._device)
            out = self.matmat(T).detach().cpu().numpy().astype(np.float64)
            return out.reshape(X.shape) if np.ndim(X) == 1 else out

        return ScipyLinearOperator(
            shape=self.shape,
            matvec=_mm,
            matmat=_mm,
            rmatvec=_mm,
            rmatmat=_mm,
            dtype=np.float64,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self._size}, dtype={self._dtype}, device={self._device})"
        )


class _DenseOperator(LinearOperator):
    def __init__(self, A: Tensor) -> None:
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V


class _CallableOperator(LinearOperator):
    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        batched: bool,
    ) -> None:
        super().__init__(size, dtype, device)
        self.fn = fn
        self.batched = batched

    def _matmat(self, V: Tensor) -> Tensor:
        if self.batched:
            return self.fn(V)
        return torch.stack([self.fn(V[:, j]) for j in range(V.shape[1])], dim=1)


class _WrappedOperator(LinearOperator):
    """Adapter for foreign objects that only have ``shape``/``dtype``/``device``/``matmat``."""

    def __init__(self, obj: Any) -> None:
        super().__init__(int(obj.shape[0]), obj.dtype, obj.device)
        self.obj = obj

    def _matmat(self, V: Tensor) -> Tensor:
        return self.obj.matmat(V)


def as_linear_operator(
    A: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    *,
    size: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    batched: bool = False,
    check_symmetric: bool = False,
) -> LinearOperator:
    """Turn a dense matrix, an operator or a matvec callable into a `LinearOperator`.

    Args:
        A: A dense square tensor, an object with ``shape``, ``dtype``, ``device`` and
            ``matmat`` (returned unchanged if it already is a `LinearOperator`), or a
            callable ``v -> A @ v``.
        size: Dimension ``n``; required when ``A`` is a callable.
        dtype: Dtype of the vectors, when ``A`` is a callable.
        device: Device of the vectors, when ``A`` is a callable.
        batched: When ``A`` is a callable, whether it accepts ``(n, k)`` blocks directly.
        check_symmetric: For a dense ``A``, raise if it is not symmetric (to 1e-6 relative).

    Returns:
        A `LinearOperator` with a fresh (or, for an operator, its own) matvec counter.

    Raises:
        ValueError: If a dense ``A`` is not square or not symmetric when asked, or ``size``
            is missing for a callable.
        TypeError: If ``A`` is none of the accepted kinds.
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(
                f"A must be a square 2-D matrix, got shape {tuple(A.shape)}; pass an (n, n) "
                "tensor, an operator or a matvec callable with size=n."
            )
        if not A.is_floating_point():
            raise TypeError(f"A must be a floating-point tensor, got dtype {A.dtype}.")
        if check_symmetric:
            scale = A.abs().max().clamp_min(torch.finfo(A.dtype).tiny)
            asym = (A - A.T).abs().max() / scale
            if asym > 1e-6:
                raise ValueError(
                    f"A must be symmetric, but max|A - A^T| / max|A| = {float(asym):.3g}; "
                    "pass (A + A.T) / 2 if the asymmetry is round-off."
                )
        return _DenseOperator(A)
    if all(hasattr(A, attr) for attr in ("shape", "dtype", "device", "matmat")):
        duck: Any = A
        shape = tuple(duck.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"A must be a square operator, got shape {shape}.")
        return _WrappedOperator(A)
    if callable(A):
        if size is None:
            raise ValueError(
                "size is required when A is a matvec callable; pass size=n (the vector length)."
            )
        return _CallableOperator(A, size, dtype, device, batched)
    raise TypeError(
        f"A must be a square tensor, a linear operator or a matvec callable, got "
        f"{type(A).__name__}."
    )
