"""Triton silu(gate) * up (SwiGLU's gating): one read of each input, one write, fp32 math, one rounding
(PyTorch's F.silu(gate) * up is two kernels and rounds twice). Rows may be strided, so the two halves of a
fused gate/up projection's output (``gate_up.chunk(2, -1)``) are read in place, without copies.
Reference: reference.layers.silu_mul_ref."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(Gate, Up, Out, n_cols, stride_gate, stride_up, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(Gate + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * n_cols + cols, (g * tl.sigmoid(g) * u).to(Out.dtype.element_ty), mask=mask)


BLOCK = 1024


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: (rows, F), same shape and dtype, stride 1 along F (any row stride) -> silu(gate) * up,
    contiguous (rows, F). The caller (flashquant.silu_mul) validates and flattens the leading dimensions."""
    rows, n_cols = gate.shape
    out = torch.empty((rows, n_cols), dtype=gate.dtype, device=gate.device)
    if out.numel() > 0:
        grid = (rows, triton.cdiv(n_cols, BLOCK))
        _silu_mul_kernel[grid](gate, up, out, n_cols, gate.stride(0), up.stride(0), BLOCK=BLOCK, num_warps=4)
    return out
