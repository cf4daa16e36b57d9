"""The lower layers never import a higher one (docs/guide/design.md).

linalg <- curvature <- sharpness <- optim / experiments / landscape / integrations <- cli, with
the collectives (`sharpgen._distributed`), the argument rules (`sharpgen._validation`) and
the precision rules (`sharpgen._precision`) below all of them. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sharpgen"
ABOVE_SHARPNESS = ["optim", "experiments", "landscape", "integrations", "cli", "study"]
FORBIDDEN = {
    "_validation": ["_distributed", "linalg", "curvature", "sharpness", *ABOVE_SHARPNESS],
    "_precision": ["_distributed", "linalg", "curvature", "sharpness", *ABOVE_SHARPNESS],
    "_distributed": ["linalg", "curvature", "sharpness", *ABOVE_SHARPNESS],
    "linalg": ["curvature", "sharpness", *ABOVE_SHARPNESS],
    "curvature": ["sharpness", *ABOVE_SHARPNESS],
    "sharpness": ABOVE_SHARPNESS,
    "experiments": ["study"],
    "landscape": ["study"],
}


def _files(layer: str) -> list[Path]:
    single = PACKAGE / f"{layer}.py"
    return [single] if single.exists() else sorted((PACKAGE / layer).rglob("*.py"))


def _imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "sharpgen" and len(parts) > 1:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_of_a_higher_layer(layer):
    bad = []
    for path in _files(layer):
        for imported in sorted(_imported_layers(path) & set(FORBIDDEN[layer])):
            bad.append(f"{path.relative_to(PACKAGE.parent)} imports sharpgen.{imported}")
    assert not bad, "back-edges in the layering:\n" + "\n".join(bad)
