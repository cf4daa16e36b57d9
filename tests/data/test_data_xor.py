from __future__ import annotations

import pytest
import torch

from sharpgen.data import DataSplit, complete_xor, full_cube, xor_cube, xor_labels

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_full_cube_enumerates_every_point_once_in_binary_order():
    X = full_cube(4, dtype=F64)
    assert X.shape == (16, 4) and X.dtype == F64
    assert torch.unique(X, dim=0).shape[0] == 16
    assert X[0].tolist() == [1.0] * 4 and X[-1].tolist() == [-1.0] * 4
    bits = (X < 0).long()
    index = (bits * torch.tensor([8, 4, 2, 1])).sum(1)
    assert index.tolist() == list(range(16))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_xor_cube_values_labels_dtype_and_determinism(dtype):
    data = xor_cube(6, 50, generator=_gen(1), test_size=20, dtype=dtype)
    assert isinstance(data, DataSplit)
    assert data.X.shape == (50, 6) and data.X_test.shape == (20, 6)
    assert data.X.dtype == dtype and data.y.dtype == dtype and data.y_test.dtype == dtype
    assert bool(((data.X == 1) | (data.X == -1)).all())
    torch.testing.assert_close(data.y, data.X[:, 0] * data.X[:, 1])
    torch.testing.assert_close(data.y_test, xor_labels(data.X_test))
    again = xor_cube(6, 50, generator=_gen(1), test_size=20, dtype=dtype)
    assert torch.equal(again.X, data.X) and torch.equal(again.X_test, data.X_test)
    X, y = data.train
    assert X is data.X and y is data.y
    assert data.n == 50 and data.d == 6


def test_xor_cube_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    xor_cube(30, 100, generator=_gen(2), unique=True, test_size=50, disjoint_test=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_xor_cube_is_uniform_on_the_cube():
    # each coordinate is +1 with probability 1/2: the mean of n*d signs has sd 1/sqrt(n*d)
    data = xor_cube(8, 4000, generator=_gen(3), dtype=F64)
    mean = float(data.X.mean())
    assert abs(mean) < 4 / (4000 * 8) ** 0.5
    # pairs are independent: E[x_1 x_2] = 0 (sd 1/sqrt(n))
    assert abs(float(data.y.mean())) < 4 / 4000**0.5


@pytest.mark.parametrize("d", [4, 25])  # enumeration path and rejection path
def test_unique_and_disjoint_test(d):
    n = 10 if d == 4 else 200
    data = xor_cube(d, n, generator=_gen(4), unique=True, test_size=300, disjoint_test=True)
    assert torch.unique(data.X, dim=0).shape[0] == n
    overlap = (data.X_test.unsqueeze(1) == data.X.unsqueeze(0)).all(-1).any()
    assert not bool(overlap)


def test_unique_small_cube_covers_it_and_disjoint_test_then_fails():
    data = xor_cube(3, 8, generator=_gen(5), unique=True)
    assert torch.unique(data.X, dim=0).shape[0] == 8
    with pytest.raises(ValueError, match="cover the whole cube"):
        xor_cube(3, 8, generator=_gen(5), unique=True, test_size=2, disjoint_test=True)
    sub = xor_cube(3, 6, generator=_gen(5), unique=True, test_size=100, disjoint_test=True)
    missing = full_cube(3)[~(full_cube(3).unsqueeze(1) == sub.X.unsqueeze(0)).all(-1).any(1)]
    # the disjoint test set uses exactly the two points left out
    assert {tuple(r) for r in sub.X_test.tolist()} == {tuple(r) for r in missing.tolist()}


def test_xor_cube_without_unique_can_repeat_points():
    data = xor_cube(2, 50, generator=_gen(6))
    assert torch.unique(data.X, dim=0).shape[0] == 4


def test_xor_cube_bad_input():
    with pytest.raises(ValueError, match="d must be an int >= 2, got 1"):
        xor_cube(1, 5)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        xor_cube(3, 0)
    with pytest.raises(ValueError, match=r"n=9 distinct points requested but the cube"):
        xor_cube(3, 9, unique=True)
    with pytest.raises(ValueError, match="pass test_size"):
        xor_cube(3, 2, disjoint_test=True)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        xor_cube(3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="has no test set"):
        _ = xor_cube(3, 2).test


def _spans(S: torch.Tensor) -> int:
    if S.shape[1] == 0:
        return 0
    return int(torch.linalg.matrix_rank((S[1:] - S[0]).double()))


@pytest.mark.parametrize("d", [2, 3, 6])
def test_complete_xor_canonical_satisfies_condition_one(d):
    data = complete_xor(d, dtype=F64)
    X = data.X
    assert X.shape == (4 * (d - 1), d) and X.dtype == F64
    torch.testing.assert_close(data.y, X[:, 0] * X[:, 1])
    S = torch.unique(X[:, 2:], dim=0) if d > 2 else X[:1, 2:]
    assert S.shape[0] == d - 1 and _spans(S) == d - 2
    # every x[2:] in S comes with all four sign patterns of (x1, x2)
    for s in S:
        rows = X[(X[:, 2:] == s).all(1)]
        assert {tuple(r) for r in rows[:, :2].tolist()} == {(1, 1), (1, -1), (-1, 1), (-1, -1)}


def test_complete_xor_random_and_explicit_S():
    data = complete_xor(6, generator=_gen(7), size=8)
    S = data.X[::4, 2:]
    assert S.shape == (8, 4) and torch.unique(S, dim=0).shape[0] == 8 and _spans(S) == 4
    explicit = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]])
    out = complete_xor(4, explicit)
    assert torch.equal(out.X[::4, 2:], explicit)
    with pytest.raises(ValueError, match="span d - 2 = 2 dimensions, but they span 1"):
        complete_xor(4, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    with pytest.raises(ValueError, match="duplicate rows"):
        complete_xor(4, torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"shape \(k, d - 2\) = \(k, 2\)"):
        complete_xor(4, torch.ones(3, 3))
    with pytest.raises(ValueError, match="size must be between d - 1 = 5"):
        complete_xor(6, generator=_gen(), size=3)
    with pytest.raises(ValueError, match="pass generator"):
        complete_xor(6, size=7)
