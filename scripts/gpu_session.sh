#!/usr/bin/env bash
# Everything a lent GPU session should do, in as few device calls as possible (see .library/device/METHOD.md):
#   bash scripts/gpu_session.sh build tests        # call 1: build with CUDA, GPU tests, memcheck
#   bash scripts/gpu_session.sh bench demo         # call 2: benchmarks (llama3-8b preset) + the 8B demo
# Writes at most 8 files into $OUT (default ./out): build.log, tests.txt, memcheck.txt, bench.txt,
# <preset>.json, plots, demo.txt/demo.json. Uses the machine's torch/triton; installs nothing from the network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
stages=${*:-build tests bench demo}

for stage in $stages; do
  case $stage in
  build)
    { nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"
      FLASHQUANT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 \
        $PY -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -30
      $PY -m flashquant; } 2>&1 | tee "$OUT/build.log"
    ;;
  tests)  # the GPU variants of the test suite (fp16/bf16, long sequences, CUDA kernels, graph capture)
    $PY -m pytest -q -x tests/test_cuda_kernels.py tests/test_triton_attention.py tests/test_triton_quant.py \
      tests/test_quant.py tests/test_attention_api.py -p no:cacheprovider 2>&1 | tail -60 | tee "$OUT/tests.txt"
    if command -v compute-sanitizer >/dev/null; then
      compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -x tests/test_cuda_kernels.py \
        -k "bits-4 or flash_decoding" -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/memcheck.txt"
    fi
    ;;
  bench)
    $PY -m flashquant.bench --llama3-8b --out "$OUT" 2>&1 | tail -400 > "$OUT/bench.txt"
    $PY -m flashquant.bench --quick --graph --ops quant_matmul decode --out "$OUT" --no-plots 2>&1 \
      | tail -100 >> "$OUT/bench.txt"
    ;;
  demo)
    $PY -m flashquant demo --json "$OUT/demo.json" 2>&1 | grep -v "decode:" | tail -30 | tee "$OUT/demo.txt"
    ;;
  *) echo "unknown stage $stage (build, tests, bench, demo)"; exit 2 ;;
  esac
done
