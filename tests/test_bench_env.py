"""`benchmarks/setup_bench_env.sh` keeps the test torch: no pip call of it may move torch.

Building the environment takes minutes and needs the registry, so CI checks the script's
text: the anchors (the `bench` extra) are never installed with their dependencies resolved
freely (backpack-for-pytorch's `torchvision` pulled the newest torch), and every pip call after
the first, which installs torch, runs under the constraints file that pins it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "setup_bench_env.sh"


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_no_pip_call_can_move_torch():
    text = SCRIPT.read_text()
    code = [line.split("#", 1)[0] for line in text.splitlines()]
    installs = [
        line.strip() for line in code if re.search(r"\bpip(_c)?\b.*\binstall\b|^\s*pip_c ", line)
    ]
    assert installs, "no pip call found"
    assert "[bench]" not in "\n".join(code)  # the extra resolves torchvision -> newest torch
    first, *rest = [line for line in installs if "--upgrade pip" not in line]
    assert '"$TORCH"' in first  # torch first, at the asked version
    helper = next(line for line in code if line.strip().startswith("pip_c()"))
    assert '-c "$constraints"' in helper
    for line in rest:
        if line != helper.strip():
            assert line.startswith("pip_c "), f"a pip call without the torch constraint: {line}"
    assert 'echo "torch==$pinned" > "$constraints"' in text
    assert '--no-deps "${anchors[@]}"' in text and 'name != "torchvision"' in text
