"""CPU replay of the CUDA GEMV's lane -> tensor-core fragment mapping (csrc/cuda/quant_gemv.cu).

The CUDA kernel cannot run on a machine without a GPU. This replays its data movement lane by lane: the same
16-byte chunks per lane, the same bit tricks (magic-number dequantization, the same __byte_perm selectors and
constants), the same assignment of registers to mma.m16n8k16 operands, the same split-K slicing, guard and
clamping, and the same fragment -> output mapping for the stores. The MMA itself is modelled from the PTX ISA's
fragment tables for m16n8k16 (.f16/.bf16 A and B, .f32 C/D). A wrong selector, pairing, lane offset or store
index gives O(1) errors; a right one matches dequantize-to-dtype-then-matmul up to fp32 summation order.

What this cannot check is the compiled kernel itself (codegen, the inline PTX, memory behaviour): the GPU tests in
test_cuda_kernels.py run it against the reference whenever a GPU and the CUDA extension are present.
"""

import math

import numpy as np
import pytest
import torch

import flashquant as fq
from tolerances import assert_qmm_close, assert_qmm_same_rounding

WARPS_PER_BLOCK, ROWS_PER_WARP = 4, 16


# ---- PTX building blocks ---------------------------------------------------------------------------------------
def byte_perm(x: int, y: int, selector: int) -> int:
    """__byte_perm / prmt.b32 (default mode): result byte i is byte (selector >> 4i) & 7 of the pair {y, x}."""
    pool = (y << 32) | x
    out = 0
    for i in range(4):
        nib = (selector >> (4 * i)) & 0xF
        assert nib < 8, "sign-replicating selectors are not used by the kernel"
        out |= ((pool >> (8 * nib)) & 0xFF) << (8 * i)
    return out


def to_pair(bits: int, dtype: torch.dtype) -> torch.Tensor:
    """A 32-bit register as its (low, high) fp16/bf16 halves."""
    return torch.tensor([bits & 0xFFFF, bits >> 16], dtype=torch.int32).to(torch.int16).view(dtype)


def from_pair(v: torch.Tensor) -> int:
    lo, hi = (int(h) & 0xFFFF for h in v.view(torch.int16))
    return lo | (hi << 16)


def splat(value: float, dtype) -> torch.Tensor:
    return torch.tensor([value, value], dtype=dtype)


