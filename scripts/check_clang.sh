#!/usr/bin/env bash
# Portability check: build the C++ CPU extension with clang (as on macOS or a clang-built Linux) and run the CPU
# kernel tests (GEMV, attention and append, layer ops) against that build. The product build uses the system
# compiler (gcc here); clang differs in what it accepts (target pragmas, __builtin_cpu_supports feature names),
# which once broke the build for clang users
# unnoticed. Installs clang + libomp from Debian's packages when they are missing and apt-get can run.
set -euo pipefail
cd "$(dirname "$0")/.."

have_clang() {
  command -v clang++ >/dev/null 2>&1 &&
    echo '#include <omp.h>' | clang++ -fopenmp -x c++ -fsyntax-only - >/dev/null 2>&1
}
if ! have_clang && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "check_clang: installing clang and libomp-dev (Debian packages)"
  apt-get install -y -q clang libomp-dev >/dev/null || true
fi
if ! have_clang; then
  echo "check_clang: SKIPPED: no clang++ with OpenMP headers here and none could be installed"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r src/flashquant "$work/"
rm -f "$work"/flashquant/*.so
CC=clang CXX=clang++ FLASHQUANT_BUILD_CUDA=0 .venv/bin/python setup.py -q build_ext \
  --build-lib "$work/build" --build-temp "$work/tmp" >"$work/build.log" 2>&1 || {
  cat "$work/build.log"
  echo "check_clang: FAILED to build the extension with clang"
  exit 1
}
cp "$work"/build/flashquant/_C*.so "$work/flashquant/"
PYTHONPATH="$work" .venv/bin/python - <<EOF
import flashquant, torch
assert flashquant.__file__.startswith("$work"), flashquant.__file__
print("check_clang: clang-built extension loaded, SIMD:", torch.ops.flashquant.cpu_simd_level())
EOF
PYTHONPATH="$work" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_cpu_attention.py \
  tests/test_layer_ops.py
echo "check_clang: OK"
