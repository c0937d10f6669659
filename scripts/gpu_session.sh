#!/usr/bin/env bash
# Everything a lent GPU session should do, in as few device calls as possible (see .library/device/METHOD.md):
#   bash scripts/gpu_session.sh build tests static # call 1: build with CUDA, GPU tests, memcheck, and the
#                                                  #   compile-check with the device's Triton (~1 min)
#   bash scripts/gpu_session.sh tune               # call 2: measure launch configs (python -m flashquant tune,
#                                                  #   Triton only: needs no build); commit the returned
#                                                  #   $OUT/<device>.json into src/flashquant/kernels/tuned/
#   bash scripts/gpu_session.sh build bench demo   # call 3: benchmarks (llama3-8b preset) + the 8B demo
# A call may land on a fresh machine (each is given back 30 s after a call), so every call that needs the CUDA
# extension starts with `build`. Writes at most 8 files into $OUT (default ./out): build.log, tests.txt,
# memcheck.txt, compile-check.txt/.json, bench.txt, <preset>.json (llama3-8b, quick, crossover), demo.txt/demo.json;
# tune.txt and <device>.json for `tune`.
# Uses the machine's torch/triton; installs nothing from the network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # stages that need no build import from the tree
stages=${*:-build tests bench demo}

for stage in $stages; do
  case $stage in
  build)
    { nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"
      FLASHQUANT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 \
        $PY -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -30
      $PY -m flashquant; } 2>&1 | tee "$OUT/build.log"
    ;;
  tests)  # the test files with GPU variants (fp16/bf16, long sequences, CUDA kernels, graph capture, the model's
    # graphed decode); not -x: one call should report every failure, listed at the end (-rfE)
    $PY -m pytest -q --maxfail=25 -rfE tests/test_cuda_kernels.py tests/test_triton_attention.py \
      tests/test_triton_quant.py tests/test_dispatch.py tests/test_llama.py -p no:cacheprovider 2>&1 \
      | tail -80 | tee "$OUT/tests.txt"
    if command -v compute-sanitizer >/dev/null; then
      compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -x tests/test_cuda_kernels.py \
        -k "bits-4 or flash_decoding" -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/memcheck.txt"
    fi
    ;;
  static)  # the compile-check with the device's own Triton (~1 min): do its cubins keep the properties claimed?
    $PY -m flashquant compile-check --arch 90 --json "$OUT/compile-check.json" 2>&1 | tail -30 > "$OUT/compile-check.txt"
    ;;
  tune)  # every key within ~9 minutes; the table also lands in the package dir for later stages of this call
    $PY -m flashquant tune --out src/flashquant/kernels/tuned --max-minutes 8.5 2>&1 | tee "$OUT/tune.txt"
    cp src/flashquant/kernels/tuned/*.json "$OUT/" 2>/dev/null
    ;;
  bench)
    # No plots here: the device returns at most 8 files per call, and the JSONs are the record.
    $PY -m flashquant.bench --llama3-8b --out "$OUT" --no-plots 2>&1 | tail -400 > "$OUT/bench.txt"
    $PY -m flashquant.bench --quick --graph --ops quant_matmul decode --out "$OUT" --no-plots 2>&1 \
      | tail -100 >> "$OUT/bench.txt"
    # The two auto rules that rest on static estimates: CUDA vs Triton GEMV over M, CUDA vs Triton decode at G = 4/8.
    $PY -m flashquant.bench --preset crossover --out "$OUT" --no-plots 2>&1 | tail -150 >> "$OUT/bench.txt"
    ;;
  demo)
    $PY -m flashquant demo --json "$OUT/demo.json" 2>&1 | grep -v "decode:" | tail -30 | tee "$OUT/demo.txt"
    ;;
  *) echo "unknown stage $stage (build, tests, tune, bench, demo)"; exit 2 ;;
  esac
done
