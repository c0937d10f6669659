"""Triton int4/int8 weight-only dequant-matmul: out (M, N) = x (M, K) @ dequant(W)^T.

One kernel, two regimes chosen by the launch config:
* small M (decode, M <= 16): one BLOCK_M=16 row tile covers all of x, the grid runs over N tiles and split_k
  slices of K, so a batch-1 GEMV still fills the GPU; every packed weight byte is read exactly once. Split-K
  partials go to an fp32 workspace; the last program of each output tile to finish (an atomic counter per tile)
  sums them in slice order and writes the output: deterministic, no float atomics, no second kernel.
* mid-sized M: classic tiled GEMM, weight tiles dequantized on the fly into tensor-core operands.
From M = DEQUANT_GEMM_MIN_M[bits] (prefill) the launcher instead dequantizes the weight once (kernels/dequantize.py)
and calls F.linear (cuBLAS on a GPU): bit for bit the torch path's dequantized weight, made in one pass.

The dot runs on (code - zero), an integer in [-255, 255] and exact in fp16/bf16, so acc_group =
x @ (code - zero)^T is computed on the tensor cores and multiplied by the group scale in fp32 once per output
element and group (BLOCK_K never straddles a group). Codes become floats without int->float conversions where
the format allows (`_codes_to_float`), and int4 tiles are never re-interleaved: x is split into its even and odd
columns instead. `python -m flashquant compile-check` shows what this compiles to (bench/NOTES.md).
Packed format: flashquant.quant.QuantizedWeight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import configs, min_group_size, num_sms
from .dequantize import dequantize_triton


@triton.jit
def _codes_to_float(codes, zero, MAX_CODE: tl.constexpr, DTYPE: tl.constexpr):
    """(codes - zero[:, None]) in DTYPE, exactly (|code - zero| <= 255). Where the mantissa allows, without an
    int->float conversion (a quarter-rate instruction on the GPU, enough to bound a decode GEMV): the code is ORed
    into the mantissa of a power of two whose ulp is 1, then that power of two plus the zero is subtracted."""
    if DTYPE == tl.float32:
        magic = (codes.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + code
        return magic - (zero + 8388608).to(tl.float32)[:, None]
    elif DTYPE == tl.float16:
        magic = (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)  # 1024 + code (code <= 1023)
        return magic - (zero + 1024).to(tl.float16)[:, None]
    elif MAX_CODE < 128:  # bf16 keeps 8 significant bits: 128 + code is exact for code <= 127
        magic = (codes.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
        return magic - (zero + 128).to(tl.bfloat16)[:, None]
    else:
        return (codes.to(tl.int32) - zero[:, None]).to(DTYPE)


@triton.jit
def _qmm_kernel(
    X,
    Qw,
    Scales,
    Zeros,
    Bias,  # (N,) when HAS_BIAS: added to the fp32 sums where the output is written
    Out,
    Partials,  # fp32 (split_k, M, N) when SPLIT_K
    TileCounters,  # int32 (tiles_m * tiles_n,), zeroed, when SPLIT_K
    M,
    N,
    K,
    k_bytes,  # K // (8 // BITS), passed so its divisibility by 16 is known and weight copies are 16-byte
    num_groups,
    group_size,
    tiles_per_split,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    stride_ps,
    BITS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < M
    n_valid = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    PACK: tl.constexpr = 8 // BITS  # codes per byte
    tile0 = pid_k * tiles_per_split
    # Stop at the last K tile: a split's tail past K would index a group (scale) that does not exist.
    tile_end = tl.minimum(tile0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for t in range(tile0, tile_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
            mask=m_valid[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        offs_b = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        w_bytes = tl.load(
            Qw + offs_n[:, None].to(tl.int64) * stride_qn + offs_b[None, :],
            mask=n_valid[:, None] & (offs_b[None, :] < k_bytes),
            other=0,
        )
        g = k0 // group_size
        if HAS_ZEROS:
            zero = tl.load(Zeros + offs_n.to(tl.int64) * stride_sn + g, mask=n_valid, other=0).to(tl.int32)
        else:
            zero = tl.full([BLOCK_N], 1 << (BITS - 1), tl.int32)
        if BITS == 4:
            # Byte j holds k = 2j (low nibble) and 2j + 1 (high nibble). Splitting the small x tile into its even
            # and odd columns keeps the big weight tile in the layout it was loaded in (no nibble interleave).
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            w_lo = _codes_to_float(w_bytes & 0xF, zero, 15, x.dtype)
            w_hi = _codes_to_float(w_bytes >> 4, zero, 15, x.dtype)
            if IEEE_DOT:
                part = tl.dot(x_even, tl.trans(w_lo), input_precision="ieee")
                part = tl.dot(x_odd, tl.trans(w_hi), part, input_precision="ieee")
            else:
                part = tl.dot(x_odd, tl.trans(w_hi), tl.dot(x_even, tl.trans(w_lo)))
        else:
            w = _codes_to_float(w_bytes, zero, 255, x.dtype)
            if IEEE_DOT:
                part = tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(w))
        scale = tl.load(Scales + offs_n.to(tl.int64) * stride_sn + g, mask=n_valid, other=0.0).to(tl.float32)
        acc += part * scale[None, :]
    tile_offs = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = m_valid[:, None] & n_valid[None, :]
    if SPLIT_K:
        tl.store(Partials + pid_k.to(tl.int64) * stride_ps + tile_offs, acc, mask=out_mask)
        # All of this program's partial is written before the counter's release; the program that takes the
        # count to split_k acquires every slice's partial, and reads them from L2 (.cg), in slice order.
        tl.debug_barrier()
        num_splits = tl.num_programs(2)
        done = tl.atomic_add(TileCounters + pid_m * tl.num_programs(1) + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_BIAS:  # only the program that writes the output reads the bias
                total += tl.load(Bias + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
            for s in range(0, num_splits):
                total += tl.load(
                    Partials + s * stride_ps + tile_offs, mask=out_mask, other=0.0, cache_modifier=".cg"
                )
            tl.store(Out + tile_offs, total.to(Out.dtype.element_ty), mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
        tl.store(Out + tile_offs, acc.to(Out.dtype.element_ty), mask=out_mask)


# ---- launch configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per bits and M bucket, from configs.py
# (built-in defaults or this device's tuned table).
#
# From this M on (per bit width), the weight is dequantized once (kernels/dequantize.py) and multiplied by cuBLAS
# instead: at prefill sizes the matmul is compute-bound and this kernel re-dequantizes each weight tile for every M
# tile. Measured on an H100 (graph replays, bf16, 4096 x 4096; bench/NOTES.md): int8 switches at M = 128 (0.036 vs
# 0.052 ms; at 64 the fused kernel wins, 0.028 vs 0.034); int4 at M = 512 (0.072 vs 0.082 ms; at 256 the fused
# kernel wins, 0.059 vs 0.068). At M = 2048 the switch is 2.3x (int4) / 2.5x (int8) faster than the fused kernel.
DEQUANT_GEMM_MIN_M = {4: 512, 8: 128}
# The dequantized weight is made in row chunks of at most this many elements (128 MB in fp16/bf16), so a large
# lm_head (128256 x 4096) does not need a 1 GB temporary.
DEQUANT_CHUNK_ELEMENTS = 1 << 26


def _dequant_then_matmul(x, qdata, scales, zeros, bits, group_size, bias):
    N, K = qdata.shape[0], x.shape[1]
    bias = None if bias is None else bias.to(x.dtype)  # as F.linear takes it; cuBLAS adds it in its epilogue
    rows = max(1, DEQUANT_CHUNK_ELEMENTS // max(K, 1))
    if rows >= N:
        return F.linear(x, dequantize_triton(qdata, scales, zeros, bits, group_size, x.dtype), bias)
    out = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        z = zeros[n0:n1] if zeros is not None else None
        out[:, n0:n1] = F.linear(
            x,
            dequantize_triton(qdata[n0:n1], scales[n0:n1], z, bits, group_size, x.dtype),
            None if bias is None else bias[n0:n1],
        )
    return out


def quant_matmul_triton(
    x,
    qdata,
    scales,
    zeros,
    bits,
    group_size,
    bias=None,
    split_k: int | None = None,
    config: tuple | None = None,
    strategy: str | None = None,
):
    """x (M, K) fp16/bf16/fp32 -> (M, N) in x.dtype; bias (N,) or None, added to the fp32 sums before their one
    rounding (the dequant strategy: in x.dtype, as F.linear takes it). `split_k` / `config` override the
    heuristics (tests, benchmarks). `strategy`: "fused" (this file's kernel), "dequant" (dequantize, then cuBLAS /
    F.linear) or None: "dequant" from M = DEQUANT_GEMM_MIN_M[bits] on."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        raise TypeError("bf16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); use fp16/fp32")
    if strategy not in (None, "fused", "dequant"):
        raise ValueError(f"strategy must be None, 'fused' or 'dequant', got {strategy!r}")
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernel reads it with unit stride
    M, K = x.shape
    N = qdata.shape[0]
    block_m, block_n, block_k, warps, stages = config or configs.lookup(
        x.device, f"quant_matmul.int{bits}.{configs.m_bucket(M)}"
    )
    # BLOCK_K must not straddle a quantization group (one scale per tile): a power of two dividing group_size,
    # and at least 16 per tl.dot (int4 splits its tile into even and odd halves: 32).
    min_block_k = min_group_size(bits)
    block_k = max(block_k, min_block_k)
    while group_size % block_k and block_k > min_block_k:
        block_k //= 2
    if group_size % block_k and group_size != K:
        raise ValueError(
            f"the Triton int{bits} kernel needs group_size divisible by {min_block_k} (or -1), got {group_size}"
        )
    if strategy == "dequant" or (strategy is None and M >= DEQUANT_GEMM_MIN_M[bits]):
        return _dequant_then_matmul(x, qdata, scales, zeros, bits, group_size, bias)
    k_tiles = triton.cdiv(K, block_k)
    grid_mn = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if split_k is None:  # fill ~2 waves of SMs for decode-sized M
        split_k = (
            1 if M > 64 else max(1, min(triton.cdiv(2 * num_sms(x.device, 4), grid_mn), k_tiles // 4, 16))
        )
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, tiles_per_split)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.zero_()
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    if split_k > 1:
        partials = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        tile_counters = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=x.device)
    else:
        partials = tile_counters = out  # unused
    _qmm_kernel[grid](
        x,
        qdata,
        scales,
        zeros if zeros is not None else scales,
        bias if bias is not None else scales,
        out,
        partials,
        tile_counters,
        M,
        N,
        K,
        qdata.shape[1],
        scales.shape[1],
        group_size,
        tiles_per_split,
        x.stride(0),
        qdata.stride(0),
        scales.stride(0),
        out.stride(0),
        partials.stride(0) if split_k > 1 else 0,
        BITS=bits,
        SPLIT_K=split_k > 1,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        IEEE_DOT=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out
