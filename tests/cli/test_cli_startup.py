"""Start-up of the command line: lazy imports (--help, --version) and what it needs installed.

The subprocesses get a `sitecustomize` that blocks chosen modules (as if not installed) and
reports, at exit, which heavy modules the process imported.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "scipy", "matplotlib", "tqdm", "pandas", "sharpgen.experiments")

SITECUSTOMIZE = """
import atexit, importlib.abc, json, os, sys

_BLOCKED = set(filter(None, os.environ.get("BLOCK_MODULES", "").split(",")))

class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())

@atexit.register
def _report():
    heavy = json.loads(os.environ["HEAVY_MODULES"])
    with open(os.environ["IMPORTED_REPORT"], "w") as f:
        json.dump(sorted(m for m in heavy if m in sys.modules), f)
"""


def _run(tmp_path, args, block=(), cwd=None):
    """``python -m sharpgen ARGS`` with ``block`` not importable; (process, heavy imports)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    report = tmp_path / "imported.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]),
        "BLOCK_MODULES": ",".join(block),
        "HEAVY_MODULES": json.dumps(HEAVY),
        "IMPORTED_REPORT": str(report),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sharpgen", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or tmp_path,
        timeout=300,
    )
    return proc, json.loads(report.read_text())


@pytest.mark.parametrize(
    "args",
    [["--version"], ["--help"], [], ["reproduce", "--help"], ["measure", "--help"]],
    ids=lambda a: " ".join(a) or "no arguments",
)
def test_help_and_version_import_nothing_heavy(tmp_path, args):
    proc, imported = _run(tmp_path, args)
    assert proc.returncode == 0, proc.stderr
    assert imported == [], f"sharpgen {' '.join(args)} imported {imported}"
    assert "sharpgen" in proc.stdout


def test_import_sharpgen_is_lazy_and_every_public_name_resolves(tmp_path):
    code = (
        "import sys, sharpgen; assert 'torch' not in sys.modules, 'import sharpgen: torch'\n"
        "from sharpgen import *\n"
        "import sharpgen as s; assert s.linalg.lanczos is s.lanczos and s.integrations\n"
        "assert set(s.__all__) <= set(dir(s))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_the_lazy_names_are_the_ones_type_checkers_see():
    """Every ``from sharpgen.X import name`` of the TYPE_CHECKING block is ``sharpgen.name``."""
    import sharpgen

    tree = ast.parse((ROOT / "sharpgen" / "__init__.py").read_text())
    static = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.count(".") == 1:
            if node.module.startswith("sharpgen.") and not node.module.startswith("sharpgen._"):
                static.update({a.name: node.module for a in node.names})
    assert set(static) == set(sharpgen.__all__) - {"__version__"}
    for name, module in static.items():
        assert getattr(sharpgen, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = sharpgen.not_a_name


def test_reproduce_without_matplotlib_and_tqdm_writes_results_and_report(tmp_path):
    """`pip install sharpgen` has neither: a one-line note first, no figures, the rest as usual."""
    out = tmp_path / "out"
    args = ["reproduce", "--preset", "tiny-no-bias-sam1", "tiny-bias-sgd", "--seeds", "1"]
    proc, imported = _run(tmp_path, [*args, "--out", str(out)], block=("matplotlib", "tqdm"))
    assert proc.returncode == 0, proc.stderr
    assert "matplotlib" not in imported and "tqdm" not in imported
    err = proc.stderr.splitlines()
    assert err[0] == (
        "sharpgen reproduce: note: matplotlib is not installed, so no figures are drawn "
        "(results.json and report.md are written as usual); for them: pip install matplotlib"
    )
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "report.md", "results.json"]
    report = (out / "report.md").read_text()
    assert "| 2-layer, no bias |" in report and "table1.png" not in report
    assert f"wrote {out / 'results.json'}, {out / 'report.md'}" in proc.stdout


@pytest.mark.parametrize("missing", ["scipy", "numpy", "torch"])
def test_a_missing_required_package_is_one_line_before_any_import(tmp_path, missing):
    out = tmp_path / "out"
    proc, imported = _run(tmp_path, ["reproduce", "--out", str(out)], block=(missing,))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"sharpgen reproduce: error: needs {missing}, which is not installed; install with: "
        f"pip install {missing}\n"
    )
    assert imported == [] and not out.exists()  # refused before any work
    proc, imported = _run(tmp_path, ["measure"], block=(missing,))
    assert proc.returncode == 2 and f"needs {missing}" in proc.stderr, proc.stderr
    assert imported == []
