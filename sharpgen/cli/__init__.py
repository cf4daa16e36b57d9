"""The ``sharpgen`` command line: ``sharpgen reproduce`` and ``sharpgen measure``.

Each sub-command is a module of this package registered in `sharpgen.cli._main.COMMANDS`.
"""

from sharpgen.cli._main import build_parser, main

__all__ = ["main", "build_parser"]
