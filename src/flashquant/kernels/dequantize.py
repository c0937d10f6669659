"""Triton dequantize: packed int4/int8 codes (N, K) -> (code - zero) * scale in fp16/bf16/fp32, in one pass.

Used for prefill-sized M, where a quantized linear is compute-bound: dequantizing the weight once and handing it
to cuBLAS beats dequantizing inside a GEMM tile loop (the fused kernel re-dequantizes every weight tile once
per M tile and cannot match cuBLAS's Hopper GEMM). One pass reads the packed codes and the scales and writes
the weight: int4 0.5 + 2 bytes per weight, against ~6 passes for the same computation in PyTorch ops.

Bit-for-bit what ``reference.quant.dequantize_ref(...).to(dtype)`` computes: (code - zero) is an exact integer,
multiplied by the fp32 scale and rounded once to the output dtype.
Packed format: flashquant.quant.QuantizedWeight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(
    Qw,
    Scales,
    Zeros,
    Out,
    N,
    K,
    group_size,
    stride_qn,
    stride_sn,
    stride_on,
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # output columns per program (codes), a multiple of 2
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    rows = offs_n[:, None].to(tl.int64)
    if BITS == 4:
        # Byte j holds k = 2j (low nibble) and 2j + 1 (high nibble): load BLOCK_K / 2 bytes, then interleave.
        offs_b = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(
            Qw + rows * stride_qn + offs_b[None, :],
            mask=n_valid[:, None] & (offs_b[None, :] < K // 2),
            other=0,
        )
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
    else:
        offs_b = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        codes = tl.load(
            Qw + rows * stride_qn + offs_b[None, :], mask=n_valid[:, None] & (offs_b[None, :] < K), other=0
        )
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = n_valid[:, None] & (offs_k[None, :] < K)
    # The group of each column: a tile may span several groups (group_size 32 < BLOCK_K) or part of one.
    sc_ptrs = rows * stride_sn + (offs_k // group_size)[None, :]
    scale = tl.load(Scales + sc_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(Zeros + sc_ptrs, mask=mask, other=0).to(tl.int32)
    else:
        zero = 1 << (BITS - 1)
    w = (codes.to(tl.int32) - zero).to(tl.float32) * scale
    tl.store(Out + rows * stride_on + offs_k[None, :], w.to(Out.dtype.element_ty), mask=mask)


# ---- launch config: 32 x 256 codes per program (int4: 128-byte rows in, 512-byte rows out in fp16/bf16), a
# bandwidth-bound elementwise pass; 4 warps keep each thread's loads 16 bytes wide.
BLOCK_N, BLOCK_K, NUM_WARPS = 32, 256, 4


def dequantize_triton(
    qdata: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed codes (N, K * bits / 8) uint8 + scales (N, G) [+ zeros (N, G) uint8] -> weight (N, K) in `dtype`.

    group_size: the effective group size (K for per-channel). `dtype`: fp16, bf16 or fp32 (bf16 only on a GPU:
    the Triton interpreter cannot round to bf16)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if dtype == torch.bfloat16 and qdata.device.type == "cpu":
        raise TypeError("bf16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); use fp16/fp32")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    N = qdata.shape[0]
    K = qdata.shape[1] * (8 // bits)
    if scales.shape != (N, K // group_size):
        raise ValueError(
            f"scales must have shape (N, K // group_size) = ({N}, {K // group_size}), got {tuple(scales.shape)}"
        )
    qdata, scales = qdata.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    out = torch.empty(N, K, dtype=dtype, device=qdata.device)
    if N == 0 or K == 0:
        return out
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))
    _dequant_kernel[grid](
        qdata,
        scales,
        zeros if zeros is not None else scales,
        out,
        N,
        K,
        group_size,
        qdata.stride(0),
        scales.stride(0),
        out.stride(0),
        BITS=bits,
        HAS_ZEROS=zeros is not None,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
    )
    return out