# mma.m16n8k16 fragment tables (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
# groupID = lane >> 2, threadID_in_group = lane % 4.
def a_coords(lane: int):
    """A (16x16, .f16x2 registers a0..a3 = elements a0..a7): (register, half) -> (row, col)."""
    g, t = lane >> 2, lane % 4
    out = {}
    for i in range(8):
        row = g if (i < 2 or 4 <= i < 6) else g + 8
        col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
        out[(i // 2, i % 2)] = (row, col)
    return out


def b_coords(lane: int):
    """B (16x8, registers b0..b1 = elements b0..b3): (register, half) -> (row k, col n)."""
    g, t = lane >> 2, lane % 4
    return {(i // 2, i % 2): (t * 2 + (i & 1) + (8 if i >= 2 else 0), g) for i in range(4)}


def c_coords(lane: int):
    """C/D (16x8 fp32, c0..c3): index -> (row, col)."""
    g, t = lane >> 2, lane % 4
    return {i: (g + (8 if i >= 2 else 0), t * 2 + (i & 1)) for i in range(4)}


def mma_16816(acc, a_regs, b_regs, dtype):
    """acc[lane][0..3] += A . B with the operands given per lane as 32-bit registers (fp32 accumulation)."""
    A, B, C = torch.zeros(16, 16), torch.zeros(16, 8), torch.zeros(16, 8)
    for lane in range(32):
        for (reg, half), (r, c) in a_coords(lane).items():
            A[r, c] = to_pair(a_regs[lane][reg], dtype)[half].float()
        for (reg, half), (r, c) in b_coords(lane).items():
            B[r, c] = to_pair(b_regs[lane][reg], dtype)[half].float()
        for i, (r, c) in c_coords(lane).items():
            C[r, c] = acc[lane][i]
    D = A @ B + C
    for lane in range(32):
        for i, (r, c) in c_coords(lane).items():
            acc[lane][i] = float(D[r, c])


# ---- the kernel, lane by lane ----------------------------------------------------------------------------------
def dequant_chunk(words, zero: int, scale: torch.Tensor, bits: int, dtype) -> list[int]:
    """quant_gemv.cu's dequant_chunk: four 32-bit words -> (code - zero) * scale as packed pairs."""
    scale2 = torch.stack([scale, scale])
    out = []
    if bits == 4:
        magic, bias = (0x64006400, 1024.0) if dtype == torch.float16 else (0x43004300, 128.0)
        for w in words:
            for s in range(4):
                v = ((w >> (4 * s)) & 0x000F000F) | magic
                out.append(from_pair((to_pair(v, dtype) - splat(bias + zero, dtype)) * scale2))
    elif dtype == torch.float16:
        for w in words:
            for sel in (0x7150, 0x7352):
                v = byte_perm(w, 0x64006400, sel)
                out.append(from_pair((to_pair(v, dtype) - splat(1024.0 + zero, dtype)) * scale2))
    else:
        for w in words:
            f = [
                np.array([byte_perm(w, 0x4B000000, 0x7540 | i)], dtype=np.uint32).view(np.float32)[0]
                - np.float32(8388608.0 + zero)
                for i in range(4)
            ]
            for lo, hi in ((f[0], f[1]), (f[2], f[3])):
                out.append(from_pair(torch.tensor([lo, hi]).to(torch.bfloat16) * scale2))
    return out


def words_of(buf: bytes) -> list[int]:
    return [int.from_bytes(buf[4 * i : 4 * i + 4], "little") for i in range(len(buf) // 4)]


def replay(x: torch.Tensor, qw: fq.QuantizedWeight, split_k: int) -> torch.Tensor:
    """out (M, N) as quant_gemv.cu computes it for this split_k (M <= 16), every lane replayed."""
    dtype, bits = x.dtype, qw.bits
    M, K = x.shape
    N = qw.qdata.shape[0]
    group_size = qw.effective_group_size
    codes_per_lane = 32 if bits == 4 else 16
    step_k = 4 * codes_per_lane
    k_per_split = math.ceil(math.ceil(K / split_k) / step_k) * step_k  # the launcher's rounding: whole steps
    m_tiles = 1 if M <= 8 else 2
    qbytes = qw.qdata.contiguous().numpy().tobytes()
    row_bytes = K * bits // 8
    scales = qw.scales.to(dtype)
    zeros = qw.zeros
    xbits = x.contiguous().view(torch.int16).numpy().astype(np.uint16)
    partial = torch.zeros(split_k, M, N)
    for split in range(split_k):
        k_begin = split * k_per_split
        k_end = min(K, k_begin + k_per_split)
        for n0 in range(0, N, ROWS_PER_WARP):
            acc = [[[0.0] * 4 for _ in range(32)] for _ in range(m_tiles)]
            k0 = k_begin
            while k0 < k_end:
                guard = k0 + step_k > k_end
                a = {}
                xw = {}
                for lane in range(32):
                    g, t = lane >> 2, lane % 4
                    k = k0 + t * codes_per_lane
                    active = not guard or k < k_end
                    for r, row in enumerate((min(n0 + g, N - 1), min(n0 + g + 8, N - 1))):
                        words, zero, scale = [0] * 4, 1 << (bits - 1), torch.zeros((), dtype=dtype)
                        if active:
                            off = row * row_bytes + k * bits // 8
                            words = words_of(qbytes[off : off + 16])
                            scale = scales[row, k // group_size]
                            if zeros is not None:
                                zero = int(zeros[row, k // group_size])
                        a[lane, r] = dequant_chunk(words, zero, scale, bits, dtype)
                    for mt in range(m_tiles):
                        m = min(mt * 8 + g, M - 1)  # clamped B column: results for m >= M are never stored
                        if active:
                            h = xbits[m, k : k + codes_per_lane].astype(np.uint32)
                            xw[lane, mt] = [int(lo) | (int(hi) << 16) for lo, hi in zip(h[0::2], h[1::2])]
                        else:
                            xw[lane, mt] = [0] * (codes_per_lane // 2)
                for mt in range(m_tiles):
                    if bits == 4:
                        for p in range(4):
                            for h in range(2):
                                a_regs, b_regs = [], []
                                for lane in range(32):
                                    a0, a1 = a[lane, 0], a[lane, 1]
                                    j = 4 * p + 2 * h
                                    a_regs.append((a0[j], a1[j], a0[j + 1], a1[j + 1]))
                                    lo, hi = xw[lane, mt][4 * p + h], xw[lane, mt][4 * p + h + 2]
                                    b_regs.append((byte_perm(lo, hi, 0x5410), byte_perm(lo, hi, 0x7632)))
                                mma_16816(acc[mt], a_regs, b_regs, dtype)
                    else:
                        for p in range(4):
                            a_regs = [
                                (a[ln, 0][2 * p], a[ln, 1][2 * p], a[ln, 0][2 * p + 1], a[ln, 1][2 * p + 1])
                                for ln in range(32)
                            ]
                            b_regs = [(xw[ln, mt][2 * p], xw[ln, mt][2 * p + 1]) for ln in range(32)]
                            mma_16816(acc[mt], a_regs, b_regs, dtype)
                k0 += step_k
            for mt in range(m_tiles):
                for lane in range(32):
                    g, t = lane >> 2, lane % 4
                    for i in range(4):
                        n, m = n0 + g + (i // 2) * 8, mt * 8 + 2 * t + i % 2
                        if n < N and m < M:
                            partial[split, m, n] = acc[mt][lane][i]
    return partial.sum(0).to(
        dtype
    )  # split_k == 1: the kernel casts its accumulators directly, the same rounding


# Small shapes: N not a multiple of 16 (clamped rows), K not a multiple of the 128-code step (guarded tail
# step), split-K with a short last slice, every group size the kernel takes, M = 1 / 5 (one n8 tile) / 11 (two).
CASES = [
    # bits, dtype, group_size, symmetric, M, N, K, split_k
    (4, torch.float16, 32, True, 1, 20, 160, 1),
    (4, torch.float16, 64, False, 5, 17, 192, 2),
    (4, torch.bfloat16, 128, True, 11, 18, 384, 2),
    (4, torch.bfloat16, -1, False, 3, 16, 96, 1),
    (8, torch.float16, 32, False, 2, 19, 96, 2),
    (8, torch.float16, -1, True, 9, 16, 64, 1),
    (8, torch.bfloat16, 64, True, 4, 21, 128, 3),
    (8, torch.bfloat16, 32, False, 16, 16, 160, 2),
    (4, torch.float16, 96, False, 7, 5, 288, 2),  # N < 16; a group size that is not a power of two
]


@pytest.mark.parametrize("bits,dtype,group_size,symmetric,M,N,K,split_k", CASES)
def test_cuda_gemv_fragment_replay_matches_reference(bits, dtype, group_size, symmetric, M, N, K, split_k):
    torch.manual_seed(bits * 1000 + M * 10 + split_k)
    qw = fq.quantize(torch.randn(N, K, dtype=dtype), bits, group_size, symmetric)
    x = torch.randn(M, K, dtype=dtype)
    out = replay(x, qw, split_k)
    # Exact products of dtype-rounded dequantized weights, fp32 sums: only the summation order differs.
    expected_same_rounding = (x.float() @ qw.dequantize().to(dtype).float().t()).to(dtype)
    assert_qmm_same_rounding(out, expected_same_rounding, "replay vs same-rounding model")
    assert_qmm_close(out, fq.quant_matmul(x, qw, backend="reference"), "replay vs reference")


def test_replay_catches_a_wrong_selector(monkeypatch):
    """The replay is sensitive to the kernel's constants: a swapped B selector must break it."""
    qw = fq.quantize(torch.randn(16, 128, dtype=torch.float16), 4, 128)
    x = torch.randn(1, 128, dtype=torch.float16)
    good = replay(x, qw, 1)
    real = byte_perm
    monkeypatch.setitem(
        globals(), "byte_perm", lambda a, b, s: real(a, b, {0x5410: 0x7632, 0x7632: 0x5410}.get(s, s))
    )
    bad = replay(x, qw, 1)
    assert (bad.float() - good.float()).abs().max() > 0.1
