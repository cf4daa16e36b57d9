"""The data of a study: a training pool and a test set, and every model's own training set.

scikit-learn's sets are split once (``data_seed``) into a pool and a held-out test set and
standardized with the pool's mean and standard deviation; the paper's xor and ball sets are
drawn with `sharpgen.data`. A model's training set is ``train_size`` points of the pool
(`train_subset`), with a ``label_noise`` fraction of labels corrupted (`corrupt_labels`:
another class drawn uniformly, or the sign flipped for xor / ball).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sharpgen.study._spec import StudySpec

__all__ = ["StudyData", "load_data", "train_subset", "corrupt_labels", "derive_seed", "seeded"]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (stable across processes and Python versions).

    Examples:
        >>> derive_seed(0, "init", 3) == derive_seed(0, "init", 3) != derive_seed(0, "init", 4)
        True
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded(*parts: Any) -> torch.Generator:
    """A CPU generator seeded with `derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True, eq=False)
class StudyData:
    """A training pool and a test set.

    Attributes:
        X: Pool inputs ``(N, d)``.
        y: Pool labels ``(N,)``: class indices (int64) for classification, floats for xor/ball.
        X_test: Test inputs.
        y_test: Test labels.
        classes: Number of classes, or 1 for the scalar-output sets.
    """

    X: Tensor
    y: Tensor
    X_test: Tensor
    y_test: Tensor
    classes: int


def _sklearn(name: str) -> tuple[Any, Any]:
    try:
        from sklearn import datasets
    except ImportError:
        raise ImportError(
            f"data={name!r} loads a scikit-learn data set, but scikit-learn is not installed; "
            "install it with: pip install 'sharpgen[study]'"
        ) from None
    loader = datasets.load_digits if name == "digits" else datasets.load_breast_cancer
    bunch = loader()
    return bunch.data, bunch.target


def load_data(spec: StudySpec) -> StudyData:
    """The pool and test set of ``spec`` (deterministic in ``spec.data_seed``)."""
    dtype = getattr(torch, spec.dtype)
    assert spec.test_size is not None  # StudySpec sets its default
    g = seeded("data", spec.data, spec.data_seed)
    if spec.data in ("xor", "ball"):
        from sharpgen.data import uniform_ball, xor_cube

        assert spec.d is not None and spec.pool_size is not None
        draw = xor_cube if spec.data == "xor" else uniform_ball
        split = draw(spec.d, spec.pool_size, test_size=int(spec.test_size), generator=g)
        assert split.X_test is not None and split.y_test is not None
        return StudyData(
            split.X.to(dtype), split.y.to(dtype), split.X_test.to(dtype), split.y_test.to(dtype), 1
        )
    data, target = _sklearn(spec.data)
    X = torch.as_tensor(data, dtype=torch.float64)
    y = torch.as_tensor(target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=g)
    n_test = max(1, round(float(spec.test_size) * len(y)))
    test, pool = perm[:n_test], perm[n_test:]
    mean, std = X[pool].mean(0), X[pool].std(0)
    X = (X - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return StudyData(X[pool].to(dtype), y[pool], X[test].to(dtype), y[test], spec.classes)


def train_subset(data: StudyData, train_size: int | None, generator: torch.Generator) -> Tensor:
    """Indices of one model's training points: the first ``train_size`` of a pool permutation.

    All of the pool (in permuted order) when ``train_size`` is None.
    """
    N = data.X.shape[0]
    return torch.randperm(N, generator=generator)[: N if train_size is None else train_size]


def corrupt_labels(y: Tensor, fraction: float, classes: int, generator: torch.Generator) -> Tensor:
    """A copy of ``y`` with ``round(fraction * n)`` labels corrupted.

    The corrupted points are the first ones of a permutation; a class label moves to one of
    the other classes uniformly (``classes > 1``), a scalar label changes its sign.
    """
    n = y.shape[0]
    y = y.clone()
    k = round(fraction * n)
    if k > 0:
        bad = torch.randperm(n, generator=generator)[:k]
        if classes > 1:
            y[bad] = (y[bad] + torch.randint(1, classes, (k,), generator=generator)) % classes
        else:
            y[bad] = -y[bad]
    return y
