"""ctypes front ends of the CPU-compiled CUDA kernels (tests/cuda_host/*_on_cpu.cpp), mirroring the torch glue
in csrc/cuda/ops_cuda.cpp. Run as a script by tests/test_cuda_on_cpu.py in a child process:
run_on_cpu.py LIBRARY FUNCTION INPUTS.pt OUTPUT.pt (imports only torch, to start fast)."""

import ctypes
import math
import sys

import torch


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
        ctypes.c_int(capacity),
        ctypes.c_float(scale),
    )
    assert rc == 0, f"fq_decode_on_cpu returned {rc}"
    return out


def decode_grid_on_cpu(lib: ctypes.CDLL, B, Hkv, num_splits):
    """decode_attention.cu's grid for these sizes and whether a GPU would take it: tensor [x, y, z, fits]."""
    grid = (ctypes.c_uint * 3)()
    fits = lib.fq_decode_grid_on_cpu(ctypes.c_int(B), ctypes.c_int(Hkv), ctypes.c_int(num_splits), grid)
    return torch.tensor([*grid, fits], dtype=torch.int64)


def gemv_on_cpu(lib: ctypes.CDLL, x, qdata, scales, zeros, bits, group_size, split_k, bias=None):
    """quant_matmul_cuda (csrc/cuda/ops_cuda.cpp) for a given split_k, launching on the CPU."""
    M, K = x.shape
    N = qdata.shape[0]
    out = torch.empty(M, N, dtype=x.dtype)
    # The split-K workspace, filled with garbage: the kernel must write every partial it sums.
    partials = torch.full((split_k, M, N), float("nan")) if split_k > 1 else None
    tile_counters = torch.full((math.ceil(N / 64),), 12345, dtype=torch.int32) if split_k > 1 else None
    scales = scales.to(x.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    rc = lib.fq_gemv_on_cpu(
        ctypes.c_int(x.dtype == torch.bfloat16),
        ctypes.c_int(bits),
        _ptr(x),
        _ptr(qdata),
        _ptr(scales),
        _ptr(zeros),
        _ptr(bias),
        _ptr(out),
        _ptr(partials),
        _ptr(tile_counters),
        *(ctypes.c_int(v) for v in (M, N, K, K // group_size, group_size, split_k)),
    )
    assert rc == 0, f"fq_gemv_on_cpu returned {rc}"
    return out


def group_of_on_cpu(lib: ctypes.CDLL, k, group_size):
    """The GEMV kernel's multiply-high k // group_size for an int32 tensor of k."""
    k = k.to(torch.int32).contiguous()
    out = torch.empty_like(k)
    lib.fq_group_of_on_cpu(_ptr(k), ctypes.c_int(k.numel()), ctypes.c_int(group_size), _ptr(out))
    return out


if __name__ == "__main__":
    args = torch.load(sys.argv[3])
    torch.save(globals()[sys.argv[2]](ctypes.CDLL(sys.argv[1]), **args), sys.argv[4])
