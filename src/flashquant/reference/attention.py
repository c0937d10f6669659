"""Reference attention, computed in fp32 with explicit masks.

Semantics (shared by every backend):
* q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); query head h reads KV head h // (Hq // Hkv).
* Key j is visible to query i iff  i + Sk - Sq - left <= j <= i + Sk - Sq + right  (bottom-right aligned, as in
  flash-attn >= 2.1), with left/right = window_size, -1 meaning unbounded; causal forces right = 0.
* softcap > 0 replaces each score s by softcap * tanh(s / softcap) before masking and softmax.
* A query row with no visible key outputs zeros and has lse = -inf.
"""

from __future__ import annotations

import math

import torch


def visible(
    seqlen_q: int, seqlen_k: int, causal: bool, window_size: tuple[int, int], device=None
) -> torch.Tensor:
    """(Sq, Sk) bool mask: True where key j is visible to query i."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= diag + right
    if left >= 0:
        mask &= j >= diag - left
    return mask


def attention_ref(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0):
    """Returns (out in q.dtype, lse (B, Hq, Sq) fp32)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    group = Hq // Hkv
    qf = q.float().transpose(1, 2)  # (B, Hq, Sq, D)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)  # the oracle may repeat K/V
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = qf @ kf.transpose(-1, -2) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    mask = visible(Sq, Sk, causal, window_size, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with no visible key
    probs = torch.exp(scores - lse[..., None])
    probs = torch.nan_to_num(probs, nan=0.0)  # empty rows: exp(-inf - -inf) = nan -> 0
    out = (probs @ vf).transpose(1, 2)
    return out.to(q.dtype), lse


def attention_varlen_ref(
    q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0
):
    """q (total_q, Hq, D), k/v (total_k, Hkv, D). Returns (out (total_q, Hq, D), lse (Hq, total_q) fp32)."""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        o, lse_b = attention_ref(
            q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal, softmax_scale, window_size, softcap
        )
        out[qs:qe] = o[0]
        lse[:, qs:qe] = lse_b[0]
    return out, lse


def _cache_positions(b: int, positions: torch.Tensor, block_table, block_size: int):
    """(batch or block index, slot) for each token position of sequence b."""
    if block_table is None:
        return torch.full_like(positions, b), positions
    return block_table[b, positions // block_size].long(), positions % block_size


def attention_kvcache_ref(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    k=None,
    v=None,
    block_table=None,
    causal=True,
    softmax_scale=None,
    window_size=(-1, -1),
    softcap=0.0,
):
    """Appends k/v (B, Snew, Hkv, D) into the cache in place at cache_seqlens, then attends to the first
    cache_seqlens[b] + Snew keys of each sequence. Returns (out (B, Sq, Hq, D), lse (B, Hq, Sq) fp32)."""
    B, Sq, Hq, D = q.shape
    block_size = k_cache.shape[1]
    snew = 0 if k is None else k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    for b in range(B):
        start = int(cache_seqlens[b])
        if snew:
            idx, slot = _cache_positions(
                b, torch.arange(start, start + snew, device=q.device), block_table, block_size
            )
            k_cache[idx, slot] = k[b]
            v_cache[idx, slot] = v[b]
        total = start + snew
        idx, slot = _cache_positions(b, torch.arange(total, device=q.device), block_table, block_size)
        o, lse_b = attention_ref(
            q[b : b + 1],
            k_cache[idx, slot][None],
            v_cache[idx, slot][None],
            causal,
            softmax_scale,
            window_size,
            softcap,
        )
        out[b], lse[b] = o[0], lse_b[0]
    return out, lse
