"""Triton rotary position embedding for q and k in one launch: program (b * S + s, head tile) computes
cos/sin of position * inv_freq in fp32 once for the tile and rotates its heads ("rotate half": dims d and
d + D/2 are the pairs). Heads tiles of q come first, then those of k.

Replaces ~10 PyTorch kernels per tensor (angles, cos, sin, two concatenations, negation, casts, multiplies,
add). Reference: reference.layers.rotary_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, Out, b, s, head0, n_heads, sxb, sxs, sxh, sob, sos, soh, cos, sin, offs_d, d_valid,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    heads = head0 + tl.arange(0, BLOCK_H)
    mask = (heads < n_heads)[:, None] & d_valid[None, :]
    x_ptr = X + b * sxb + s * sxs + heads[:, None].to(tl.int64) * sxh + offs_d[None, :]
    o_ptr = Out + b * sob + s * sos + heads[:, None].to(tl.int64) * soh + offs_d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, QOut, KOut, Pos, InvFreq,
    S, n_q_heads, n_k_heads, q_tiles,
    sqb, sqs, sqh, skb, sks, skh, sqob, sqos, sqoh, skob, skos, skoh, spb, sps,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid_bs = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = (pid_bs // S).to(tl.int64)
    s = (pid_bs % S).to(tl.int64)
    pos = tl.load(Pos + b * spb + s * sps).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_valid = offs_d < HALF
    angle = pos * tl.load(InvFreq + offs_d, mask=d_valid, other=0.0)
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]
    if pid_h < q_tiles:
        _rotate_heads(Q, QOut, b, s, pid_h * BLOCK_H, n_q_heads, sqb, sqs, sqh, sqob, sqos, sqoh, cos, sin,
                      offs_d, d_valid, HALF, BLOCK_H)  # fmt: skip
    else:
        _rotate_heads(K, KOut, b, s, (pid_h - q_tiles) * BLOCK_H, n_k_heads, skb, sks, skh, skob, skos, skoh,
                      cos, sin, offs_d, d_valid, HALF, BLOCK_H)  # fmt: skip


def rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, S, Hq, D), k (B, S, Hk, D) with unit stride in D, positions (B, S) integer, inv_freq (D/2,) fp32
    -> rotated (q, k), new tensors in the input dtypes. The caller (flashquant.rotary_embedding) validates."""
    B, S, hq, d = q.shape
    hk = k.shape[2]
    half = d // 2
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    block_h = min(16, triton.next_power_of_2(max(hq, hk)))
    q_tiles, k_tiles = triton.cdiv(hq, block_h), triton.cdiv(hk, block_h)
    if B * S > 0:
        _rotary_kernel[(B * S, q_tiles + k_tiles)](
            q, k, q_out, k_out, positions, inv_freq,
            S, hq, hk, q_tiles,
            *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3], *positions.stride(),
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip
    return q_out, k_out
