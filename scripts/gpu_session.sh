#!/usr/bin/env bash
# Everything a lent GPU session should do, in three device calls made back to back (a machine stays warm only
# ~30 s after a call; warm, the CUDA build and Triton's cache carry over, see .library/device/METHOD.md):
#   bash scripts/gpu_session.sh build tests memcheck   # 1: build with CUDA, the GPU tests, compute-sanitizer
#   bash scripts/gpu_session.sh build profile bench    # 2: Nsight Compute on the kernels to speed up; benchmarks
#   bash scripts/gpu_session.sh build demo tune        # 3: the 8B demo at batch 1 and 16; tuned launch configs
#                                                      #    (commit the returned <device>.json into
#                                                      #    src/flashquant/kernels/tuned/)
# A device call is killed at 600 s with everything in its pipelines, so every stage runs under `timeout -s INT`
# within what is left of BUDGET_S (default 540 s) for the whole call, and writes its log to $OUT as it goes
# (pytest and the bench print their summaries on SIGINT; the bench and tune stop by their own --max-minutes
# first). At most 8 files per call come back: build.log tests.txt memcheck.txt | build.log ncu.txt bench.txt
# llama3-8b.json quick-graph-quant_matmul-decode.json crossover-graph.json | build.log demo.txt demo.json
# demo-b16.json tune.txt <device>.json. `static` (the compile-check with the device's Triton) is a stage too.
# The device's copy of the tree may carry a stale .git (it did in the first H100 session): build.log and every
# result JSON record source_digest (flashquant.bench.harness), which names the code exactly.
# What the first H100 session measured, and what it left for the next: bench/NOTES.md.
# Uses the machine's torch/triton; installs nothing from the network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # stages that need no build import from the tree
BUDGET_S=${BUDGET_S:-540}
stages=${*:-build tests memcheck}

# limit CAP: seconds a stage may take, CAP or what is left of the call's budget (0: too little left to start).
limit() {
  local left=$((BUDGET_S - SECONDS - 25))  # 25 s: timeout's grace before SIGKILL, and the transfers
  local n=$((left < $1 ? left : $1))
  echo $((n < 30 ? 0 : n))
}
# timed NAME LIMIT CMD...: CMD under SIGINT at LIMIT seconds (SIGKILL 20 s later).
timed() {
  local name=$1 lim=$2
  shift 2
  if [ "$lim" -eq 0 ]; then
    echo "== $name: not started, only $((BUDGET_S - SECONDS)) s of the call's budget left"
    return 0
  fi
  echo "== $name (at most ${lim} s, ${SECONDS} s into the call)"
  timeout -s INT -k 20 "$lim" "$@"
}
minutes() { python3 -c "print(max(0.1, ($1 - $2) / 60))"; }  # a stage's own budget: its limit less a margin

