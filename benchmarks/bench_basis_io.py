"""Time of the Lanczos basis operations per storage: in memory, in a file, and the file before.

    PYTHONPATH=$PWD python benchmarks/bench_basis_io.py [--n 32000000] [--rows 4] [--rounds 5]

One Lanczos step touches its basis three ways: ``row(j)`` (the vector to multiply),
``orthogonalize(w, m)`` (classical Gram-Schmidt twice against the ``m`` rows) and
``write(j, v)``. Timed for a float32 basis of ``--rows`` rows of length ``--n`` (GPT-2
small has 124M parameters; the plan keeps ``k + 3`` rows in a file above its 256 MiB CPU
cap), in one process, interleaved rounds, medians:

* ``device``: the rows in memory (whole-block BLAS);
* ``disk``: the rows in a file (`sharpgen.linalg._basis.Basis`, read with ``os.preadv``
  into one reused buffer, written from the tensors' own bytes);
* ``disk, before``: the same file read and written as before this change (``os.pread``
  into a fresh ``bytearray`` per chunk, ``tobytes()`` copies per write), kept here as a
  subclass for the comparison.

Reads come from the page cache (the file was just written); a machine short of memory
would read from the disk itself. Read ratios on a shared machine.

A second table (``--fresh``, on by default) times what a Lanczos run does once per step:
writing a row into a part of the file never written before, into a file whose blocks were
reserved when it was made (``posix_fallocate``, what `Basis` does) and into a sparse one
(``ftruncate``, what it did before), interleaved, ``--rows`` fresh rows each round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import Tensor

import sharpgen.linalg._basis as basis_module
from sharpgen.linalg._basis import Basis


class BeforeBasis(Basis):
    """The file I/O of ``Basis`` before the ``preadv`` change (for the comparison only)."""

    def _get(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        assert self._fd is not None
        size = (c1 - c0) * self.itemsize
        buf = bytearray((r1 - r0) * size)
        for i in range(r0, r1):
            at = (i - r0) * size
            buf[at : at + size] = os.pread(self._fd, size, (i * self.n + c0) * self.itemsize)
        block = torch.frombuffer(buf, dtype=self.store_dtype).reshape(r1 - r0, c1 - c0)
        return block.to(device=self.device, dtype=self.dtype)

    def _put(self, rows: Tensor, start: int, c0: int, c1: int) -> None:
        assert self._fd is not None
        raw = rows.to(device="cpu", dtype=self.store_dtype).contiguous().view(torch.uint8)
        for i in range(rows.shape[0]):
            at = ((start + i) * self.n + c0) * self.itemsize
            os.pwrite(self._fd, raw[i].numpy().tobytes(), at)

    def row(self, i: int) -> Tensor:
        out = torch.empty(self.n, dtype=self.dtype, device=self.device)
        for c0, c1 in self._cols(1):
            out[c0:c1] = self._get(i, i + 1, c0, c1)[0]
        return out


def _sparse(fd: int, size: int, path: str) -> None:
    os.ftruncate(fd, size)


def fresh_writes(n: int, rows: int, rounds: int) -> None:
    """Median seconds to write a row into never-written parts of a reserved / sparse file."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=g)
    times: dict[str, list[float]] = {"reserved": [], "sparse": []}
    reserve = basis_module._reserve
    for _ in range(rounds):
        for name in times:
            basis_module._reserve = reserve if name == "reserved" else _sparse
            try:
                B = Basis(rows, n, dtype=torch.float32, device=torch.device("cpu"), storage="disk")
            finally:
                basis_module._reserve = reserve
            for i in range(rows):
                t0 = time.perf_counter()
                B.write(i, v)
                times[name].append(time.perf_counter() - t0)
            B.close()
    print(f"\nfresh rows of {n} float32 ({n * 4 / 1e9:.2f} GB), {rounds} rounds of {rows}:")
    print("| file | write s (median) | / reserved |")
    print("|---|---|---|")
    base = statistics.median(times["reserved"])
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) / base:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32_000_000)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--no-fresh",
        dest="fresh",
        action="store_false",
        help="skip the table of fresh row writes (reserved against sparse file)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, m, cpu = args.n, args.rows, torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    bases = {
        "device": Basis(m + 1, n, dtype=torch.float32, device=cpu),
        "disk": Basis(m + 1, n, dtype=torch.float32, device=cpu, storage="disk"),
        "disk, before": BeforeBasis(m + 1, n, dtype=torch.float32, device=cpu, storage="disk"),
    }
    for i in range(m):
        v = torch.randn(n, generator=g)
        v /= v.norm()
        for B in bases.values():
            B.write(i, v)
    w0 = torch.randn(n, generator=g)
    times: dict[str, dict[str, list[float]]] = {k: {} for k in bases}
    load0 = os.getloadavg()
    for r in range(args.rounds + 1):  # the first round warms up
        for name, B in bases.items():
            w = w0.clone()
            t0 = time.perf_counter()
            x = B.row(m - 1)
            t1 = time.perf_counter()
            w, _ = B.orthogonalize(w, m)
            t2 = time.perf_counter()
            B.write(m, w)
            t3 = time.perf_counter()
            del x
            if r:
                for key, t in (("row", t1 - t0), ("orthogonalize", t2 - t1), ("write", t3 - t2)):
                    times[name].setdefault(key, []).append(t)
    for B in bases.values():
        B.close()
    load1 = os.getloadavg()
    print(f"basis of {m} rows x {n} float32 ({m * n * 4 / 1e9:.2f} GB), {args.threads} threads, "
          f"medians of {args.rounds} interleaved rounds, load {load0} / {load1}")  # fmt: skip
    print("| storage | row s | orthogonalize s | write s | step s | step / device |")
    print("|---|---|---|---|---|---|")
    step = {k: sum(statistics.median(v) for v in times[k].values()) for k in bases}
    for name in bases:
        t = {key: statistics.median(v) for key, v in times[name].items()}
        print(f"| {name} | {t['row']:.3f} | {t['orthogonalize']:.3f} | {t['write']:.3f} "
              f"| {step[name]:.3f} | {step[name] / step['device']:.2f} |")  # fmt: skip
    if args.fresh:
        fresh_writes(n, m, args.rounds)


if __name__ == "__main__":
    main()
