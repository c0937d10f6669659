"""The CUDA kernels (flash-decoding, int4/int8 GEMV), executed on the CPU against the reference (no GPU needed).

csrc/cuda/*_kernels.cuh are CUDA C++ that g++ can compile with tests/cuda_host/cuda_on_cpu.h standing in for
the CUDA runtime: a block's threads become std::threads, __syncthreads a barrier, warp shuffles per-warp
exchanges, and the three inline-PTX wrappers of csrc/cuda/ptx.cuh get host versions (mma.sync a warp-collective
exchange placing fragments by the PTX ISA's m16n8k16 tables). This runs the kernels' own indexing, paging,
split-KV and split-K slicing, synchronisation, online softmax, LSE merge, bit-level dequantization and fragment
placement, i.e. everything but the GPU's instruction set and memory system (test_cuda_kernels.py runs the real
thing where a GPU exists). The shared-memory offsets are real too, and the library is built with sanitizers:
 * UndefinedBehaviorSanitizer: a misaligned 16-byte access (a fault on the GPU), an out-of-bounds index into a
   fixed-size array or a signed overflow stops the run with the sanitizer's report ("runtime error: store to
   misaligned address ... for type 'struct uint4'" is what the decode kernel as it was before this harness
   gave: it placed its K/V tile 12 bytes off 16-byte alignment for G = 4);
 * AddressSanitizer (where g++ has libasan; the child process preloads it, so torch's tensor allocations get
   redzones): a read or write past any input or output tensor, what compute-sanitizer's memcheck reports on
   a GPU ("heap-buffer-overflow ... READ of size 4 ... in decode_kernel" is what a decode kernel without the
   capacity clamp gives for a length past the cache).
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import flashquant as fq
from tolerances import ATOL, assert_close, assert_qmm_close, assert_qmm_same_rounding

ROOT = Path(__file__).resolve().parents[1]
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
RUNNER = ROOT / "tests" / "cuda_host" / "run_on_cpu.py"  # imports only torch: a light child process


def _libasan() -> str | None:
    """g++'s AddressSanitizer runtime, to preload into the child (it must come first), or None."""
    path = subprocess.run(
        ["g++", "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@dataclasses.dataclass
class Lib:
    so: Path
    env: dict  # the child's environment: the ASan runtime preloaded where there is one


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Lib:
    if shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_fp16.h").is_file():
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h) to compile the kernels for the CPU")
    so = tmp_path_factory.mktemp("cuda_on_cpu") / "libkernels_on_cpu.so"
    asan = _libasan()
    if asan is None:
        warnings.warn("g++ has no libasan: the CUDA kernels run on the CPU under UBSan only", stacklevel=1)
    cmd = ["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror"]
    cmd += [
        "-Wno-unknown-pragmas",
        "-fsanitize=address,undefined" if asan else "-fsanitize=undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ]
    cmd += [f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests' / 'cuda_host'}", f"-I{CUDA_INCLUDE}"]
    sources = [str(ROOT / "tests" / "cuda_host" / f) for f in ("decode_on_cpu.cpp", "gemv_on_cpu.cpp")]
    cmd += [*sources, "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    env = dict(os.environ)
    if asan:  # Python and torch leak by design at exit: report memory errors, not leaks
        env.update(LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0")
    return Lib(so, env)


def run_in_child(lib: Lib, tmp_path: Path, fn: str, **inputs) -> torch.Tensor:
    """fn (a function of tests/cuda_host/run_on_cpu.py) in a child process: a sanitizer's finding aborts it with
    the report (on stderr, returned in the assertion message) instead of taking the test session down."""
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(lib.so), fn, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=600,
        env=lib.env,
    )
    assert proc.returncode == 0, f"kernel run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return torch.load(tmp_path / "out.pt")


def decode(lib, tmp_path, q, k_cache, v_cache, seqlens, block_table, scale, num_splits):
    return run_in_child(
        lib,
        tmp_path,
        "decode_on_cpu",
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        seqlens=seqlens,
        block_table=block_table,
        scale=scale,
        num_splits=num_splits,
    )


# (dtype, head_dim, Hq, Hkv, block_size (0: contiguous cache), num_splits, seqlens): GQA 4 (Llama-3-8B), 8
# (70B: one full n8 tile of heads), 12 and 16 (two tiles), MQA 6/1, MHA; lengths 0, 1, not multiples of the
# 16-key warp step or the 64-key block step, ending inside the last page; pages of 16 and 32 keys; several
# splits, including splits with no keys at all for the short sequences.
CASES = [
    (torch.float16, 128, 8, 2, 0, 1, [70, 1, 0]),
    (torch.float16, 128, 8, 2, 16, 3, [200, 0, 65]),
    (torch.bfloat16, 64, 6, 1, 16, 2, [129, 17]),
    (torch.bfloat16, 128, 4, 4, 0, 4, [255, 3]),
    (torch.float16, 64, 16, 1, 0, 2, [100]),
    (torch.float16, 256, 4, 2, 16, 2, [90, 40]),
    (torch.bfloat16, 128, 16, 2, 32, 2, [250, 33]),
    (torch.float16, 128, 12, 1, 0, 1, [77]),
]


@pytest.mark.parametrize("dtype,head_dim,hq,hkv,block_size,num_splits,seqlens", CASES)
def test_cuda_decode_kernel_on_cpu_matches_reference(
    lib, tmp_path, dtype, head_dim, hq, hkv, block_size, num_splits, seqlens
):
    torch.manual_seed(len(seqlens) * 100 + head_dim + hq)
    B, cap = len(seqlens), 256
    lens = torch.tensor(seqlens, dtype=torch.int32)
    if block_size:
        nblk = B * cap // block_size + 3
        kc = torch.randn(nblk, block_size, hkv, head_dim, dtype=dtype)
        vc = torch.randn(nblk, block_size, hkv, head_dim, dtype=dtype)
        table = torch.randperm(nblk)[: B * cap // block_size].reshape(B, -1).to(torch.int32).contiguous()
    else:
        kc = torch.randn(B, cap, hkv, head_dim, dtype=dtype)
        vc = torch.randn(B, cap, hkv, head_dim, dtype=dtype)
        table = None
    q = torch.randn(B, hq, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    out = decode(lib, tmp_path, q, kc, vc, lens, table, scale, num_splits)
    ref = fq.attention_with_kvcache(q[:, None], kc, vc, lens, block_table=table, backend="reference")[:, 0]
    assert not torch.isnan(out).any()
    assert_close(out.float(), ref.float(), dtype, f"cuda decode kernel on the CPU ({num_splits} splits)")
    # A sequence with no keys attends to nothing: zeros, as in the reference.
    for b, n in enumerate(seqlens):
        if n == 0:
            assert torch.equal(out[b].float(), torch.zeros_like(out[b].float()))


@pytest.mark.parametrize("block_size", [0, 16])
def test_cuda_decode_kernel_on_cpu_clamps_lengths_past_the_capacity(lib, tmp_path, block_size):
    """ops_cuda.cpp cannot check cache_seqlens against the capacity without a host sync, so the kernel clamps
    it: sequence 0 claims 100 keys past its 112-key cache and must attend to exactly its own cache, not to
    sequence 1's rows (contiguous) or to blocks named by the next block_table row (paged). 112 is not a
    multiple of the 64-key split granularity, so the split's own bound (128) does not hide a missing clamp."""
    torch.manual_seed(7)
    dtype, hq, hkv, d, cap = torch.float16, 8, 2, 64, 112
    if block_size:
        nblk = 2 * cap // block_size
        kc, vc = (torch.randn(nblk, block_size, hkv, d, dtype=dtype) for _ in range(2))
        table = torch.randperm(nblk).reshape(2, -1).to(torch.int32).contiguous()
    else:
        kc, vc = (torch.randn(2, cap, hkv, d, dtype=dtype) for _ in range(2))
        table = None
    q = torch.randn(2, hq, d, dtype=dtype)
    out = decode(
        lib, tmp_path, q, kc, vc, torch.tensor([cap + 100, 50], dtype=torch.int32), table, d**-0.5, 1
    )
    clamped = torch.tensor([cap, 50], dtype=torch.int32)
    ref = fq.attention_with_kvcache(q[:, None], kc, vc, clamped, block_table=table, backend="reference")[:, 0]
    assert_close(out.float(), ref.float(), dtype, "cuda decode kernel, lengths past the capacity")


@pytest.mark.parametrize("batch,hkv,num_splits", [(1, 8, 128), (8192, 8, 2), (65536, 8, 3), (1 << 20, 1, 1)])
def test_cuda_decode_grid_fits_cuda_launch_limits(lib, tmp_path, batch, hkv, num_splits):
    """One block per (sequence, KV head, split), on a grid a GPU takes: grid.y and grid.z are capped at 65535,
    which B * Hkv passes at batch 8192 with 8 KV heads (too many blocks to run on the CPU, so this checks the
    launch configuration that decode_attention.cu and the harness share, by the CUDA limits the harness enforces
    on every launch)."""
    x, y, z, fits = run_in_child(
        lib, tmp_path, "decode_grid_on_cpu", B=batch, Hkv=hkv, num_splits=num_splits
    ).tolist()
    assert x * y * z == batch * hkv * num_splits
    assert fits == 1, f"grid ({x}, {y}, {z}) exceeds CUDA's launch limits"


def test_on_cpu_harness_detects_a_wrong_result(lib, tmp_path):
    """The comparison is not vacuous: scaling the softmax differently must break it."""
    q = torch.randn(1, 8, 128, dtype=torch.float16)
    kc, vc = (
        torch.randn(1, 128, 2, 128, dtype=torch.float16),
        torch.randn(1, 128, 2, 128, dtype=torch.float16),
    )
    lens = torch.tensor([100], dtype=torch.int32)
    out = decode(lib, tmp_path, q, kc, vc, lens, None, 2 * 128**-0.5, 2)
    ref = fq.attention_with_kvcache(q[:, None], kc, vc, lens, backend="reference")[:, 0]
    assert (out.float() - ref.float()).abs().max() > 10 * ATOL[torch.float16]


# (bits, dtype, group_size, symmetric, M, N, K, split_k): N not a multiple of 16 (clamped rows) and N < 16; K not
# a multiple of the 128-code int4 step (a guarded last step); split-K with a short last slice; group sizes that
# are and are not powers of two, and per channel; M = 1..8 (one n8 tile of activation rows) and 9..16 (two).
# The last rows run more steps than the kernel's ring of prefetched steps (kStepsAhead + 1 = 4) per slice, with
# a partial last step, and N = 100 leaves a dead warp (rows 112..127) in a block whose slices are summed by the
# kernel (split-K barriers with warps that have no rows). Odd M also has a bias, added where the output is
# written, with split K (by the block that sums the slices) and without.
GEMV_CASES = [
    (4, torch.float16, 32, True, 1, 20, 160, 1),
    (4, torch.float16, 64, False, 5, 17, 192, 2),
    (4, torch.bfloat16, 128, True, 11, 18, 384, 2),
    (4, torch.bfloat16, -1, False, 3, 16, 96, 1),
    (4, torch.float16, 96, False, 7, 5, 288, 2),
    (8, torch.float16, 32, False, 2, 19, 96, 2),
    (8, torch.float16, -1, True, 9, 16, 64, 1),
    (8, torch.bfloat16, 64, True, 4, 21, 128, 3),
    (8, torch.bfloat16, 32, False, 16, 16, 160, 2),
    (4, torch.float16, 96, True, 1, 40, 1056, 1),
    (4, torch.bfloat16, 160, False, 9, 100, 1440, 3),
    (8, torch.float16, 64, True, 3, 100, 1088, 2),
]


@pytest.mark.parametrize("bits,dtype,group_size,symmetric,M,N,K,split_k", GEMV_CASES)
def test_cuda_gemv_kernel_on_cpu_matches_reference(
    lib, tmp_path, bits, dtype, group_size, symmetric, M, N, K, split_k
):
    torch.manual_seed(bits * 1000 + M * 10 + split_k)
    qw = fq.quantize(torch.randn(N, K, dtype=dtype), bits, group_size, symmetric)
    x = torch.randn(M, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype) * 4 if M % 2 else None
    out = run_in_child(
        lib,
        tmp_path,
        "gemv_on_cpu",
        x=x,
        qdata=qw.qdata,
        scales=qw.scales,
        zeros=qw.zeros,
        bits=bits,
        group_size=qw.effective_group_size,
        split_k=split_k,
        bias=bias,
    )
    # Exact products of dtype-rounded dequantized weights, fp32 sums (the bias among them), one rounding: only the
    # summation order differs.
    same_rounding = x.float() @ qw.dequantize().to(dtype).float().t()
    if bias is not None:
        same_rounding += bias.float()
    assert_qmm_same_rounding(out, same_rounding.to(dtype), "cuda gemv on the CPU vs the same-rounding model")
    ref = fq.quant_matmul(x, qw, bias, backend="reference")
    assert_qmm_close(out, ref, f"cuda gemv on the CPU vs reference, bias={bias is not None}")


@pytest.mark.parametrize(
    "group_size", [32, 64, 96, 128, 160, 224, 256, 4096, 4128, 14336, 1 << 20, (1 << 31) - 1]
)
def test_cuda_gemv_group_index_division_is_exact(lib, tmp_path, group_size):
    """The GEMV kernel's k // group_size by multiply-high (no division instruction, no branch on powers of two)
    against Python's //, at k near every multiple of the group size up to 2^20, and near 2^31."""
    multiples = torch.arange(0, (1 << 20) // group_size + 2, dtype=torch.int64) * group_size
    k = torch.cat([multiples - 1, multiples, multiples + 1, torch.arange((1 << 31) - 4096, 1 << 31)])
    k = k[(k >= 0) & (k < (1 << 31))]
    got = run_in_child(lib, tmp_path, "group_of_on_cpu", k=k, group_size=group_size)
    assert torch.equal(got.long(), k // group_size)