for stage in $stages; do
  case $stage in
  build)  # skipped when this machine already built these sources (a warm machine from the previous call)
    stamp=$(cat setup.py pyproject.toml csrc/*/*.* | sha256sum | cut -c1-16)
    if [ "$(cat build/cuda-stamp 2>/dev/null)" = "$stamp" ] && $PY -c \
      "import sys, flashquant as fq; sys.exit(not fq.backends()['cuda'].available)" 2>/dev/null; then
      echo "== build: this machine built these sources already"
      continue
    fi
    { nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"
      FLASHQUANT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 \
        timed build "$(limit 240)" $PY -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -30
      $PY -m flashquant
      $PY -c "from flashquant.bench.harness import source_digest; print('source_digest', source_digest())"
    } 2>&1 | tee "$OUT/build.log"
    $PY -c "import sys, flashquant as fq; sys.exit(not fq.backends()['cuda'].available)" &&
      mkdir -p build && echo "$stamp" > build/cuda-stamp
    ;;
  tests)  # the test files with GPU variants (fp16/bf16, long sequences, CUDA kernels, graph capture, the
    # model's graphed decode); not -x: one call reports every failure, listed at the end (-rfE). Most of the
    # time is Triton's JIT (~200 specializations), so 8 pytest-xdist workers (the image has it) share the GPU:
    # the five files of then took 59 s on the H100. --maxfail 200: one wrong tolerance failed 35 tests there.
    workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
    timed tests "$(limit 260)" $PY -m pytest -q $workers --maxfail=200 -rfE tests/test_cuda_kernels.py \
      tests/test_triton_attention.py tests/test_triton_quant.py tests/test_layer_ops.py tests/test_dispatch.py \
      tests/test_llama.py tests/test_bench.py tests/test_gradients.py tests/test_quant.py tests/test_checkpoints.py \
      -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"
    ;;
  memcheck)  # the CUDA kernels' riskiest paths (tail steps, clamped rows, paging, misaligned views, the in-kernel
    # split-K sum, G = 4/8/1/12)
    if command -v compute-sanitizer >/dev/null; then
      timed memcheck "$(limit 150)" compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q \
        tests/test_cuda_kernels.py -k "tail_steps or block_sizes or split_k or (flash_decoding and dtype0 and 128)" \
        -p no:cacheprovider 2>&1 | tee "$OUT/memcheck.txt"
    else
      echo "== memcheck: compute-sanitizer not found" | tee "$OUT/memcheck.txt"
    fi
    ;;
  profile)  # Nsight Compute, one launch of each kernel to speed up (scripts/profile_kernels.py names them)
    if command -v ncu >/dev/null; then
      timed profile "$(limit 120)" ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
        $PY scripts/profile_kernels.py > "$OUT/ncu.txt" 2>&1
      grep -E "profiled:|^  [a-zA-Z_].*\(|Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy" \
        "$OUT/ncu.txt" | head -100
    else
      echo "== profile: ncu not found" | tee "$OUT/ncu.txt"
    fi
    ;;
  static)  # the compile-check with the device's own Triton: do its cubins keep the properties claimed?
    timed static "$(limit 90)" $PY -m flashquant compile-check --arch 90 --json "$OUT/compile-check.json" 2>&1 |
      tee "$OUT/compile-check.txt" | tail -30
    ;;
  bench)  # no plots here (the files that come back are limited; the JSONs are the record)
    lim=$(limit 200)
    timed bench-llama3-8b "$lim" $PY -m flashquant.bench --llama3-8b --out "$OUT" --no-plots \
      --max-minutes "$(minutes "$lim" 40)" 2>&1 | tee "$OUT/bench.txt"
    lim=$(limit 60)
    timed bench-quick-graph "$lim" $PY -m flashquant.bench --quick --graph --ops quant_matmul decode --out "$OUT" \
      --no-plots --max-minutes "$(minutes "$lim" 20)" 2>&1 | tee -a "$OUT/bench.txt"
    # The auto rules: CUDA vs Triton GEMV over M, the Triton launcher's fused vs dequantize+cuBLAS switch, CUDA vs
    # Triton decode at G = 4/8. Graph replays: eager timings were host-bound below ~0.3 ms on the H100 machine.
    lim=$(limit 90)
    timed bench-crossover "$lim" $PY -m flashquant.bench --preset crossover --graph --out "$OUT" --no-plots \
      --max-minutes "$(minutes "$lim" 20)" 2>&1 | tee -a "$OUT/bench.txt"
    ;;
  demo)  # batch 1 (every variant, 2k prompt), then batch 16 (the bf16-activation variants, not fp32)
    timed demo "$(limit 170)" $PY -m flashquant demo --json "$OUT/demo.json" 2>&1 | grep -v "decode:" |
      tee "$OUT/demo.txt"
    timed demo-b16 "$(limit 110)" $PY -m flashquant demo --batch 16 --prompt-len 512 --variants bf16 \
      --json "$OUT/demo-b16.json" 2>&1 | grep -v "decode:" | tee -a "$OUT/demo.txt"
    ;;
  tune)  # every key it reaches in time; the table also lands in the package dir for later stages of this call
    lim=$(limit 330)
    timed tune "$lim" $PY -m flashquant tune --out src/flashquant/kernels/tuned --max-minutes "$(minutes "$lim" 45)" \
      2>&1 | tee "$OUT/tune.txt"
    cp src/flashquant/kernels/tuned/*.json "$OUT/" 2>/dev/null
    ;;
  *) echo "unknown stage $stage (build, tests, memcheck, profile, static, bench, demo, tune)"; exit 2 ;;
  esac
done
