"""The ``sharpgen`` command line: ``sharpgen reproduce`` and ``sharpgen measure``."""

from sharpgen.cli._main import build_parser, main

__all__ = ["main", "build_parser"]
