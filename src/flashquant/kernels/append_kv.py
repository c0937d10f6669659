"""Triton KV-cache append: new k and v tokens (B, Snew, Hkv, D) written at positions cache_seqlens[b] + t of a
contiguous (B, S_max, Hkv, D) or paged (num_blocks, block_size, Hkv, D) cache, in place, in one launch for both
(PyTorch indexing takes 6-10 kernels: positions, page lookup, two index_puts). Program (b * Snew + t, head tile).
Optionally it also writes the lengths after the append, cache_seqlens + Snew, which the attention that follows
needs: one launch fewer than a separate add.
Tokens whose position falls outside the cache are not written: the position lives on the device, so the host
cannot check it without a sync, and an unchecked write would corrupt other memory. Reference semantics:
flashquant.attention.append_kv's PyTorch form."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _append_kv_kernel(
    KCache, VCache, SeqLens, K, V, BlockTable, SeqLensOut,
    snew, n_heads, head_dim, capacity,
    skcb, skcs, skch, svcb, svcs, svch, skb, sks, skh, svb, svs, svh, sbt,
    PAGED: tl.constexpr,
    WRITE_LENS: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // snew).to(tl.int64)
    t = pid % snew
    seqlen = tl.load(SeqLens + b)
    if WRITE_LENS:
        if (t == 0) & (tl.program_id(1) == 0):
            tl.store(SeqLensOut + b, (seqlen + snew).to(tl.int32))
    pos = seqlen.to(tl.int64) + t
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    pos_h = pos + tl.zeros([BLOCK_H], dtype=tl.int64)  # per head: the interpreter cannot mask with scalars
    heads_ok = (heads < n_heads) & (pos_h >= 0) & (pos_h < capacity)
    mask = heads_ok[:, None] & (offs_d < head_dim)[None, :]
    pos = tl.minimum(tl.maximum(pos, 0), capacity - 1)  # keeps the page lookup in bounds; stores are masked
    if PAGED:
        block = tl.load(BlockTable + b * sbt + pos // PAGE_SIZE).to(tl.int64)
        slot = pos % PAGE_SIZE
    else:
        block = b
        slot = pos
    h64 = heads[:, None].to(tl.int64)
    k = tl.load(K + b * skb + t * sks + h64 * skh + offs_d[None, :], mask=mask)
    v = tl.load(V + b * svb + t * svs + h64 * svh + offs_d[None, :], mask=mask)
    tl.store(KCache + block * skcb + slot * skcs + h64 * skch + offs_d[None, :], k, mask=mask)
    tl.store(VCache + block * svcb + slot * svcs + h64 * svch + offs_d[None, :], v, mask=mask)


def append_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor | None,
    seqlens_out: torch.Tensor | None = None,
) -> None:
    """Shapes as in flashquant.attention.append_kv (validated there); the caches have stride 1 in their last
    dimension; k and v may be any views (e.g. slices of a fused qkv projection's output; copied first only if
    their last dimension is strided). seqlens_out: optional int32 (B,), receives cache_seqlens + Snew; needs
    Snew >= 1 and Hkv >= 1 (else nothing is launched)."""
    B, snew, n_heads, head_dim = k.shape
    if B * snew == 0 or n_heads == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()  # the kernel reads rows of head_dim contiguous elements
    v = v if v.stride(-1) == 1 else v.contiguous()
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(n_heads), max(1, 4096 // block_d))  # <= 4K elements per tile
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    table = block_table if paged else cache_seqlens  # any tensor: unused when not paged
    grid = (B * snew, triton.cdiv(n_heads, block_h))
    _append_kv_kernel[grid](
        k_cache, v_cache, cache_seqlens, k, v, table, seqlens_out if seqlens_out is not None else cache_seqlens,
        snew, n_heads, head_dim, capacity,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        table.stride(0) if paged else 0,
        PAGED=paged, WRITE_LENS=seqlens_out is not None, PAGE_SIZE=page_size, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip
