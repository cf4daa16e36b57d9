"""Ctrl-C while the ``sharpgen`` command line is still importing PyTorch: one line, status 130.

``import sharpgen`` is lazy (it imports no PyTorch), so ``sharpgen --help`` starts at once;
a command that runs imports PyTorch first, which takes a second or two. A Ctrl-C then would
show Python's ``KeyboardInterrupt`` traceback from deep inside half-imported modules, so
`sharpgen.cli` calls `begin` before that import and `end` after it: in the command line only,
a SIGINT between them prints one line and ends the process with status 130 (128 + SIGINT, as
`sharpgen.cli.main` does later). Nothing has been written at that point, so nothing is left
to clean up. As a library (``import sharpgen`` from any other program) nothing changes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

__all__ = ["started_as_cli", "begin", "end"]

_SCRIPTS = frozenset({"sharpgen", "sharpgen.exe", "sharpgen-script.py"})
_VALUED = frozenset({"-W", "-X", "--check-hash-based-pycs"})  # options whose value follows
_MESSAGE = "sharpgen: interrupted while starting (importing PyTorch); nothing was written\n"


def started_as_cli(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process is the ``sharpgen`` command line.

    That is the console script (``sys.argv[0]`` named ``sharpgen``) or ``python [options] -m
    sharpgen`` (``-m sharpgen`` in ``sys.orig_argv``; ``torchrun -m sharpgen`` starts its
    processes so).

    Examples:
        >>> started_as_cli(["/usr/bin/sharpgen", "reproduce"], [])
        True
        >>> started_as_cli(["-m", "reproduce"], ["python", "-X", "dev", "-m", "sharpgen"])
        True
        >>> started_as_cli(["train.py"], ["python", "train.py", "-m", "sharpgen"])
        False
    """
    argv = sys.argv if argv is None else argv
    orig = list(getattr(sys, "orig_argv", [])) if orig_argv is None else orig_argv
    if argv and argv[0].replace("\\", "/").rsplit("/", 1)[-1] in _SCRIPTS:
        return True
    i = 1  # the interpreter's options, up to the module, command or script
    while i < len(orig):
        arg = orig[i]
        if arg.startswith("-m"):
            return (arg[2:] or "".join(orig[i + 1 : i + 2])) == "sharpgen"
        if arg in _VALUED:
            i += 2
        elif arg.startswith("-") and arg != "-" and not arg.startswith("-c"):
            i += 1
        else:  # -c, a script or stdin: a later "-m" is that program's argument
            return False
    return False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        sys.stderr.write(_MESSAGE)
        sys.stderr.flush()
    os._exit(130)  # half-imported modules: no clean-up hooks to run, nothing written yet


def begin() -> None:
    """In the command line, make a SIGINT print one line and exit with status 130.

    Only where Python's default handler is in place (not where SIGINT is ignored, as in the
    worker processes of ``--jobs``) and only in the main thread.
    """
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        and started_as_cli()
    ):
        signal.signal(signal.SIGINT, _on_sigint)


def end() -> None:
    """Give SIGINT back to Python (``KeyboardInterrupt``), if `begin` took it."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is _on_sigint
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)
