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
    Out,  # int32 pairs of 16-bit outputs (fp16/bf16: PAIRS), else the fp32 output
    N,
    K,
    group_size,
    stride_qn,
    stride_sn,
    stride_on,  # in Out's elements
    BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,  # the tile lies inside one group of each row
    PAIRS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # output columns per program (codes), a multiple of 2
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    rows = offs_n[:, None].to(tl.int64)
    # Columns handled per element position: int4 works on bytes (two codes each, columns 2j and 2j + 1, which
    # share a group since group sizes are even), int8 on codes.
    CODES_PER_ITEM: tl.constexpr = 2 if BITS == 4 else 1
    offs_i = pid_k * (BLOCK_K // CODES_PER_ITEM) + tl.arange(0, BLOCK_K // CODES_PER_ITEM)
    mask = n_valid[:, None] & (offs_i[None, :] < K // CODES_PER_ITEM)
    items = tl.load(Qw + rows * stride_qn + offs_i[None, :], mask=mask, other=0)
    if SCALE_PER_ROW:  # one scale (and zero point) per row: a (BLOCK_N, 1) column broadcast over the tile
        sc_ptrs = rows * stride_sn + (pid_k * BLOCK_K) // group_size
        sc_mask = n_valid[:, None]
    else:  # group_size < BLOCK_K: the group of each column
        sc_ptrs = rows * stride_sn + ((offs_i * CODES_PER_ITEM) // group_size)[None, :]
        sc_mask = mask
    scale = tl.load(Scales + sc_ptrs, mask=sc_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(Zeros + sc_ptrs, mask=sc_mask, other=0).to(tl.int32)
    else:
        zero = 1 << (BITS - 1)
    if BITS == 4:
        w_lo = ((items & 0xF).to(tl.int32) - zero).to(tl.float32) * scale  # column 2j
        w_hi = ((items >> 4).to(tl.int32) - zero).to(tl.float32) * scale  # column 2j + 1
        if PAIRS:  # columns 2j and 2j + 1 are the low and high halves of 32-bit word j: no interleave shuffle
            lo = w_lo.to(OUT_DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            hi = w_hi.to(OUT_DTYPE).to(tl.int16, bitcast=True).to(tl.int32)
            tl.store(Out + rows * stride_on + offs_i[None, :], lo | (hi << 16), mask=mask)
        else:  # fp32: two stride-2 stores (L2 merges them into full sectors)
            out_ptrs = Out + rows * stride_on + 2 * offs_i[None, :]
            tl.store(out_ptrs, w_lo, mask=mask)
            tl.store(out_ptrs + 1, w_hi, mask=mask)
    else:
        w = (items.to(tl.int32) - zero).to(tl.float32) * scale
        tl.store(Out + rows * stride_on + offs_i[None, :], w.to(Out.dtype.element_ty), mask=mask)


# ---- launch config: 8192 codes per program (int4: 4 KB in, 16 KB out in fp16/bf16), a bandwidth-bound pass; the
# tile spans one group per row where the group size allows (64 x 128 for g128: one scale per row, broadcast),
# else 32 x 256 with a scale per column group. 4 warps keep each thread's loads and stores 16 bytes wide.
CODES_PER_PROGRAM, MAX_BLOCK_K, MIN_BLOCK_K, NUM_WARPS = 8192, 256, 64, 4


def _tile(group_size: int, K: int) -> tuple[int, int, bool]:
    """(BLOCK_N, BLOCK_K, SCALE_PER_ROW) for a group size (K for per-channel)."""
    if group_size == K or group_size % MAX_BLOCK_K == 0:
        block_k, per_row = MAX_BLOCK_K, True
    elif group_size >= MIN_BLOCK_K and group_size & (group_size - 1) == 0:  # 64, 128: one group per tile
        block_k, per_row = group_size, True
    else:
        block_k, per_row = MAX_BLOCK_K, False
    return CODES_PER_PROGRAM // block_k, block_k, per_row


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
    block_n, block_k, per_row = _tile(group_size, K)
    pairs = bits == 4 and dtype != torch.float32
    target = out.view(torch.int32) if pairs else out  # int4 into fp16/bf16: one 32-bit word per byte of codes
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequant_kernel[grid](
        qdata,
        scales,
        zeros if zeros is not None else scales,
        target,
        N,
        K,
        group_size,
        qdata.stride(0),
        scales.stride(0),
        target.stride(0),
        BITS=bits,
        HAS_ZEROS=zeros is not None,
        SCALE_PER_ROW=per_row,
        PAIRS=pairs,
        OUT_DTYPE=_TL_DTYPES[dtype],
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )
    return out


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
