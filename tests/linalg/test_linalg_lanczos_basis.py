"""Lanczos with a small, restarted basis and with other basis storage, against dense truth."""

import errno

import pytest
import torch

import sharpgen.linalg._basis as basis_module
from sharpgen.linalg import lanczos
from sharpgen.linalg._basis import Basis
from sharpgen.linalg._lanczos import convergence_threshold

N = 120


def with_spectrum(lam, seed):
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def _bulk(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _spectrum(name):
    top = {
        "tied": [5.0, 5.0, 5.0, 3.0, 3.0, 3.0],
        "clustered": [10.0, 10.0 - 1e-3, 10.0 - 2e-3, 9.99, 9.5, 9.4],
        "negative": [40.0, 25.0, -30.0, 12.0, -13.0, 8.0, 6.0],
    }[name]
    return torch.cat([torch.tensor(top, dtype=torch.float64), _bulk(N - len(top), -1.0, 1.0, 7)])


def _truth(lam, k, which):
    key = lam.abs() if which == "magnitude" else lam
    return lam[torch.argsort(key, descending=True)][:k]


def _certified(A, res, tol):
    """Each returned value is within its explicit residual of an eigenvalue, and converged
    values pass the stopping rule on those explicit residuals."""
    lam = torch.linalg.eigvalsh(A)
    X = res.eigenvectors
    explicit = torch.linalg.vector_norm(A @ X - X * res.eigenvalues, dim=0)
    for value, r in zip(res.eigenvalues.tolist(), explicit.tolist(), strict=True):
        assert float((lam - value).abs().min()) <= r * (1 + 1e-6) + 1e-12
    if res.converged:
        scale = float(res.eigenvalues.abs().max())
        for value, r in zip(res.eigenvalues.tolist(), explicit.tolist(), strict=True):
            assert r <= convergence_threshold(value, scale, tol, torch.float64) * 1.001
    return explicit


@pytest.mark.parametrize("name", ["tied", "clustered", "negative"])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("which", ["largest", "magnitude"])
def test_restarted_equals_unrestarted(name, k, which):
    lam = _spectrum(name)
    A = with_spectrum(lam, seed=3)
    truth = _truth(lam, k, which)
    tol = 1e-3
    seeds = 12
    sizes = (k + 3, k + 5, N)
    exact = dict.fromkeys(sizes, 0)
    agree = dict.fromkeys(sizes, 0)
    for seed in range(seeds):
        runs = {}
        for max_basis in sizes:
            res = lanczos(A, k, which=which, tol=tol, max_basis=max_basis,
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip
            assert res.converged, (max_basis, seed)
            explicit = _certified(A, res, tol)
            # partial reorthogonalization reports upper bounds, within the tolerance
            assert (res.residuals >= explicit * (1 - 1e-5) - 1e-12).all()
            assert (res.residuals <= explicit + tol * res.eigenvalues.abs()).all()
            exact[max_basis] += float(((res.eigenvalues - truth).abs() / truth.abs()).max()) <= tol
            runs[max_basis] = res
        assert runs[N].num_restarts == 0 and runs[k + 3].num_restarts > 0
        for max_basis, res in runs.items():
            diff = (res.eigenvalues - runs[N].eigenvalues).abs() / truth.abs()
            agree[max_basis] += float(diff.max()) <= 2 * tol
        # the top value is never missed, restarted or not
        assert abs(float(runs[k + 3].eigenvalues[0] - truth[0])) <= tol * abs(float(truth[0]))
    if name == "tied" and k == 5:
        # a Krylov space sees one copy of a multiple eigenvalue in exact arithmetic; the
        # others appear through rounding, restarted or not (both miss some in a few seeds)
        assert min(exact.values()) >= 0.6 * seeds and min(agree.values()) >= 0.6 * seeds
    elif name == "clustered" and k == 5:
        # three eigenvalues within 2e-4 of each other are one at tol=1e-3: the fifth value
        # is then the next one (9.4), restarted or not
        assert agree == dict.fromkeys(sizes, seeds)
    else:
        assert exact == dict.fromkeys(sizes, seeds) and agree == exact


def test_a_full_restart_cycle_is_exact_in_place():
    # the in-place chunked rotation equals the block product it replaces
    g = torch.Generator().manual_seed(0)
    V = Basis(6, 50, dtype=torch.float64, device=torch.device("cpu"), chunk=7)
    rows = torch.linalg.qr(torch.randn(50, 6, generator=g, dtype=torch.float64))[0].T
    for i in range(6):
        V.write(i, rows[i])
    S = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0][:, :3]
    V.rotate(S, 6)
    for i in range(3):
        torch.testing.assert_close(V.row(i), (S.T @ rows)[i], rtol=0, atol=1e-14)
    for i in range(3, 6):
        torch.testing.assert_close(V.row(i), rows[i], rtol=0, atol=0)


@pytest.mark.parametrize("storage", ["device", "host", "disk"])
def test_storage_gives_the_same_iteration(storage, monkeypatch, tmp_path):
    monkeypatch.setattr(basis_module, "CHUNK", 37)  # many chunks, uneven last one
    A = with_spectrum(_spectrum("negative"), seed=5)
    ref = lanczos(A, 3, tol=1e-8, max_basis=8, generator=torch.Generator().manual_seed(1))
    res = lanczos(A, 3, tol=1e-8, max_basis=8, basis_storage=storage, basis_dir=str(tmp_path),
                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert res.converged and res.num_matvecs == ref.num_matvecs and res.num_restarts > 0
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.residuals, ref.residuals, rtol=1e-6, atol=1e-12)
    assert list(tmp_path.iterdir()) == []  # the disk basis removes its file


@pytest.mark.parametrize("store_dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("short", [False, True])
def test_disk_rows_equal_host_rows_bit_for_bit(store_dtype, short, monkeypatch, tmp_path):
    # the file is read into a reused buffer and written from the tensors' own bytes; the
    # same streamed operations on host rows are the truth (same arithmetic, other source)
    if short:  # the kernel may transfer fewer bytes than asked: the loops must go on
        preadv, pwritev = basis_module.os.preadv, basis_module.os.pwritev
        monkeypatch.setattr(basis_module.os, "preadv",
                            lambda fd, bufs, at: preadv(fd, [bufs[0][:5]], at))  # fmt: skip
        monkeypatch.setattr(basis_module.os, "pwritev",
                            lambda fd, bufs, at: pwritev(fd, [bufs[0][:3]], at))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows = torch.linalg.qr(torch.randn(50, 5, generator=g, dtype=torch.float64))[0].T
    w = torch.randn(50, generator=g, dtype=torch.float64)
    S = torch.randn(4, 2, generator=g, dtype=torch.float64)
    out = {}
    for storage in ("host", "disk"):
        V = Basis(5, 50, dtype=torch.float64, device=torch.device("cpu"), storage=storage,
                  store_dtype=store_dtype, directory=tmp_path, chunk=7)  # fmt: skip
        V.fast = False  # host rows streamed in the same chunks as the file's
        for i in range(4):
            V.write(i, rows[i])
        ortho, h = V.orthogonalize(w.clone(), 4)
        V.rotate(torch.linalg.qr(S)[0], 4)
        out[storage] = [V.row(i) for i in range(4)] + [ortho, h, V.combine(S, 4)]
        V.close()
    for a, b in zip(out["host"], out["disk"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == []


def test_disk_basis_file_cut_short_is_an_error(tmp_path):
    V = Basis(2, 10, dtype=torch.float32, device=torch.device("cpu"), storage="disk",
              directory=tmp_path)  # fmt: skip
    V.write(0, torch.ones(10))
    basis_module.os.ftruncate(V._fd, 8)  # someone else shortened the file
    with pytest.raises(OSError, match="ended early"):
        V.row(0)
    V.close()


def test_disk_basis_removes_its_file_after_an_error(tmp_path):
    def failing(v):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lanczos(failing, 1, size=10, basis_storage="disk", basis_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["tied", "clustered", "negative"])
@pytest.mark.parametrize("k", [1, 5])
def test_float16_basis_keeps_the_certificate(name, k):
    lam = _spectrum(name)
    A = with_spectrum(lam, seed=4)
    truth = _truth(lam, k, "largest")
    tol = 1e-3
    conv = 0
    for seed in range(10):
        res = lanczos(A, k, tol=tol, max_basis=k + 4, basis_dtype=torch.float16,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip
        explicit = _certified(A, res, tol)
        # the reported residuals are the explicit ones, not the rounded basis's estimate
        torch.testing.assert_close(res.residuals, explicit, rtol=1e-6, atol=1e-10)
        conv += res.converged
        if res.converged and name != "clustered":  # (the cluster is one value at tol=1e-3)
            assert float(((res.eigenvalues - truth).abs() / truth.abs()).max()) <= tol
    assert conv >= 8


def test_bfloat16_basis_says_when_rounding_prevents_the_certificate():
    A = with_spectrum(_spectrum("negative"), seed=4).float()
    res = lanczos(A, 5, tol=1e-3, basis_dtype=torch.bfloat16,
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    X = res.eigenvectors
    explicit = torch.linalg.vector_norm(A @ X - X * res.eigenvalues, dim=0)
    torch.testing.assert_close(res.residuals, explicit, rtol=1e-3, atol=1e-5)
    scale = float(res.eigenvalues.abs().max())
    passes = all(
        r <= convergence_threshold(v, scale, 1e-3, torch.float32) * 1.01
        for v, r in zip(res.eigenvalues.tolist(), explicit.tolist(), strict=True)
    )
    assert res.converged == passes or (res.converged and passes)
    assert res.num_matvecs < 200  # gives up after three refuted checks


def test_basis_dtype_errors():
    A = torch.eye(5, dtype=torch.float32)
    with pytest.raises(TypeError, match="basis_dtype must be None or a floating torch.dtype"):
        lanczos(A, 1, basis_dtype="float16")
    with pytest.raises(ValueError, match="basis_dtype=torch.float64 is wider"):
        lanczos(A, 1, basis_dtype=torch.float64)
    with pytest.raises(ValueError, match="basis_storage"):
        lanczos(A, 1, basis_storage="gpu")


@pytest.mark.parametrize("wrapped", [False, True])
def test_lanczos_frees_a_start_handed_over(wrapped):
    import weakref

    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    refs: list = []
    alive: list[bool] = []

    def start() -> torch.Tensor:
        v0 = torch.ones(20, dtype=torch.float64)
        refs.append(weakref.ref(v0))
        return v0

    def mv(x: torch.Tensor) -> torch.Tensor:
        alive.append(refs[0]() is not None)
        return A @ x

    if wrapped:  # the caller hands it over through a list it empties (top_eigenvalues)
        starts = [start()]
        res = lanczos(mv, k=1, size=20, v0=starts.pop(), tol=1e-8)
    else:
        res = lanczos(mv, k=1, size=20, v0=start(), tol=1e-8)
    assert res.converged and alive and not any(alive)


def test_a_small_file_basis_reads_into_a_buffer_of_its_size():
    V = Basis(5, 100, dtype=torch.float64, device=torch.device("cpu"), storage="disk")
    g = torch.Generator().manual_seed(0)
    try:
        for i in range(5):
            V.write(i, torch.randn(100, dtype=torch.float64, generator=g))
        V.orthogonalize(torch.randn(100, dtype=torch.float64, generator=g), 5)
        assert V._buf is not None and V._buf.numel() == 5 * 100  # not a chunk of 4 Mi
    finally:
        V.close()


def test_disk_basis_reserves_its_blocks_up_front(tmp_path):
    # reserved blocks (posix_fallocate): writing a row into a sparse file allocated its pages
    # one by one, 1.3-1.6x slower on ext4; st_blocks counts 512-byte units actually allocated
    n = 50_000
    V = Basis(3, n, dtype=torch.float32, device=torch.device("cpu"), storage="disk",
              directory=tmp_path)  # fmt: skip
    st = basis_module.os.fstat(V._fd)
    assert st.st_size == 3 * n * 4
    assert st.st_blocks * 512 >= 3 * n * 4
    V.close()


def _failing_fallocate(code):
    def fallocate(fd, offset, size):
        raise OSError(code, basis_module.os.strerror(code))

    return fallocate


def test_disk_basis_without_room_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(basis_module.os, "posix_fallocate", _failing_fallocate(errno.ENOSPC))
    with pytest.raises(OSError, match=r"needs 0\.\d+ GiB .* basis_dir= .* smaller max_basis"):
        lanczos(lambda v: v, 1, size=10, basis_storage="disk", basis_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no file left behind


def test_disk_basis_falls_back_to_a_sparse_file(tmp_path, monkeypatch):
    monkeypatch.setattr(basis_module.os, "posix_fallocate", _failing_fallocate(errno.EOPNOTSUPP))
    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    res = lanczos(A, 1, tol=1e-10, basis_storage="disk", basis_dir=str(tmp_path),
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert res.converged and abs(float(res.eigenvalues[0]) - 20.0) < 1e-8
    assert list(tmp_path.iterdir()) == []
