"""The supported-models page lists exactly the zoo's cases, with the outcome the suite
checks (its table is made by ``zoo_table.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _table_module():
    spec = importlib.util.spec_from_file_location("sharpgen_tests_zoo_table", HERE / "zoo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pages_table_is_the_suites_case_list(zh):
    table = _table_module()
    assert table.load_cases() is zh.cases
    assert table.page_rows(table.PAGE.read_text()) == table.static_rows(zh.cases)


def test_the_page_is_in_the_navigation():
    assert "guide/models.md" in (ROOT / "mkdocs.yml").read_text()
