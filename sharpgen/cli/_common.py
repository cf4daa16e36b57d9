"""What every sub-command shares: the one-line errors and the checks of installed packages.

This module and the sub-command modules import only the standard library at module level,
so that ``sharpgen --help`` and ``--version`` answer without importing PyTorch.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

__all__ = ["fail", "missing_packages", "note"]

# pip's name of a module where the two differ
_PIP_NAMES = {"sklearn": "scikit-learn", "yaml": "pyyaml"}


def fail(command: str, message: str) -> int:
    """Print the one-line usage error of ``sharpgen <command>`` and return exit status 2."""
    print(f"sharpgen {command}: error: {message}", file=sys.stderr)
    return 2


def note(command: str, message: str) -> None:
    """Print a one-line note of ``sharpgen <command>`` on stderr (the command goes on)."""
    print(f"sharpgen {command}: note: {message}", file=sys.stderr)


def missing_packages(modules: Sequence[str]) -> list[str]:
    """The pip names of the ``modules`` that are not installed (found without importing them).

    Examples:
        >>> missing_packages(["sys", "a_module_nobody_installed"])
        ['a_module_nobody_installed']
    """
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken installation counts as missing
            found = False
        if not found:
            missing.append(_PIP_NAMES.get(module, module))
    return missing
