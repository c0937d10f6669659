"""Triton RMSNorm, optionally fused with the residual add before it: one program per row, one read of x (and
the residual) and one write of the output (and the new residual stream), fp32 math, one rounding per output.

Replaces ~7 PyTorch kernels per norm (cast, square, mean, add, rsqrt, two multiplies, cast) plus the add: at
decode sizes each is a launch of a few microseconds for a few KB. Reference: reference.layers.rms_norm_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    X,
    Residual,
    Weight,
    Out,
    ResidualOut,
    n_cols,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # h = x + residual rounded to the dtype, as PyTorch's add would; the norm is of that rounded h.
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(ResidualOut.dtype.element_ty)
        tl.store(ResidualOut + row * stride_ro + cols, h, mask=mask)
        x = h.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    inv_rms = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(Weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (x * inv_rms * w).to(Out.dtype.element_ty), mask=mask)


MAX_COLS = 65536  # one row per program, held in registers


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (rows, H) with unit column stride, weight (H,), residual like x or None -> (out, x + residual or None),
    both in x.dtype. The caller (flashquant.rms_norm) validates and flattens."""
    rows, n_cols = x.shape
    if n_cols > MAX_COLS:
        raise ValueError(f"the Triton rms_norm handles rows of at most {MAX_COLS} elements, got {n_cols}")
    out = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    block = triton.next_power_of_2(n_cols)
    if rows > 0:
        r = residual if residual is not None else x  # unused when HAS_RESIDUAL is False
        _rms_norm_kernel[(rows,)](
            x, r, weight, out, h if h is not None else out,
            n_cols, x.stride(0), r.stride(0), out.stride(0), (h if h is not None else out).stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
    return out, h
