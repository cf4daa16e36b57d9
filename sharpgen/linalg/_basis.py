r"""Where a Lanczos basis lives and in what precision: the operator's device, host memory, a file.

A basis is ``capacity`` orthonormal rows of length $n$. Lanczos needs six things from it:
write a row, read a row, orthogonalize a vector against the first $m$ rows (classical
Gram-Schmidt twice: every step with full reorthogonalization, only some with partial),
the norms of combinations of the rows (the certificate of partial reorthogonalization),
rotate the first $m$ rows in place (a thick restart) and combine them
(Ritz vectors). On the operator's device in its own dtype these are whole-block BLAS calls;
every other storage streams the rows in column chunks of about `CHUNK` numbers, so the
working memory beyond the stored rows is one chunk of all rows plus the vector itself.

Memory (bytes; $b$ the stored element size, $n$ the dimension, $c$ the capacity):

* ``"device"``: $c\,n\,b$ on the operator's device;
* ``"host"``: $c\,n\,b$ in host memory (pinned when CUDA is available); on a CPU operator
  the same as ``"device"``;
* ``"disk"``: $c\,n\,b$ in a temporary file, read and written with explicit positioned
  reads and writes (never mapped), so only one chunk of it is in the process at a time.

A stored dtype below the operator's (``float16``, ``bfloat16``) halves the bytes; the rows
are rounded, so the Lanczos relation holds only to the stored precision and `lanczos`
certifies its result with explicit residuals instead (see there). ``float16`` rows are
stored times $\min(\sqrt{n}, 2^{14})$: a unit vector's typical entry $1/\sqrt{n}$ then
sits near 1, far above float16's subnormal range, and no entry (at most 1) overflows.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile

import torch
from torch import Tensor

__all__ = ["CHUNK", "STORAGES", "Basis"]

STORAGES = ("device", "host", "disk")
#: Numbers per streamed chunk (all rows of a chunk of columns): 4 Mi, 16 MiB in float32.
CHUNK = 1 << 22


class Basis:
    """``capacity`` rows of length ``n`` and the Lanczos operations on the first ``m``.

    Args:
        capacity: Number of rows.
        n: Row length.
        dtype: The operator's dtype (what rows are read and written as).
        device: The operator's device.
        storage: ``"device"``, ``"host"`` or ``"disk"``.
        store_dtype: The stored element type (default ``dtype``).
        directory: Where ``"disk"`` puts its file (default: the system's temporary
            directory).
        chunk: Numbers per streamed chunk (default `CHUNK`).
    """

    def __init__(
        self,
        capacity: int,
        n: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        storage: str = "device",
        store_dtype: torch.dtype | None = None,
        directory: str | os.PathLike[str] | None = None,
        chunk: int | None = None,
    ) -> None:
        self.capacity, self.n, self.dtype, self.device = capacity, n, dtype, device
        self.storage = storage
        self.store_dtype = dtype if store_dtype is None else store_dtype
        self.lossy = self.store_dtype != dtype
        half = self.lossy and self.store_dtype == torch.float16
        self.scale = min(math.sqrt(n), 2.0**14) if half else 1.0
        self.itemsize = torch.empty((), dtype=self.store_dtype).element_size()
        self.chunk = CHUNK if chunk is None else chunk
        self._fd: int | None = None
        self._path = ""
        self.V: Tensor | None = None
        self._buf: Tensor | None = None  # the reused read buffer of "disk"
        where = device if storage == "device" else torch.device("cpu")
        if storage == "disk":
            handle, self._path = tempfile.mkstemp(prefix="sharpgen-lanczos-", dir=directory)
            self._fd = handle
            try:
                _reserve(handle, capacity * n * self.itemsize, self._path)
            except BaseException:
                self.close()
                raise
        else:
            pin = storage == "host" and device.type == "cuda"
            self.V = torch.empty(capacity, n, dtype=self.store_dtype, device=where, pin_memory=pin)
        self.fast = self.V is not None and where == device and not self.lossy

    # -- bytes ------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (in memory, or on disk for ``"disk"``)."""
        return self.capacity * self.n * self.itemsize

    def close(self) -> None:
        """Free the rows (delete the file of ``"disk"``)."""
        self.V = self._buf = None
        if self._fd is not None:
            os.close(self._fd)
            os.unlink(self._path)
            self._fd = None

    # -- chunked access ---------------------------------------------------------------
    def _cols(self, m: int) -> list[tuple[int, int]]:
        width = max(1, self.chunk // max(m, 1))
        return [(c, min(c + width, self.n)) for c in range(0, self.n, width)]

    def _get(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Rows ``[r0, r1)``, columns ``[c0, c1)`` in the operator's dtype and device."""
        if self.V is not None:
            block = self.V[r0:r1, c0:c1]
        else:
            block = self._read(r0, r1, c0, c1)
        out = block.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return out.div_(self.scale) if self.scale != 1.0 else out

    def _read(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Rows ``[r0, r1)``, columns ``[c0, c1)`` of the file, read straight into a buffer.

        One reused buffer of at most `chunk` numbers (the block of `_cols`): each row's
        segment is read into its place by ``os.preadv``, no intermediate ``bytes``. The
        block is valid until the next read; every caller uses it (or a converted copy)
        before that.
        """
        assert self._fd is not None
        size = (r1 - r0) * (c1 - c0)
        if self._buf is None or self._buf.numel() < size:
            # a chunk, or the whole file where it is smaller (a small basis: not 4 Mi numbers)
            most = min(self.chunk, self.capacity * self.n)
            self._buf = torch.empty(max(size, most), dtype=self.store_dtype)
        block = self._buf[:size].view(r1 - r0, c1 - c0)
        for i in range(r0, r1):
            _read_into(self._fd, block[i - r0], (i * self.n + c0) * self.itemsize)
        return block

    def _put(self, rows: Tensor, start: int, c0: int, c1: int) -> None:
        """Store ``rows`` (q, c1 - c0) as rows ``[start, start + q)``, columns ``[c0, c1)``."""
        if self.scale != 1.0:
            rows = rows * self.scale
        if self.V is not None:
            self.V[start : start + rows.shape[0], c0:c1].copy_(rows)
            return
        assert self._fd is not None
        raw = rows.to(device="cpu", dtype=self.store_dtype).contiguous()
        for i in range(rows.shape[0]):
            _write_from(self._fd, raw[i], ((start + i) * self.n + c0) * self.itemsize)

    # -- the Lanczos operations -------------------------------------------------------
    def write(self, i: int, v: Tensor) -> None:
        """Store ``v`` as row ``i``."""
        if self.fast:
            assert self.V is not None
            self.V[i].copy_(v)
            return
        for c0, c1 in self._cols(1):
            self._put(v[c0:c1].unsqueeze(0), i, c0, c1)

    def write_scaled(self, i: int, v: Tensor, scale: float) -> None:
        """Store ``scale * v`` as row ``i`` (in memory: one pass; else ``v`` is scaled in place)."""
        if self.fast:
            assert self.V is not None
            torch.mul(v, scale, out=self.V[i])
            return
        self.write(i, v.mul_(scale))

    def row(self, i: int) -> Tensor:
        """Row ``i`` as stored (a view on the fast path, else a fresh vector)."""
        if self.fast:
            assert self.V is not None
            return self.V[i]
        out = torch.empty(self.n, dtype=self.dtype, device=self.device)
        if self._fd is not None and not self.lossy and self.device.type == "cpu":
            _read_into(self._fd, out, i * self.n * self.itemsize)  # one read, no buffer
            return out
        for c0, c1 in self._cols(1):
            out[c0:c1] = self._get(i, i + 1, c0, c1)[0]
        return out

    def orthogonalize(self, w: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """Classical Gram-Schmidt twice against rows ``[0, m)``: ``(w_perp, V w)``.

        The fast path is two matrix-vector pairs on the block (the first out of place: a
        product may alias a row of the block). Streamed: three passes over the rows, the
        second projection accumulated chunk by chunk while the first is subtracted, on
        ``w`` in place.
        """
        if self.fast:
            assert self.V is not None
            V = self.V[:m]
            h = V @ w
            w = torch.addmv(w, V.T, h, alpha=-1.0)
            h2 = V @ w
            return w.addmv_(V.T, h2, alpha=-1.0), h + h2
        # streamed rows live elsewhere (a file, host memory, another dtype): ``w`` cannot
        # alias them, so it is updated in place (at most it is the row just read)
        cols = self._cols(m)
        h = torch.zeros(m, dtype=self.dtype, device=self.device)
        for c0, c1 in cols:
            h.addmv_(self._get(0, m, c0, c1), w[c0:c1])
        h2 = torch.zeros_like(h)
        for c0, c1 in cols:
            block = self._get(0, m, c0, c1)
            part = w[c0:c1]
            part.addmv_(block.T, h, alpha=-1.0)
            h2.addmv_(block, part)
        for c0, c1 in cols:
            w[c0:c1].addmv_(self._get(0, m, c0, c1).T, h2, alpha=-1.0)
        return w, h + h2

    def rotate(self, S: Tensor, m: int) -> None:
        """Rows ``[0, q)`` become ``S^T V[:m]`` in place (``S`` is ``(m, q)``, ``q <= m``)."""
        for c0, c1 in self._cols(m):
            self._put(S.T @ self._get(0, m, c0, c1), 0, c0, c1)

    def norms(self, S: Tensor, m: int) -> Tensor:
        """``||V[:m]^T S[:, i]||`` for each column, in one chunked pass (no ``(n, q)`` result)."""
        acc = torch.zeros(S.shape[1], dtype=torch.float64, device=self.device)
        for c0, c1 in self._cols(max(m, S.shape[1])):
            part = S.T @ self._get(0, m, c0, c1)
            acc += part.square().sum(dim=1, dtype=torch.float64)
        return acc.sqrt()

    def combine(self, S: Tensor, m: int) -> Tensor:
        """``V[:m]^T S``, shape ``(n, q)``."""
        if self.fast:
            assert self.V is not None
            return self.V[:m].T @ S
        out = torch.empty(self.n, S.shape[1], dtype=self.dtype, device=self.device)
        for c0, c1 in self._cols(m):
            out[c0:c1] = self._get(0, m, c0, c1).T @ S
        return out


def _reserve(fd: int, size: int, path: str) -> None:
    """Give the file ``fd`` its ``size`` bytes of disk blocks now (``posix_fallocate``).

    A sparse file (``ftruncate``) gets its blocks one page at a time as rows are written:
    on ext4 a fresh row of GPT-2 small's 0.50 GB took 0.20-0.23 s to write against
    0.14-0.15 s into reserved blocks (``benchmarks/bench_basis_io.py --n 124000000``, two
    runs). Where the file system cannot reserve (no ``posix_fallocate``, or it says the
    operation is unsupported) the file is sparse; a disk without room for the basis is
    an error now, not a failed write in the middle of the iteration.
    """
    reserve = getattr(os, "posix_fallocate", None)
    if reserve is not None and size > 0:
        try:
            reserve(fd, 0, size)
            return
        except OSError as err:
            if err.errno == errno.ENOSPC:
                free = shutil.disk_usage(os.path.dirname(path) or ".").free
                raise OSError(
                    errno.ENOSPC,
                    f"basis_storage='disk' needs {size / 2**30:.2f} GiB for the Lanczos basis "
                    f"in {os.path.dirname(path)!r}, which has {free / 2**30:.2f} GiB free; pass "
                    f"basis_dir= a directory with room, or a smaller max_basis.",
                ) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)


def _bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a memoryview (no copy)."""
    return t.view(torch.uint8).numpy().data.cast("B")


def _read_into(fd: int, out: Tensor, offset: int) -> None:
    """Fill the contiguous CPU tensor ``out`` from ``fd`` at byte ``offset`` (no copies).

    ``os.preadv`` reads at most about 2 GiB per call and may return fewer bytes than
    asked: it is repeated until ``out`` is full.
    """
    view, done = _bytes(out), 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + _IO_MAX]], offset + done)
        if got <= 0:
            raise OSError(f"the Lanczos basis file ended early ({done} of {len(view)} bytes)")
        done += got


def _write_from(fd: int, row: Tensor, offset: int) -> None:
    """Write the contiguous CPU tensor ``row`` to ``fd`` at byte ``offset`` (no copies)."""
    view, done = _bytes(row), 0
    while done < len(view):
        done += os.pwritev(fd, [view[done : done + _IO_MAX]], offset + done)


#: Most bytes per ``preadv``/``pwritev`` call (Linux transfers at most 2 GiB - 4 KiB).
_IO_MAX = 1 << 30
