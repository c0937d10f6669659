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
echo "cuda compile check: ok"
