"""Reuse the sharpness tests' fixtures (dense truth factories ``h``, ``state_check``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_sharpness_conftest", Path(__file__).parents[1] / "sharpness" / "conftest.py"
)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

h = _mod.h
state_check = _mod.state_check
