"""Atomic checkpoint files: a crash leaves the old or the new file, never a torn one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically.

    The state is written to a temporary file in the same directory, flushed and ``fsync``-ed,
    then moved over ``path`` with `os.replace` (atomic on POSIX and Windows), and the
    directory entry is synced.

    Args:
        state: Tensors, lists, dicts, strings and numbers (loadable with ``weights_only``).
        path: Destination file; its directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint` (safe ``weights_only`` unpickling)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)
