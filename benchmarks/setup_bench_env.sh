#!/usr/bin/env bash
# Builds .venv-bench: sharpgen plus the anchor libraries it is measured against
# (pyhessian, hessian-eigenthings, curvlinops-for-pytorch, pytorch-optimizer).
# It gets the test environment's torch (TORCH overrides it; the anchors ask for >= 2.3 at
# most); every benchmark runs all libraries in ONE process on the SAME torch,
# so the ratios it reports compare like with like. CI does not build this environment.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-bench/bin/python ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install --quiet --upgrade pip
fi
.venv-bench/bin/pip install --quiet "${TORCH:-torch==2.13.0}" numpy scipy matplotlib tqdm
.venv-bench/bin/pip install --quiet -e ".[bench]"
.venv-bench/bin/python -c "import torch; print('bench env ready, torch', torch.__version__)"
