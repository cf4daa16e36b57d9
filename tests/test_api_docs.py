"""The public API is documented, and every snippet in the README and the docs runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import sharpgen

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "docs" / "api"


def _documented_names() -> set[str]:
    names = set()
    for page in API_DIR.glob("*.md"):
        for match in re.finditer(r"^:::\s+([\w.]+)", page.read_text(), flags=re.M):
            names.add(match.group(1).rsplit(".", 1)[-1])
    return names


def test_every_exported_name_is_in_the_api_reference():
    documented = _documented_names()
    missing = sorted(n for n in sharpgen.__all__ if n != "__version__" and n not in documented)
    assert not missing, f"names in sharpgen.__all__ missing from docs/api/*.md: {missing}"


def test_all_is_unique_and_resolvable():
    assert len(sharpgen.__all__) == len(set(sharpgen.__all__))
    for name in sharpgen.__all__:
        assert hasattr(sharpgen, name), name


def _python_blocks(path: Path) -> list[str]:
    text = path.read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


SNIPPET_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SNIPPET_PAGES = [p for p in SNIPPET_PAGES if _python_blocks(p)]


@pytest.mark.parametrize("page", SNIPPET_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(page: Path, tmp_path, monkeypatch):
    """Blocks of one page run in order in one namespace, in a temporary directory."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippet__"}
    for i, block in enumerate(_python_blocks(page)):
        try:
            exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{page.name} block {i} failed:\n{block}") from exc
