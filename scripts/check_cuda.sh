#!/usr/bin/env bash
# Compile-check the CUDA kernels with plain nvcc (no torch needed) for sm_80 and sm_90a.
# Fails on any error or warning (-Werror all-warnings), and prints the register/spill report.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
for src in csrc/cuda/*.cu; do
  echo "nvcc: $src"
  nvcc -std=c++17 -O3 -Icsrc -c "$src" -o "$out/$(basename "$src").o" \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
    -Werror all-warnings -Xcompiler -Wall,-Wextra -Xptxas -warn-spills,-warn-lmem-usage --resource-usage \
    2>&1 | grep -E "error|warning|spill|lmem|Used [0-9]+ registers" | sed 's/^/  /' | head -40 || true
  test -s "$out/$(basename "$src").o" || { echo "nvcc failed on $src"; exit 1; }
done
# The torch glue (ops_cuda.cpp) needs torch's headers: syntax-check it against the installed (CPU) torch.
# This toolkit lacks the cuSPARSE/cuBLAS/cuSOLVER headers that ATen/cuda includes; typedef-only stubs stand in.
PY=${PYTHON:-.venv/bin/python}
if [ -x "$PY" ] && ti=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))" 2>/dev/null); then
  pyinc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  echo "g++ -fsyntax-only: csrc/cuda/ops_cuda.cpp"
  isys=$(for d in $ti; do printf -- '-isystem %s ' "$d"; done)
  # shellcheck disable=SC2086
  g++ -std=c++20 -fsyntax-only -Wall -Wextra -Werror -Icsrc -Iscripts/cuda_stub_headers $isys \
    -I"${CUDA_HOME:-/usr/local/cuda}/include" -I"$pyinc" csrc/cuda/ops_cuda.cpp
else
  echo "no torch in $PY: skipping the syntax check of csrc/cuda/ops_cuda.cpp"
fi
if [ -x "$PY" ]; then  # main-loop cost of each CUDA GEMV instantiation, read off the sm_90a SASS
  "$PY" -m flashquant compile-check --cuda
fi
echo "cuda compile check: ok"
