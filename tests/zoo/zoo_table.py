"""The table of docs/guide/models.md, made from the zoo's case list.

Usage (from the repository root)::

    PYTHONPATH=. python tests/zoo/zoo_table.py           # print the table
    PYTHONPATH=. python tests/zoo/zoo_table.py --write   # update the page

``tests/zoo/test_zoo_docs.py`` checks that the page's table lists exactly the suite's cases
with the outcomes the suite asserts.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE.parents[1] / "docs" / "guide" / "models.md"
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
HEADER = (
    "| family | model | what it covers | trace, top eigenvalues, block traces | SAM, landscape |",
    "|---|---|---|---|---|",
)


def load_cases():
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("_zoo_models").CASES


def outcome(case) -> tuple[str, str]:
    """(Hessian measures, first-order measures) of a case, as the page states them."""
    if case.raises is None:
        return "exact", "runs"
    op = case.raises.replace("_?", "_")
    if case.ggn:  # the model lacks the second derivative, the loss in the outputs has it
        return f"`ValueError` naming `{op}`; `ggn_trace` exact (reverse-mode GGN)", "runs"
    return f"`ValueError` naming `{op}` (`ggn_trace` too)", "runs"


def static_rows(cases) -> list[tuple[str, ...]]:
    """The table's columns that follow from the case list alone."""
    return [(c.family, f"`{c.name}`", c.covers, *outcome(c)) for c in cases]


def render(cases) -> str:
    lines = [*HEADER, *("| " + " | ".join(row) + " |" for row in static_rows(cases))]
    return "\n".join(lines)


def page_rows(text: str) -> list[tuple[str, ...]]:
    """The rows of the table between the markers of a page."""
    table = text.split(START, 1)[1].split(END, 1)[0]
    rows = [line for line in table.strip().splitlines() if line.startswith("|")][2:]
    return [tuple(c.strip() for c in row.strip().strip("|").split(" | ")) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/guide/models.md")
    args = parser.parse_args()
    table = render(load_cases())
    if args.write:
        text = PAGE.read_text()
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), flags=re.S)
        PAGE.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text))
    else:
        print(table)


if __name__ == "__main__":
    main()
