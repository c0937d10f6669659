"""fp32 references of the small ops between a decoder layer's matmuls: RMSNorm (with the residual add before
it), rotary position embedding, and SwiGLU's silu(gate) * up. Each rounds once, to the input dtype."""

from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (..., H), weight (H,) -> (x * rsqrt(mean(x^2) + eps) * weight, None).

    With `residual` (same shape and dtype as x): h = x + residual, rounded to x.dtype as PyTorch's own add
    would, is normalized instead, and returned as the second output (the next residual stream)."""
    h = None
    if residual is not None:
        h = (x.float() + residual.float()).to(x.dtype)
        x = h
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype), h


def rotary_ref(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D), positions (B, S) integer, inv_freq (D/2,) fp32 -> x rotated by position * inv_freq
    ("rotate half" convention: the first and second halves of the head dimension are the pairs)."""
    angles = positions[..., None].float() * inv_freq.float()  # (B, S, D/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, :, None]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, :, None]
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rotated * sin).to(x.dtype)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 and rounded once."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)
