"""The result type of the data generators (private)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["DataSplit"]


@dataclass(frozen=True, eq=False)
class DataSplit:
    """A training set and an optional test set, as returned by every generator here.

    Attributes:
        X: Training inputs ``(n, d)``.
        y: Training labels ``(n,)``.
        X_test: Test inputs ``(n_test, d)``, or None when no test set was asked for.
        y_test: Test labels ``(n_test,)``, or None.

    Examples:
        >>> import torch
        >>> from sharpgen.data import xor_cube
        >>> data = xor_cube(4, 8, generator=torch.Generator().manual_seed(0))
        >>> X, y = data.train
        >>> X.shape, y.shape, data.X_test is None
        (torch.Size([8, 4]), torch.Size([8]), True)
    """

    X: Tensor
    y: Tensor
    X_test: Tensor | None = None
    y_test: Tensor | None = None

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        """``(X, y)``."""
        return self.X, self.y

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        """``(X_test, y_test)``; raises ValueError when there is no test set."""
        if self.X_test is None or self.y_test is None:
            raise ValueError(
                "this DataSplit has no test set; ask the generator for one with test_size=..."
            )
        return self.X_test, self.y_test

    @property
    def n(self) -> int:
        """Number of training points."""
        return int(self.X.shape[0])

    @property
    def d(self) -> int:
        """Input dimension."""
        return int(self.X.shape[1])

    def __repr__(self) -> str:
        test = "None" if self.X_test is None else f"{self.X_test.shape[0]} points"
        return f"DataSplit(n={self.n}, d={self.d}, test={test}, dtype={self.X.dtype})"
