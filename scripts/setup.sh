#!/usr/bin/env bash
# One-shot set-up for a fresh clone: a virtualenv in .venv with torch, flashquant (C++ extension built,
# CUDA extension where torch has CUDA) and the test/bench extras. Safe to re-run: a no-op when up to date.
#
#   FLASHQUANT_TORCH   pip requirement for torch when none is installed (default: torch==2.13.0, the CPU build
#                      that lies on the CI machines' disk; on a GPU machine with a CUDA torch already in the
#                      venv nothing is reinstalled).
#   FLASHQUANT_BUILD_CUDA=0/1  force the CUDA extension off/on (default: auto, see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  # Never let a bare 'torch' requirement pull a multi-GB CUDA build onto a CPU machine.
  python -m pip install -q "${FLASHQUANT_TORCH:-torch==2.13.0}"
fi
# --no-build-isolation: the extension must be compiled against the torch installed above (same ABI);
# an isolated build env would download another torch.
python -m pip install -q setuptools wheel ninja
python -m pip install -q --no-build-isolation -e ".[test,bench]"
python -c "import flashquant, torch; print('flashquant', flashquant.__version__, '| torch', torch.__version__); \
[print(f'  {k:9s} {v}') for k, v in flashquant.backends().items()]"
