"""write_report: files, ranking order, CSV contents, and the no-matplotlib path."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from sharpgen.study import StudyTable, analyze, write_report


def _analysis():
    rows = []
    for i in range(8):
        rows.append({"name": f"m{i}", "width": i % 4, "seed": i // 4, "gap": 0.1 * i,
                     "good": float(i), "bad": float(-i), "half": float(i % 2)})  # fmt: skip
    table = StudyTable(tuple(rows), ("width", "seed"), ("half", "bad", "good"),
                       failures=(("m0", "half", "ValueError: x"),))  # fmt: skip
    return analyze(table, generator=torch.Generator().manual_seed(0), n_boot=20)


def test_report_files_ranking_and_csv(tmp_path):
    res = _analysis()
    path = write_report(res, tmp_path / "out")
    text = path.read_text()
    assert [p.name for p in sorted((tmp_path / "out").iterdir())] == [
        "analysis.csv", "ranking.png", "report.md", "scatter.png", "table.csv",
    ]  # fmt: skip
    # |tau| = 1 for good and bad, ranked before half
    assert text.index("`good`") < text.index("`half`") and text.index("`bad`") < text.index(
        "`half`"
    )
    assert "## Failed measures (1" in text and "ranking.png" in text
    with (tmp_path / "out" / "analysis.csv").open() as f:
        rows = {r["measure"]: r for r in csv.DictReader(f)}
    assert float(rows["good"]["tau"]) == 1.0 and float(rows["bad"]["tau"]) == -1.0
    back = StudyTable.read_csv(tmp_path / "out" / "table.csv", axes=("width", "seed"))
    assert back.column("good").tolist() == res.table.column("good").tolist()


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    text = write_report(_analysis(), tmp_path).read_text()
    assert "matplotlib is not installed" in text
    assert not (tmp_path / "ranking.png").exists() and (tmp_path / "table.csv").exists()


def test_report_bad_input(tmp_path):
    with pytest.raises(TypeError, match="StudyAnalysis"):
        write_report("x", tmp_path)
    with pytest.raises(ValueError, match="by must be one of"):
        write_report(_analysis(), tmp_path, by="r2")
