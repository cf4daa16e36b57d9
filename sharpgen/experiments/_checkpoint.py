"""Atomic files: a crash leaves the old or the new file, never a torn one.

Checkpoints (``torch.save``), ``results.json``, ``report.md`` and the plot are all written
with the same write-to-a-temporary-file-then-rename pattern.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write",
    "atomic_write_text",
    "restart_hint",
    "spec_differences",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from (unreadable, or another experiment's).

    The message names the file and says how to proceed.
    """


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, then move it over ``path``.

    The temporary file is flushed and ``fsync``-ed, then renamed with `os.replace` (atomic on
    POSIX and Windows) and the directory entry is synced. If ``write`` (or the disk) fails, the
    temporary file is removed and ``path`` keeps its old content.

    Args:
        path: Destination file; its directory is created if needed.
        write: Writes the content to the binary handle it is given.

    Returns:
        ``path`` as a `~pathlib.Path`.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = atomic_write(p, lambda f: f.write(b"hello"))
        >>> p.read_bytes()
        b'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
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
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


def spec_differences(saved: Any, current: dict) -> list[str]:
    """The settings in which a checkpoint's experiment differs from ``current``.

    Both are `ExperimentSpec.to_dict` dicts; ``notes`` (free text, not part of the experiment)
    is ignored. A ``saved`` that is not a dict differs in everything.

    Examples:
        >>> spec_differences({"lr": 1, "notes": "a"}, {"lr": 2, "notes": "b"})
        ['lr']
    """
    if not isinstance(saved, dict):
        return sorted(k for k in current if k != "notes")
    keys = (set(saved) | set(current)) - {"notes"}
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def restart_hint(path: str | Path) -> str:
    """How to proceed when the checkpoint at ``path`` cannot be resumed from."""
    return (
        f"nothing was trained; delete {path} to restart that experiment from scratch, or run "
        "without --resume (which restarts every experiment and overwrites its checkpoint)"
    )


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (see `atomic_write`).

    Args:
        state: Tensors, lists, dicts, strings and numbers (loadable with ``weights_only``).
        path: Destination file; its directory is created if needed.
    """
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint` (safe ``weights_only`` unpickling).

    Raises:
        CheckpointError: If the file is empty, truncated or not a checkpoint at all. The
            message names the file and says how to proceed.
    """
    path = Path(path)
    fix = restart_hint(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or not a sharpgen checkpoint: "
            f"{reason[:120]}); {fix}"
        ) from None
    return state
