"""Reference weight-only quantization (the math every quantized kernel must reproduce).

For a weight w (N, K), groups of `group_size` consecutive input channels share one scale (and zero point):
* symmetric:  qmax = 2^(bits-1) - 1;  scale = max|w_group| / qmax;  code = clamp(round(w / scale), -qmax-1, qmax)
  + 2^(bits-1)  (stored offset-binary, unsigned); the zero point is implicitly 2^(bits-1).
* asymmetric: lo = min(min w_group, 0), hi = max(max w_group, 0);  scale = (hi - lo) / (2^bits - 1);
  zero = clamp(round(-lo / scale), 0, 2^bits - 1);  code = clamp(round(w / scale) + zero, 0, 2^bits - 1).
* dequantized weight = (code - zero) * scale.
* clipping (optional, per group): a ratio c in (0, 1] shrinks the range first (max|w_group| -> c max|w_group|;
  lo, hi -> c lo, c hi); values beyond it clamp to the end codes. Trading large errors on a few outliers for a
  finer grid on the rest lowers the group's total squared error; `mse_clip_ratios` searches c per group.
`round` is round-half-to-even (torch.round). The scale is first rounded to the storage dtype (w's dtype), then
used for the codes, so dequantize() reproduces exactly what the kernels compute. A group whose range is 0 gets
scale 1 (all codes equal the zero point, dequantizing to exact zeros); scales are clamped to the storage dtype's
smallest normal number so they never underflow to 0.
"""

from __future__ import annotations

import torch


def group_grid(
    groups: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 groups (..., group_size) -> (scale (...) in `dtype`, the storage dtype; zero point (...) fp32: the
    rounded one, or 2^(bits-1) for symmetric). clip: a float or fp32 (...) ratio; 1.0 = min-max."""
    tiny = torch.finfo(dtype).tiny
    if symmetric:
        scale = groups.abs().amax(-1) * clip / (2 ** (bits - 1) - 1)
    else:
        lo = groups.amin(-1).clamp(max=0) * clip
        hi = groups.amax(-1).clamp(min=0) * clip
        scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale.clamp(min=tiny))
    scale = scale.to(dtype)  # what is stored is what the codes are computed against
    if symmetric:
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.float32)
    else:
        zero = torch.clamp(torch.round(-lo / scale.float()), 0, 2**bits - 1)
    return scale, zero


def codes_on_grid(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 groups (..., group_size), scale and zero (...) -> fp32 codes in [0, 2^bits - 1]. For symmetric grids
    this is clamp(round(w / scale), -2^(bits-1), 2^(bits-1) - 1) + 2^(bits-1), the same integers."""
    return torch.clamp(torch.round(groups / scale.float()[..., None]) + zero[..., None], 0, 2**bits - 1)


def quantize_ref(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: torch.Tensor | float = 1.0
):
    """w (N, K) float -> (codes uint8 (N, K), scales (N, K // group_size) in w.dtype, zeros uint8 or None).

    clip: the ratio each group's range is shrunk by, a float or fp32 (N, K // group_size); 1.0 = min-max."""
    N, K = w.shape
    gs = K if group_size == -1 else group_size
    groups = w.float().reshape(N, K // gs, gs)
    scale, zero = group_grid(groups, bits, symmetric, w.dtype, clip)
    codes = codes_on_grid(groups, scale, zero, bits)
    return codes.reshape(N, K).to(torch.uint8), scale, None if symmetric else zero.to(torch.uint8)


# The clip ratios `mse_clip_ratios` tries: 1.0 (min-max) down to 0.2 in steps of 0.025. Heavy-tailed per-channel
# int4 rows want ratios below 0.5; a finer step gained < 0.02 dB on Gaussian and Student-t weights (bench/NOTES.md,
# "Session 21").
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(33))


def mse_clip_ratios(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Per group, the ratio in CLIP_RATIOS whose quantization has the smallest squared error against w (the first,
    i.e. the widest range, on ties): fp32 (N, K // group_size). 1.0 is a candidate, so no group gets worse than
    min-max."""
    N, K = w.shape
    gs = K if group_size == -1 else group_size
    target = w.float().reshape(N, K // gs, gs)
    best_err = best = None
    for ratio in CLIP_RATIOS:
        codes, scales, zeros = quantize_ref(w, bits, group_size, symmetric, ratio)
        approx = dequantize_ref(codes, scales, zeros, bits, group_size).reshape(N, K // gs, gs)
        # each error term rounded to fp32, the sums in fp64: any summation order then picks the same ratio (the
        # C++ search in csrc/cpu/mse_clip.cpp sums in another order)
        err = (approx - target).square().sum(-1, dtype=torch.float64)  # no fp64 copy of the terms
        if best is None:
            best_err, best = err, torch.full_like(err, ratio, dtype=torch.float32)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, ratio, best)
    return best


def dequantize_ref(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """codes uint8 (N, K) -> fp32 (N, K)."""
    N, K = codes.shape
    gs = K if group_size == -1 else group_size
    z = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float32) if zeros is None else zeros.float()
    c = codes.float().reshape(N, K // gs, gs)
    return ((c - z[..., None]) * scales.float()[..., None]).reshape(N, K)


def quant_matmul_ref(x, codes, scales, zeros, bits, group_size, bias=None):
    """F.linear(x, dequantize(W), bias) computed in fp32, returned in x.dtype."""
    w = dequantize_ref(codes, scales, zeros, bits, group_size)
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
