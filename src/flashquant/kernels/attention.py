"""Triton FlashAttention-style forward kernels: dense, varlen and KV-cache (contiguous or paged), with
split-KV ("flash-decoding") and an LSE-merge kernel.

Layout of the work: one program owns BLOCK_M *rows*, where a row is a (query position, query head of the
KV group) pair, so the Hq/Hkv query heads that share a KV head are rows of the same tile and every K/V byte is
read once per group (GQA/MQA never repeat K/V). Programs loop over BLOCK_N keys with an online softmax in
base 2 and fp32 accumulators. The key loop is clipped to the causal / sliding-window band of the tile, so
fully masked key blocks are skipped, not computed; prefill tiles run the blocks on the band's edges, which need the
mask, and the interior blocks, which need none, in separate loops. With split-KV, program (m, bh, s) (on one flat
grid axis) covers keys [s * split_size, (s + 1) * split_size) and writes an fp32 partial output + its LSE;
`_combine_kernel` merges.

Semantics (masks, empty rows -> 0 with lse -inf) are those of flashquant.reference.attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, num_sms

LOG2E = 1.4426950408889634


@triton.jit
def _kv_offsets(table, start_n, n_lo, n_hi, stride_kb, stride_ks, stride_vb, stride_vs, MASKED: tl.constexpr,
                PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Offsets of the key block at start_n in K and V (through the block table when PAGED), and which of its
    keys are in [n_lo, n_hi) (all of them when not MASKED)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    col_valid = (cols >= n_lo) & (cols < n_hi)
    if PAGED:
        if MASKED:
            block = tl.load(table + cols // PAGE_SIZE, mask=col_valid, other=0)
        else:
            block = tl.load(table + cols // PAGE_SIZE)
        slot = (cols % PAGE_SIZE).to(tl.int64)
        k_off = block.to(tl.int64) * stride_kb + slot * stride_ks
        v_off = block.to(tl.int64) * stride_vb + slot * stride_vs
    else:
        k_off = cols.to(tl.int64) * stride_ks
        v_off = cols.to(tl.int64) * stride_vs
    return k_off, v_off, col_valid


@triton.jit
def _scores(q, k_ptr, k_off, col_valid, offs_d, d_valid, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
            IEEE_DOT: tl.constexpr):  # fmt: skip
    """q @ K^T of one key block, (BLOCK_M, BLOCK_N) fp32, unscaled."""
    k_ptrs = k_ptr + k_off[None, :] + offs_d[:, None]
    if MASKED:
        k = tl.load(k_ptrs, mask=col_valid[None, :] & d_valid[:, None], other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
    if IEEE_DOT:
        return tl.dot(q, k, input_precision="ieee")
    return tl.dot(q, k)


@triton.jit
def _softmax_update(acc, l_i, m_i, s, v_ptr, v_off, col_valid, start_n, row_lo, row_hi, full_lo, full_hi, offs_d,
                    d_valid, qk_scale, softcap, MASKED: tl.constexpr, USE_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
                    IEEE_DOT: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The online-softmax update of (acc, l_i, m_i) by one key block's scores s and its values. MASKED: row r
    sees only the keys in [row_lo[r], row_hi[r]), unless the block lies inside [full_lo, full_hi), visible to all."""
    if USE_SOFTCAP:
        # softcap * tanh(x / softcap), tanh via exp (exact limits at +-inf), then to base 2.
        x = s * qk_scale
        s = (softcap * 1.4426950408889634) * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
    else:
        s = s * qk_scale
    if MASKED:
        if (start_n < full_lo) | (start_n + BLOCK_N > full_hi):  # (a uniform branch: interior blocks skip it)
            cols = start_n + tl.arange(0, BLOCK_N)
            visible = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
            s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_ptr + v_off[:, None] + offs_d[None, :]
    if MASKED:
        v = tl.load(v_ptrs, mask=col_valid[:, None] & d_valid[None, :], other=0.0)
    elif EVEN_D:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
    if IEEE_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _attend_key_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, table, start, stop, n_lo, n_hi, row_lo, row_hi, full_lo,
                       full_hi, offs_d, d_valid, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, softcap,
                       MASKED: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                       IEEE_DOT: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """(acc, l_i, m_i) updated by the key blocks at start, start + BLOCK_N, ... < stop. k_ptr/v_ptr: this
    (sequence, KV head)'s keys/values, or this KV head's in page 0 when PAGED (table: the sequence's block-table
    row). MASKED: the blocks may hold keys some rows must not see: row r sees the keys in [row_lo[r], row_hi[r])
    (blocks inside [full_lo, full_hi) are visible to every row) and the loads stay in [n_lo, n_hi); otherwise every
    key is visible to every row and no mask is built."""
    for start_n in range(start, stop, BLOCK_N):
        k_off, v_off, col_valid = _kv_offsets(table, start_n, n_lo, n_hi, stride_kb, stride_ks, stride_vb,
                                              stride_vs, MASKED, PAGED, PAGE_SIZE, BLOCK_N)  # fmt: skip
        s = _scores(q, k_ptr, k_off, col_valid, offs_d, d_valid, MASKED, EVEN_D, IEEE_DOT)
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v_ptr, v_off, col_valid, start_n, row_lo, row_hi, full_lo,
                                        full_hi, offs_d, d_valid, qk_scale, softcap, MASKED, USE_SOFTCAP, EVEN_D,
                                        IEEE_DOT, BLOCK_N)  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    OutPart,
    LsePart,
    CuSeqQ,
    CuSeqK,
    SeqlensK,
    BlockTable,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_bt,
    seqlen_q,
    seqlen_k,
    batch,
    num_kv_heads,
    head_dim,
    sm_scale,
    softcap,
    window_left,
    window_right,
    split_size,
    varlen_rows,  # MODE 1: total_q, the rows of the partial outputs' (num_splits, Hq, total_q) layout
    GROUP: tl.constexpr,
    MODE: tl.constexpr,  # 0: dense, 1: varlen (cu_seqlens), 2: kv cache (per-batch seqlens_k)
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: no head-dim mask on loads
    # Separate loops for the masked edge blocks: prefill-sized tiles up to head_dim 128 (at 256 the extra loops' live
    # state spills on sm_80/89).
    EDGE_LOOPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One flat grid axis, m fastest, then (b, hkv), then split: the order a (m, bh, s) grid would run in, without
    # CUDA's 65535 limit on grid axes 1 and 2 (batch * num_kv_heads passes it at batch 8192 with 8 KV heads).
    num_m = tl.cdiv(seqlen_q * GROUP, BLOCK_M)
    num_bh = batch * num_kv_heads
    pid = tl.program_id(0)
    # Tiles in reverse query order: under a causal mask the last rows attend to the most keys, so the longest
    # programs start first and the short ones fill the tail of the grid.
    pid_m = num_m - 1 - pid % num_m
    pid_bh = (pid // num_m) % num_bh
    pid_s = pid // (num_m * num_bh)
    b = pid_bh // num_kv_heads
    hkv = pid_bh % num_kv_heads
    num_heads = num_kv_heads * GROUP

    # Per-sequence extents and base offsets (64-bit: batch * seqlen * heads * head_dim may exceed 2^31).
    if MODE == 1:
        q_start = tl.load(CuSeqQ + b)
        sq = tl.load(CuSeqQ + b + 1) - q_start
        k_start = tl.load(CuSeqK + b)
        sk = tl.load(CuSeqK + b + 1) - k_start
        q_base = q_start.to(tl.int64) * stride_qs
        o_base = q_start.to(tl.int64) * stride_os
        k_base = k_start.to(tl.int64) * stride_ks
        v_base = k_start.to(tl.int64) * stride_vs
        l_base = q_start.to(tl.int64)
    else:
        sq = seqlen_q
        if MODE == 2:
            # seqlen_k is the cache capacity here: a length past it (unchecked on CUDA, where checking would
            # need a host sync) must not read past the cache.
            sk = tl.minimum(tl.load(SeqlensK + b), seqlen_k)
        else:
            sk = seqlen_k
        q_base = b.to(tl.int64) * stride_qb
        o_base = b.to(tl.int64) * stride_ob
        k_base = b.to(tl.int64) * stride_kb
        v_base = b.to(tl.int64) * stride_vb
        l_base = b.to(tl.int64) * stride_lb

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = rows // GROUP
    head = hkv * GROUP + rows % GROUP
    row_valid = q_pos < sq
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim

    q = tl.load(
        Q + q_base + q_pos[:, None].to(tl.int64) * stride_qs + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )

    # Keys this tile can see: the causal/window band of its first and last query positions.
    first_pos = (pid_m * BLOCK_M) // GROUP
    last_pos = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, sq - 1)
    n_lo = 0
    n_hi = sk
    if window_right >= 0:
        n_hi = tl.minimum(sk, last_pos + sk - sq + window_right + 1)
    if window_left >= 0:
        n_lo = tl.maximum(0, first_pos + sk - sq - window_left)
    if SPLIT:
        n_lo = tl.maximum(n_lo, pid_s * split_size)
        # The last split takes every key from its start on: varlen sizes the splits from max_seqlen_k, which on
        # CUDA is the caller's unchecked bound (checking needs a host sync); a low one must not drop keys.
        if pid_s < tl.num_programs(0) // (num_m * num_bh) - 1:
            n_hi = tl.minimum(n_hi, (pid_s + 1) * split_size)
    if first_pos >= sq:  # tile past the end of this (varlen) sequence
        n_hi = n_lo
    # Interior blocks, visible to every row of the tile, skip the mask arithmetic: [full_lo, full_hi).
    full_lo = n_lo
    full_hi = n_hi
    if window_right >= 0:
        full_hi = tl.minimum(full_hi, first_pos + sk - sq + window_right + 1)
    if window_left >= 0:
        full_lo = tl.maximum(full_lo, last_pos + sk - sq - window_left)

    if USE_SOFTCAP:
        qk_scale = sm_scale / softcap
    else:
        qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Row r sees keys [row_lo, row_hi): the tile's range, narrowed to its own diagonal band (bottom-right aligned:
    # query position p sits on key p + sk - sq). Rows past the sequence are computed on zero queries and not stored.
    diag = q_pos + sk - sq
    row_lo = tl.full([BLOCK_M], 0, tl.int32) + n_lo
    row_hi = tl.full([BLOCK_M], 0, tl.int32) + n_hi
    if window_right >= 0:
        row_hi = tl.minimum(row_hi, diag + window_right + 1)
    if window_left >= 0:
        row_lo = tl.maximum(row_lo, diag - window_left)
    if PAGED:
        k_ptr = K + hkv * stride_kh
        v_ptr = V + hkv * stride_vh
    else:
        k_ptr = K + k_base + hkv * stride_kh
        v_ptr = V + v_base + hkv * stride_vh
    table = BlockTable + b.to(tl.int64) * stride_bt

    first = (n_lo // BLOCK_N) * BLOCK_N
    if EDGE_LOOPS:
        # The key blocks in three runs, in key order: [first, interior_lo) and [interior_hi, n_hi) hold the band's
        # edges (causal diagonal, window, sequence end) and apply the visibility mask; the interior blocks between
        # them are visible to every row of the tile and run a loop with no mask arithmetic at all (one loop with a
        # per-block branch kept the masked path in the loop body: 1,109 SASS instructions per trip for prefill
        # d128 on sm_90a, against 435 for this interior loop).
        interior_lo = tl.maximum(first, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N)
        interior_hi = tl.maximum(interior_lo, (full_hi // BLOCK_N) * BLOCK_N)
        acc, l_i, m_i = _attend_key_blocks(
            acc, l_i, m_i, q, k_ptr, v_ptr, table, first, tl.minimum(interior_lo, n_hi), n_lo, n_hi, row_lo,
            row_hi, full_lo, full_hi, offs_d, d_valid, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, softcap,
            True, PAGED, PAGE_SIZE, USE_SOFTCAP, IEEE_DOT, EVEN_D, BLOCK_N,
        )  # fmt: skip
        acc, l_i, m_i = _attend_key_blocks(
            acc, l_i, m_i, q, k_ptr, v_ptr, table, interior_lo, interior_hi, n_lo, n_hi, row_lo,
            row_hi, full_lo, full_hi, offs_d, d_valid, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, softcap,
            False, PAGED, PAGE_SIZE, USE_SOFTCAP, IEEE_DOT, EVEN_D, BLOCK_N,
        )  # fmt: skip
        acc, l_i, m_i = _attend_key_blocks(
            acc, l_i, m_i, q, k_ptr, v_ptr, table, interior_hi, n_hi, n_lo, n_hi, row_lo,
            row_hi, full_lo, full_hi, offs_d, d_valid, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, softcap,
            True, PAGED, PAGE_SIZE, USE_SOFTCAP, IEEE_DOT, EVEN_D, BLOCK_N,
        )  # fmt: skip
    else:
        # Decode-sized tiles (memory-bound, a few rows) and head_dim 256: one loop, every block masked (the mask is two
        # compares per score), so that the registers, and with them the programs per SM that keep loads in flight,
        # stay low.
        acc, l_i, m_i = _attend_key_blocks(
            acc, l_i, m_i, q, k_ptr, v_ptr, table, first, n_hi, n_lo, n_hi, row_lo,
            row_hi, full_lo, full_hi, offs_d, d_valid, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, softcap,
            True, PAGED, PAGE_SIZE, USE_SOFTCAP, IEEE_DOT, EVEN_D, BLOCK_N,
        )  # fmt: skip

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if SPLIT:
        # partials: (num_splits, B, Hq, Sq, D) fp32 and (num_splits, B, Hq, Sq); varlen (num_splits, Hq, total_q, D)
        # and (num_splits, Hq, total_q), the (Hq, total_q) order of its lse
        if MODE == 1:
            prow = (pid_s.to(tl.int64) * num_heads + head) * varlen_rows + q_start + q_pos
        else:
            prow = ((pid_s * batch + b).to(tl.int64) * num_heads + head) * seqlen_q + q_pos
        tl.store(
            OutPart + prow[:, None] * head_dim + offs_d[None, :],
            out,
            mask=row_valid[:, None] & d_valid[None, :],
        )
        tl.store(LsePart + prow, lse, mask=row_valid)
    else:
        tl.store(
            Out
            + o_base
            + q_pos[:, None].to(tl.int64) * stride_os
            + head[:, None] * stride_oh
            + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )
        if WRITE_LSE:
            tl.store(Lse + l_base + head * stride_lh + q_pos, lse, mask=row_valid)


@triton.jit
def _combine_kernel(
    Out,
    Lse,
    OutPart,
    LsePart,
    stride_ob,
    stride_os,
    stride_oh,
    num_rows,
    num_heads,
    seqlen_q,
    num_splits,
    head_dim,
    VarlenEnd,  # varlen: &cu_seqlens_q[-1]; rows from there on belong to no sequence: zeros, lse -inf
    VARLEN: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # over (B, Hq, Sq); varlen: (1, Hq, total_q)
    b = row // (num_heads * seqlen_q)
    h = (row // seqlen_q) % num_heads
    s = row % seqlen_q
    valid_splits = num_splits
    # varlen: a row past the last sequence has no partials (never written); merged as none, it gets 0 and -inf
    if VARLEN:
        valid_splits = tl.where(s < tl.load(VarlenEnd), num_splits, 0)
    splits = tl.arange(0, SPLITS_P2)
    split_valid = splits < valid_splits
    lse_s = tl.load(LsePart + splits.to(tl.int64) * num_rows + row, mask=split_valid, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    w_sum = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    parts = tl.load(
        OutPart + (splits.to(tl.int64)[:, None] * num_rows + row) * head_dim + offs_d[None, :],
        mask=split_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    out = tl.sum(parts * w[:, None], 0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    tl.store(
        Out + b * stride_ob + s * stride_os + h * stride_oh + offs_d,
        out.to(Out.dtype.element_ty),
        mask=d_valid,
    )
    if WRITE_LSE:
        lse = tl.where(w_sum == 0.0, float("-inf"), m_safe + tl.log(tl.where(w_sum == 0.0, 1.0, w_sum)))
        tl.store(Lse + row, lse)


# ---- launch configs ---------------------------------------------------------------------------------------
# Per head_dim bucket, from configs.py (built-in defaults or this device's tuned table): "prefill" for many rows
# per KV head, "decode" for the few rows (Sq * group <= 64) of decoding, where BLOCK_M is the rows rounded up
# to a tl.dot-able 16+. Chosen per bucket: nothing is re-tuned per sequence length.
MAX_HEAD_DIM = 256
MAX_SPLITS = 128


def _block_d(q: torch.Tensor) -> int:
    d = q.shape[-1]
    if d > MAX_HEAD_DIM or d == 0:
        raise ValueError(
            f"the Triton attention kernels support head_dim 1..{MAX_HEAD_DIM} (padded to a power of "
            f"two internally), got {d}"
        )
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        raise TypeError(
            "bf16 is not supported by the Triton interpreter (TRITON_INTERPRET=1); use fp16/fp32 on "
            "the CPU or run on a GPU"
        )
    return max(16, triton.next_power_of_2(d))


def _config(device, block_d: int, rows: int, override=None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); `override` replaces the table entry (the tuner)."""
    bucket = configs.head_dim_bucket(block_d)
    if rows <= 64:
        block_n, warps, stages = override or configs.lookup(device, f"attention.decode.d{bucket}")
        return max(16, triton.next_power_of_2(rows)), block_n, warps, stages
    return tuple(override or configs.lookup(device, f"attention.prefill.d{bucket}"))


def choose_num_splits(device, work_programs: int, capacity: int, block_n: int) -> int:
    """Split the KV length until ~2 waves of programs fill the device, keeping >= 2 key blocks per split.
    Depends only on shapes known on the host (the cache capacity, not the device-side seqlens), so it never
    syncs and a CUDA graph replays the same launch."""
    if work_programs <= 0 or capacity <= 0:
        return 1
    want = triton.cdiv(2 * num_sms(device, 8), work_programs)
    return max(1, min(want, triton.cdiv(capacity, 2 * block_n), MAX_SPLITS))


def _forward(
    q,
    k,
    v,
    *,
    mode,
    seqlen_q,
    seqlen_k,
    batch,
    causal,
    softmax_scale,
    window,
    softcap,
    return_lse,
    lse_shape,
    cu_q=None,
    cu_k=None,
    seqlens_k=None,
    block_table=None,
    capacity=0,
    num_splits=1,
    config=None,
):
    """Validate, allocate, pick the launch config and launch (plus the LSE merge when splitting the keys).
    mode 0: dense (B, S, H, D); 1: varlen (total, H, D) with cu_seqlens; 2: KV cache with seqlens_k.
    capacity: the most keys a sequence has (mode 2: the cache's; mode 1: max_seqlen_k), which sizes the splits."""
    block_d = _block_d(q)
    out = torch.zeros_like(q) if mode == 1 else torch.empty_like(q)
    lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None
    empty_lse = q.new_empty((0,), dtype=torch.float32)
    if out.numel() == 0 or batch == 0 or seqlen_q == 0:
        return out, lse if lse is not None else empty_lse
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    group = hq // hkv
    block_m, block_n, warps, stages = _config(q.device, block_d, seqlen_q * group, config)
    grid_m = triton.cdiv(seqlen_q * group, block_m)
    split_size = 0
    if (
        mode == 0 or capacity <= 0
    ):  # dense, or no keys anywhere (an empty cache, max_seqlen_k = 0): one program each
        num_splits = 1
    else:
        if num_splits == 0:
            num_splits = choose_num_splits(q.device, grid_m * batch * hkv, capacity, block_n)
        num_splits = max(1, min(num_splits, triton.cdiv(capacity, block_n)))
        split_size = triton.cdiv(triton.cdiv(capacity, num_splits), block_n) * block_n
        num_splits = triton.cdiv(capacity, split_size)
    left, right = window
    if causal:
        right = 0
    split = num_splits > 1
    # Partial rows per split: (B, Hq, Sq), or varlen's (1, Hq, total_q)
    part_b, part_s = (1, q.shape[0]) if mode == 1 else (batch, seqlen_q)
    if split:
        out_part = torch.empty(num_splits, part_b, hq, part_s, d, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(num_splits, part_b, hq, part_s, dtype=torch.float32, device=q.device)
    else:
        out_part = lse_part = out  # unused
    # Strides (batch, token, head); varlen tensors have no batch dimension (offsets come from cu_seqlens).
    q_s, k_s, v_s, o_s = ([0, *t.stride()[:2]] if mode == 1 else list(t.stride()[:3]) for t in (q, k, v, out))
    l_s = ([0, lse.stride(0)] if mode == 1 else list(lse.stride()[:2])) if lse is not None else [0, 0]
    dummy = out
    _attn_fwd_kernel[(grid_m * batch * hkv * num_splits,)](
        q, k, v, out, lse if lse is not None else dummy, out_part, lse_part,
        cu_q if cu_q is not None else dummy, cu_k if cu_k is not None else dummy,
        seqlens_k if seqlens_k is not None else dummy, block_table if block_table is not None else dummy,
        *q_s, *k_s, *v_s, *o_s, *l_s, block_table.stride(0) if block_table is not None else 0,
        seqlen_q, seqlen_k, batch, hkv, d,
        softmax_scale, softcap if softcap > 0 else 1.0, left, right, split_size, q.shape[0] if mode == 1 else 0,
        GROUP=group, MODE=mode, PAGED=block_table is not None,
        PAGE_SIZE=k.shape[1] if block_table is not None else 1,
        USE_SOFTCAP=softcap > 0, SPLIT=split, WRITE_LSE=lse is not None and not split,
        IEEE_DOT=q.dtype == torch.float32, EVEN_D=d == block_d, EDGE_LOOPS=seqlen_q * group > 64 and block_d <= 128,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if split:
        rows = part_b * hq * part_s
        _combine_kernel[(rows,)](
            out, lse if lse is not None else dummy, out_part, lse_part,
            *o_s, rows, hq, part_s, num_splits, d, cu_q[-1:] if mode == 1 else dummy,
            VARLEN=mode == 1, WRITE_LSE=lse is not None, SPLITS_P2=max(2, triton.next_power_of_2(num_splits)),
            BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out, lse if lse is not None else empty_lse


def attention_dense(q, k, v, causal, softmax_scale, window, softcap, return_lse, config=None):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (out, lse (B, Hq, Sq) or empty). `config` overrides the
    table entry (tuner, tests)."""
    B, Sq, Hq, _ = q.shape
    return _forward(q, k, v, mode=0, seqlen_q=Sq, seqlen_k=k.shape[1], batch=B, causal=causal,
                    softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse,
                    lse_shape=(B, Hq, Sq), config=config)  # fmt: skip


def attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window, softcap,
                     return_lse, num_splits=0, config=None):  # fmt: skip
    """q (total_q, Hq, D), k/v (total_k, Hkv, D) -> (out, lse (Hq, total_q) or empty). num_splits: split-KV factor
    (each sequence's keys in that many pieces of ~max_seqlen_k / num_splits, merged by their LSE), 0 = chosen from
    the work and max_seqlen_k: decode-sized batches of a few sequences split, prefill-sized ones do not."""
    total_q, Hq, _ = q.shape
    return _forward(q, k, v, mode=1, seqlen_q=max_seqlen_q, seqlen_k=0, batch=cu_q.shape[0] - 1, causal=causal,
                    softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse,
                    lse_shape=(Hq, total_q), cu_q=cu_q, cu_k=cu_k, capacity=max_seqlen_k, num_splits=num_splits,
                    config=config)  # fmt: skip


def attention_kvcache(q, k_cache, v_cache, seqlens_k, block_table, causal, softmax_scale, window, softcap,
                      return_lse, num_splits, config=None):  # fmt: skip
    """q (B, Sq, Hq, D) over the first seqlens_k[b] keys of each cache (new tokens already appended).
    num_splits: split-KV factor, 0 = chosen from the cache capacity."""
    B, Sq, Hq, _ = q.shape
    if block_table is not None:
        page = k_cache.shape[1]
        if page & (page - 1):
            raise ValueError(f"the Triton paged kernel needs a power-of-two block_size, got {page}")
        capacity = block_table.shape[1] * page
    else:
        capacity = k_cache.shape[1]
    return _forward(q, k_cache, v_cache, mode=2, seqlen_q=Sq, seqlen_k=capacity, batch=B, causal=causal,
                    softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse,
                    lse_shape=(B, Hq, Sq), seqlens_k=seqlens_k.to(torch.int32), block_table=block_table,
                    capacity=capacity, num_splits=num_splits, config=config)  # fmt: skip
