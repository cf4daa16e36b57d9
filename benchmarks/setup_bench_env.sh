#!/usr/bin/env bash
# Builds the benchmark environment (default .venv-bench; VENV=/path picks another): sharpgen
# (editable) plus the anchor libraries it is measured against, the `bench` extra of
# pyproject.toml -- pyhessian, hessian-eigenthings, curvlinops-for-pytorch (with
# backpack-for-pytorch) and pytorch-optimizer -- on the test environment's torch (TORCH
# overrides it, default torch==2.13.0). Every benchmark runs all libraries in ONE process on
# the SAME torch, so the ratios it reports compare like with like. CI does not build it.
#
# Why not `pip install -e ".[bench]"`: backpack-for-pytorch asks for torchvision (only its
# MNIST example uses it), pip resolves that to the newest torchvision, which requires the
# newest torch, and torch 2.13.0 was replaced by 2.14.1 with its CUDA libraries (about 6 GB).
# The torchvision made for torch 2.13.0 on PyPI is a CUDA build that fails to import next to
# the CPU torch. So the anchors are installed without their dependencies, then those
# dependencies without torchvision, and every pip call runs under a constraints file that pins
# torch to the version installed first (pip stops with an error rather than move it). The
# script ends by checking the torch version and importing every anchor.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-bench}"
TORCH="${TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
fi
py="$VENV/bin/python"
"$py" -m pip install --quiet "$TORCH" numpy
pinned="$("$py" -c 'import torch; print(torch.__version__)')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$pinned" > "$constraints"
pip_c() { "$py" -m pip install --quiet -c "$constraints" "$@"; }
# the anchors: the `bench` extra, plus backpack-for-pytorch (curvlinops' backend)
mapfile -t anchors < <("$py" -c '
import tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]
print("\n".join([*extra, "backpack-for-pytorch"]))')
pip_c --no-deps "${anchors[@]}"
# their own dependencies, but torchvision (and one another)
mapfile -t deps < <("$py" - "${anchors[@]}" <<'PY'
import re
import sys
from importlib.metadata import requires

anchors = {re.sub(r"[-_.]+", "-", a).lower() for a in sys.argv[1:]}
deps = set()
for anchor in sys.argv[1:]:
    for req in requires(anchor) or []:
        if re.search(r"extra\s*==", req):  # optional extras of the anchor: not needed
            continue
        name = re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]).lower()
        if name not in anchors and name != "torchvision":
            deps.add(req.strip())  # with its version and environment markers
print("\n".join(sorted(deps)))
PY
)
pip_c "${deps[@]}" matplotlib tqdm  # pip then notes that backpack lacks torchvision: expected
pip_c -e .
"$py" - "$pinned" <<'PY'
import importlib
import importlib.util
import sys

import torch

if torch.__version__ != sys.argv[1]:
    sys.exit(f"setup_bench_env.sh: torch moved from {sys.argv[1]} to {torch.__version__}")
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("setup_bench_env.sh: torchvision got installed (it breaks next to the CPU torch)")
anchors = ("pyhessian", "hessian_eigenthings", "curvlinops", "backpack", "pytorch_optimizer")
for module in (*anchors, "sharpgen"):
    importlib.import_module(module)
print(f"bench env ready in {sys.prefix}: torch {torch.__version__}, anchors import")
PY
