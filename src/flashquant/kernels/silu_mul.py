"""Triton silu(gate) * up (SwiGLU's gating): one read of each input, one write, fp32 math, one rounding
(PyTorch's F.silu(gate) * up is two kernels and rounds twice). Reference: reference.layers.silu_mul_ref."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(Gate, Up, Out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(Gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + offs, (g * tl.sigmoid(g) * u).to(Out.dtype.element_ty), mask=mask)


BLOCK = 1024


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: contiguous, same shape and dtype -> silu(gate) * up. The caller (flashquant.silu_mul) validates."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n > 0:
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out
