"""The CUDA flash-decoding kernels, executed on the CPU against the reference (no GPU needed).

csrc/cuda/decode_attention_kernels.cuh is plain CUDA C++ without inline PTX, so g++ can compile it with
tests/cuda_host/cuda_on_cpu.h standing in for the CUDA runtime: a block's 128 threads become std::threads,
__syncthreads a barrier, __shfl_xor_sync a per-warp exchange. This runs the kernels' own indexing, paging,
split-KV slicing, synchronisation, online softmax and LSE merge, i.e. everything but the GPU's instruction
set and memory system (test_cuda_kernels.py runs the real thing where a GPU exists). The shared-memory
offsets are real too, and the library is built with UndefinedBehaviorSanitizer: a misaligned 16-byte access
(a fault on the GPU), an out-of-bounds index into a fixed-size array or a signed overflow stops the test run
with the sanitizer's report ("runtime error: store to misaligned address ... for type 'struct uint4'" is what
the kernel as it was before this harness gave: it placed its K/V tile 12 bytes off 16-byte alignment for G = 4).
"""

import ctypes
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashquant as fq
from tolerances import ATOL, assert_close

ROOT = Path(__file__).resolve().parents[1]
CUDA_INCLUDE = Path("/usr/local/cuda/include")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_fp16.h").is_file():
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h) to compile the kernels for the CPU")
    so = tmp_path_factory.mktemp("cuda_on_cpu") / "libdecode_on_cpu.so"
    cmd = ["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror"]
    cmd += [
        "-Wno-unknown-pragmas",
        "-fsanitize=undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ]
    cmd += [f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests' / 'cuda_host'}", f"-I{CUDA_INCLUDE}"]
    cmd += [str(ROOT / "tests" / "cuda_host" / "decode_on_cpu.cpp"), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return so


def run_in_child(so: Path, tmp_path: Path, **inputs) -> torch.Tensor:
    """decode_on_cpu in a child process: undefined behaviour aborts it with the sanitizer's report (on stderr,
    returned in the assertion message) instead of taking the test session down."""
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run(
        [sys.executable, __file__, str(so), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"kernel run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return torch.load(tmp_path / "out.pt")


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def decode_on_cpu(lib: ctypes.CDLL, q, k_cache, v_cache, seqlens, block_table, scale, num_splits):
    """decode_attention_cuda (csrc/cuda/ops_cuda.cpp) with its split arithmetic, launching on the CPU."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    block_size = k_cache.shape[1] if block_table is not None else 0
    capacity = block_table.shape[1] * block_size if block_table is not None else k_cache.shape[1]
    split_len = max(64, math.ceil(math.ceil(capacity / num_splits) / 64) * 64)
    num_splits = max(1, math.ceil(capacity / split_len))
    out = torch.empty_like(q)
    out_part = torch.empty(num_splits, B, Hq, D) if num_splits > 1 else None
    lse_part = torch.empty(num_splits, B, Hq) if num_splits > 1 else None
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (k_cache, v_cache)]
    rc = lib.fq_decode_on_cpu(
        ctypes.c_int(q.dtype == torch.bfloat16),
        _ptr(q),
        _ptr(k_cache),
        _ptr(v_cache),
        _ptr(seqlens),
        _ptr(block_table),
        _ptr(out),
        _ptr(out_part),
        _ptr(lse_part),
        strides[0],
        strides[1],
        *(
            ctypes.c_int(v)
            for v in (B, Hq, Hkv, D, block_size, block_table.shape[1] if block_table is not None else 0)
        ),
        ctypes.c_int(split_len),
        ctypes.c_int(num_splits),
        ctypes.c_float(scale),
    )
    assert rc == 0, f"fq_decode_on_cpu returned {rc}"
    return out


# (dtype, head_dim, Hq, Hkv, paged, num_splits, seqlens): GQA 4 (Llama 3), 6/1 (MQA), MHA, the largest group
# (16); lengths 0, 1, not multiples of the 64-key tile, ending inside the last page; several splits, including
# splits with no keys at all for the short sequences.
CASES = [
    (torch.float16, 128, 8, 2, False, 1, [70, 1, 0]),
    (torch.float16, 128, 8, 2, True, 3, [200, 0, 65]),
    (torch.bfloat16, 64, 6, 1, True, 2, [129, 17]),
    (torch.bfloat16, 128, 4, 4, False, 4, [255, 3]),
    (torch.float16, 64, 16, 1, False, 2, [100]),
    (torch.float16, 256, 4, 2, True, 2, [90, 40]),
]


@pytest.mark.parametrize("dtype,head_dim,hq,hkv,paged,num_splits,seqlens", CASES)
def test_cuda_decode_kernel_on_cpu_matches_reference(
    lib, tmp_path, dtype, head_dim, hq, hkv, paged, num_splits, seqlens
):
    torch.manual_seed(len(seqlens) * 100 + head_dim + hq)
    B, cap = len(seqlens), 256
    lens = torch.tensor(seqlens, dtype=torch.int32)
    if paged:
        bs = 16
        nblk = B * cap // bs + 3
        kc = torch.randn(nblk, bs, hkv, head_dim, dtype=dtype)
        vc = torch.randn(nblk, bs, hkv, head_dim, dtype=dtype)
        table = torch.randperm(nblk)[: B * cap // bs].reshape(B, -1).to(torch.int32).contiguous()
    else:
        kc = torch.randn(B, cap, hkv, head_dim, dtype=dtype)
        vc = torch.randn(B, cap, hkv, head_dim, dtype=dtype)
        table = None
    q = torch.randn(B, hq, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    out = run_in_child(
        lib,
        tmp_path,
        q=q,
        k_cache=kc,
        v_cache=vc,
        seqlens=lens,
        block_table=table,
        scale=scale,
        num_splits=num_splits,
    )
    ref = fq.attention_with_kvcache(q[:, None], kc, vc, lens, block_table=table, backend="reference")[:, 0]
    assert not torch.isnan(out).any()
    assert_close(out.float(), ref.float(), dtype, f"cuda decode kernel on the CPU ({num_splits} splits)")
    # A sequence with no keys attends to nothing: zeros, as in the reference.
    for b, n in enumerate(seqlens):
        if n == 0:
            assert torch.equal(out[b].float(), torch.zeros_like(out[b].float()))


def test_on_cpu_harness_detects_a_wrong_result(lib, tmp_path):
    """The comparison is not vacuous: scaling the softmax differently must break it."""
    q = torch.randn(1, 8, 128, dtype=torch.float16)
    kc, vc = (
        torch.randn(1, 128, 2, 128, dtype=torch.float16),
        torch.randn(1, 128, 2, 128, dtype=torch.float16),
    )
    lens = torch.tensor([100], dtype=torch.int32)
    out = run_in_child(
        lib,
        tmp_path,
        q=q,
        k_cache=kc,
        v_cache=vc,
        seqlens=lens,
        block_table=None,
        scale=2 * 128**-0.5,
        num_splits=2,
    )
    ref = fq.attention_with_kvcache(q[:, None], kc, vc, lens, backend="reference")[:, 0]
    assert (out.float() - ref.float()).abs().max() > 10 * ATOL[torch.float16]


if __name__ == "__main__":  # the child of run_in_child: library, inputs, output
    args = torch.load(sys.argv[2])
    torch.save(decode_on_cpu(ctypes.CDLL(sys.argv[1]), **args), sys.argv[3])
