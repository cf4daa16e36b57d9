"""The table of docs/guide/models.md, made from the zoo's case list (and, with ``--measure``,
the time each case's measures take).

Usage (from the repository root)::

    PYTHONPATH=. python tests/zoo/zoo_table.py            # print the table
    PYTHONPATH=. python tests/zoo/zoo_table.py --measure --write   # time, update the page

``--measure`` runs, per case and in one process, what the zoo tests run (exact trace,
top-2 eigenvalues, exact block traces, SAM sharpness, a 5-point landscape; for the cases
that raise: the three raising calls, the GGN trace where it runs, SAM and landscape) and
reports the CPU seconds of the process (both threads), so a loaded machine inflates them
less than wall time. ``tests/zoo/test_zoo_docs.py`` checks that the page's table lists
exactly the suite's cases with their outcome.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE.parents[1] / "docs" / "guide" / "models.md"
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
HEADER = (
    "| family | model | what it covers | Hessian measures | GGN | SAM, landscape | CPU s |",
    "|---|---|---|---|---|---|---|",
)


def load_cases():
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("_zoo_models").CASES


def outcome(case) -> tuple[str, str, str]:
    """(Hessian measures, GGN, first-order measures) of a case, as the page states them."""
    if case.raises is None:
        return "exact", "exact", "runs"
    op = case.raises.replace("_?", "_")
    hessian = f"`ValueError` naming `{op}`"
    return hessian, ("exact" if case.ggn else hessian), "runs"


def static_rows(cases) -> list[tuple[str, ...]]:
    """The table's columns that follow from the case list alone."""
    return [(c.family, f"`{c.name}`", c.covers, *outcome(c)) for c in cases]


def render(cases, times: dict[str, float] | None = None) -> str:
    lines = list(HEADER)
    for case, row in zip(cases, static_rows(cases), strict=True):
        seconds = "" if times is None or case.name not in times else f"{times[case.name]:.1f}"
        lines.append("| " + " | ".join((*row, seconds)) + " |")
    return "\n".join(lines)


def page_rows(text: str) -> list[tuple[str, ...]]:
    """The rows of the table between the markers of a page (all columns but the last)."""
    table = text.split(START, 1)[1].split(END, 1)[0]
    rows = [line for line in table.strip().splitlines() if line.startswith("|")][2:]
    return [tuple(c.strip() for c in row.strip("|").split(" | "))[:-1] for row in rows]


def measure(case) -> float:
    import torch

    import sharpgen

    model, loss_fn, data = case.build()
    names = list(case.params)
    kw = {"params": names}
    gen = torch.Generator().manual_seed(0)
    start = time.process_time()
    calls = [
        lambda: sharpgen.hessian_trace(model, loss_fn, data, method="exact", **kw),
        lambda: sharpgen.top_eigenvalues(model, loss_fn, data, k=2, generator=gen, **kw),
        lambda: sharpgen.block_traces(model, loss_fn, data, method="exact", **kw),
    ]
    if case.ggn:
        calls.append(lambda: sharpgen.ggn_trace(model, loss_fn, data, method="exact", **kw))
    for call in calls:
        try:
            call()
        except ValueError:
            if case.raises is None:
                raise
    sharpgen.sam_sharpness(model, loss_fn, data, rho=0.05, **kw)
    sharpgen.loss_landscape_1d(model, loss_fn, data, num_points=5, generator=gen, **kw)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="time every case")
    parser.add_argument("--write", action="store_true", help="update docs/guide/models.md")
    args = parser.parse_args()
    cases = load_cases()
    times = None
    if args.measure:
        import torch

        torch.set_num_threads(2)
        times = {}
        for case in cases:
            times[case.name] = measure(case)
            print(f"{case.name}: {times[case.name]:.1f} s", file=sys.stderr, flush=True)
    table = render(cases, times)
    if args.write:
        text = PAGE.read_text()
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), flags=re.S)
        PAGE.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text))
    else:
        print(table)


if __name__ == "__main__":
    main()
