"""The accurate reductions of `sharpgen.linalg._reduce` against float64 sums of the same numbers.

torch's float32 ``dot``/``vector_norm``/``X.T @ Y`` on a CPU are off by 1e-4..7e-2 at the
lengths used here (n = 4e6 .. 3e7, printed in each assertion); the helpers must be within a
few float32 epsilons. Each test stays under about a second and 1 GB.
"""

import pytest
import torch

from sharpgen.linalg._reduce import (
    BLOCK,
    column_dots,
    column_norms,
    dot,
    gram,
    is_long,
    norm,
    orthonormalize,
)

LONG = 30_000_000


def _rel(value, truth):
    return abs(float(value) - float(truth)) / abs(float(truth))


def _sum64(f, n, chunk=1 << 20):
    """``sum_i f(i-range)`` in float64, chunk by chunk (no float64 copy of a long vector)."""
    return sum(float(f(slice(c, c + chunk))) for c in range(0, n, chunk))


def _gram64(X, Y, chunk=1 << 18):
    """``X.T @ Y`` in float64, chunk by chunk of rows."""
    return sum(X[c : c + chunk].double().T @ Y[c : c + chunk].double()
               for c in range(0, X.shape[0], chunk))  # fmt: skip


@pytest.fixture(scope="module")
def long_vector():
    """A positive float32 vector of 3e7 numbers with a few large entries."""
    x = torch.rand(LONG, generator=torch.Generator().manual_seed(0))
    x[:: LONG // 4] = 1e3
    return x


def test_dot_and_norm_match_float64_at_3e7(long_vector):
    x = long_vector
    a, b = x[: LONG // 2], x[LONG // 2 :]
    truth_dot = _sum64(lambda s: (a[s].double() * b[s].double()).sum(), LONG // 2)
    truth_norm = _sum64(lambda s: (x[s].double() ** 2).sum(), LONG) ** 0.5
    assert _rel(torch.dot(a, b), truth_dot) > 1e-4  # the defect this module exists for
    assert _rel(torch.linalg.vector_norm(x), truth_norm) > 1e-4
    assert dot(a, b).dtype == torch.float64
    assert _rel(dot(a, b), truth_dot) < 1e-6
    assert _rel(norm(x), truth_norm) < 1e-6


def test_column_dots_and_norms_match_float64(long_vector):
    X = long_vector.view(-1, 2)  # (1.5e7, 2), strided columns
    truth = torch.tensor(
        [_sum64(lambda s, j=j: (X[s, j].double() ** 2).sum(), X.shape[0]) for j in range(2)],
        dtype=torch.float64,
    )
    assert float(((column_dots(X, X) - truth).abs() / truth).max()) < 1e-6
    assert column_norms(X).dtype == X.dtype
    assert float(((column_norms(X).double() - truth.sqrt()).abs() / truth.sqrt()).max()) < 1e-6
    assert column_dots(X[:, :0], X[:, :0]).shape == (0,)


def test_gram_matches_float64_where_matmul_does_not():
    g = torch.Generator().manual_seed(1)
    X = torch.rand(4_000_000, 2, generator=g)
    Y = torch.rand(4_000_000, 3, generator=g)
    truth = _gram64(X, Y)
    plain = ((X.T @ Y).double() - truth).abs().max() / truth.abs().max()
    assert plain > 1e-4  # float32 sgemm over 4e6 rows
    out = gram(X, Y)
    assert out.dtype == torch.float64 and out.shape == (2, 3)
    assert float(((out - truth).abs() / truth.abs()).max()) < 1e-6


def test_orthonormalize_repairs_float32_qr():
    g = torch.Generator().manual_seed(2)
    Y = torch.randn(2_000_000, 3, generator=g)
    Q, R = torch.linalg.qr(Y)
    eye = torch.eye(3, dtype=torch.float64)
    before = float((_gram64(Q, Q) - eye).abs().max())
    Q2, U = orthonormalize(Q)
    after = float((_gram64(Q2, Q2) - eye).abs().max())
    assert before > 1e-5, before  # torch's float32 QR at 2e6 rows
    assert after < 1e-6, after
    assert float((Q2 @ (U @ R) - Y).abs().max()) < 1e-4 * float(Y.abs().max())


def test_short_float64_and_rank_deficient_inputs_take_torchs_path():
    x = torch.arange(5.0)
    assert not is_long(x) and not is_long(torch.zeros(BLOCK + 1, dtype=torch.float64))
    assert is_long(torch.zeros(BLOCK + 1))
    assert float(dot(x, x)) == 30.0 and float(norm(x)) == pytest.approx(30.0**0.5)
    Q = torch.zeros(BLOCK + 1, 2)
    Q[0, 0] = Q[1, 1] = 1.0
    Q[:, 1] = Q[:, 0]  # rank 1: the Cholesky step fails, Q comes back unchanged
    same, U = orthonormalize(Q)
    assert same is Q and torch.equal(U, torch.eye(2))


def test_norm_works_under_vmap():
    g = torch.Generator().manual_seed(3)
    X = torch.rand(2, 3 * BLOCK, generator=g)
    out = torch.func.vmap(norm)(X)
    truth = X.double().norm(dim=1)
    assert float(((out - truth).abs() / truth).max()) < 1e-7


def test_gram_blocks_on_any_device_and_keeps_it():
    X = torch.empty(3 * BLOCK, 2, device="meta")
    assert is_long(X, X.shape[0], any_device=True) and not is_long(X, X.shape[0])
    out = gram(X, X)
    assert out.device.type == "meta" and out.dtype == torch.float64 and out.shape == (2, 2)


@pytest.mark.parametrize("group", [1, 3])
def test_chunked_reductions_cover_every_number_once(monkeypatch, group):
    # chunks of `group` blocks with a partial block at the end: every function must sum each
    # number exactly once (a skipped or doubled chunk changes the value by far more than 1e-6)
    import sharpgen.linalg._reduce as R

    monkeypatch.setattr(R, "GROUP", group)
    g = torch.Generator().manual_seed(3)
    n = 7 * BLOCK + 12345
    x, y = torch.rand(n, generator=g), torch.rand(n, generator=g)
    X, Y = torch.rand(n, 3, generator=g), torch.rand(n, 5, generator=g)
    assert _rel(R.dot(x, y), (x.double() * y.double()).sum()) < 1e-6
    w = x.clone()
    got = R.sub_dot(w, y, 0.5, x)
    assert torch.equal(w, x - 0.5 * y)
    assert _rel(got, (x.double() * w.double()).sum()) < 1e-6
    w = x.clone()
    got = R.sub_norm(w, y, torch.tensor(0.25, dtype=torch.float64))
    assert _rel(got, (x.double() - 0.25 * y.double()).norm()) < 1e-6
    dots = R.column_dots(X, X)
    assert torch.allclose(dots, (X.double() ** 2).sum(0), rtol=1e-6)
    truth = X.double().T @ Y.double()
    assert torch.allclose(R.gram(X, Y), truth, rtol=1e-6)
    Xs = torch.rand(n, 6, generator=g)[:, ::2]  # not contiguous: copied a chunk at a time
    assert torch.allclose(R.gram(Xs, Y), Xs.double().T @ Y.double(), rtol=1e-6)
