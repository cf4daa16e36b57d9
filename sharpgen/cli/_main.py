"""The ``sharpgen`` parser, the table of sub-commands, and `main`.

A sub-command is one module in this package with

* ``add_parser(subparsers) -> argparse.ArgumentParser``: its arguments and help;
* ``run(args) -> int``: the command, returning the exit status;
* ``REQUIRES``: the modules it cannot run without (checked before anything is imported);
* optionally ``interrupted_hint(args) -> str``: what to tell the user after Ctrl-C,

and one line in `COMMANDS`. Those modules import only the standard library at module level
(PyTorch and sharpgen's library inside ``run``), so ``sharpgen --help``, ``--version`` and
``sharpgen COMMAND --help`` start at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from sharpgen import _startup
from sharpgen._version import __version__
from sharpgen.cli._common import fail, missing_packages

__all__ = ["COMMANDS", "build_parser", "main"]

#: The sub-commands: name -> module (see the module docstring for what a module provides).
COMMANDS: dict[str, str] = {
    "reproduce": "sharpgen.cli._reproduce",
    "measure": "sharpgen.cli._measure",
    "study": "sharpgen.cli._study",
}

_DESCRIPTION = """\
sharpgen: measure and minimize sharpness, and reproduce Wen, Li & Ma (2023),
"Sharpness Minimization Algorithms Do Not Only Minimize Sharpness To Achieve Better
Generalization" (NeurIPS 2023).

Start with:   sharpgen reproduce            (the quick preset: Table 1 in a few CPU minutes)
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _command(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    """The ``sharpgen`` argument parser, one sub-parser per entry of `COMMANDS`."""
    parser = _Parser(
        prog="sharpgen",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sharpgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        _command(name).add_parser(sub)
    return parser


def _start(command: str, module: ModuleType) -> int | None:
    """Check the command's packages, then import PyTorch; an exit status if it cannot run.

    A missing package is named in one line before anything is imported. A Ctrl-C while
    PyTorch imports (a second or two) prints one line and exits with status 130, see
    `sharpgen._startup`.
    """
    _startup.begin()
    try:
        missing = missing_packages(getattr(module, "REQUIRES", ()))
        if missing:
            return fail(
                command,
                f"needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                f"not installed; install with: pip install {' '.join(missing)}",
            )
        importlib.import_module("torch")
    finally:
        _startup.end()
    return None


def _interrupted(args: argparse.Namespace, module: ModuleType) -> int:
    """The one line printed on Ctrl-C; exit status 130 (128 + SIGINT), as shells use.

    Under ``torchrun`` only rank 0 prints it (every rank gets the signal).
    """
    if os.environ.get("RANK", "0") != "0":
        return 130
    hint = getattr(module, "interrupted_hint", None)
    text = hint(args) if hint is not None else "nothing was written; run the command again"
    print(f"sharpgen {args.command}: interrupted; {text}", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sharpgen`` command line; returns the exit status.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success; 1 when an experiment failed (diverged: it is marked in the report, the
        others still ran, and one line on stderr names it); 2 on a usage error or a missing
        package (one line ``sharpgen <command>: error: ...`` on stderr, no traceback); 130 on
        Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        print("\n" + textwrap.dedent(_command("reproduce").EXAMPLES))
        return 0
    module = _command(args.command)
    try:
        status = _start(args.command, module)
        return status if status is not None else int(module.run(args))
    except KeyboardInterrupt:
        return _interrupted(args, module)
