"""Fused attention: :func:`attention`, :func:`attention_varlen`, :func:`attention_with_kvcache`.

Layouts follow flash-attn: q (batch, seqlen, heads, head_dim). Masking semantics (bottom-right causal
alignment, sliding window, softcap, empty rows -> zeros with lse = -inf) are defined once, in
:mod:`flashquant.reference.attention`. Forward only (inference): there is no backward.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import _dispatch
from ._checks import (
    FLOAT_DTYPES,
    check_last_dim_contiguous,
    check_same_device,
    check_shape,
    check_tensor,
    check_window,
)
from .reference import attention as ref

__all__ = ["attention", "attention_varlen", "attention_with_kvcache"]

INDEX_DTYPES = (torch.int32,)


def _lse_out(lse: torch.Tensor | None, return_lse: bool, like: torch.Tensor) -> torch.Tensor:
    """The ops always return an lse tensor (custom ops need a fixed output arity): the real one when asked
    for, else an empty fp32 placeholder."""
    return lse if return_lse and lse is not None else like.new_empty((0,), dtype=torch.float32)


# ---- validation -----------------------------------------------------------------------------------------
def _check_qkv(q, k, v, q_ndim: int, k_what: str):
    check_tensor("q", q, ndim=q_ndim, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=q_ndim, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=q_ndim, dtypes=FLOAT_DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    check_shape("v", v, tuple(k.shape), k_what)
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"k must have head_dim D={d} like q {tuple(q.shape)}, got k {tuple(k.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads Hq={hq} must be a multiple of the number of KV heads "
            f"Hkv={hkv} (q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)


def _scalars(q, softmax_scale, window_size, softcap):
    left, right = check_window(window_size)
    if not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0 disables it), got {softcap!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    elif not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale), left, right, float(softcap)


def _check_cu_seqlens(name: str, cu: torch.Tensor, batch: int | None, total: int, max_seqlen: int) -> None:
    check_tensor(name, cu, ndim=1, dtypes=INDEX_DTYPES)
    if cu.shape[0] < 1 or (batch is not None and cu.shape[0] != batch + 1):
        raise ValueError(f"{name} must have shape (batch + 1,), got {tuple(cu.shape)}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen_{name[-1]} must be an int >= 0, got {max_seqlen!r}")
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():  # device tensors would need a host sync
        c = cu.tolist()
        if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] > total:
            raise ValueError(f"{name} must start at 0, be non-decreasing and end <= {total}, got {c}")
        # The Triton kernel sizes its grid from the bound: a longer sequence would lose rows.
        longest = max((b - a for a, b in zip(c, c[1:])), default=0)
        if longest > max_seqlen:
            raise ValueError(
                f"max_seqlen_{name[-1]}={max_seqlen} is below the longest sequence in {name} ({longest})"
            )


# ---- PyTorch backend ------------------------------------------------------------------------------------
def _sdpa(q, k, v, attn_mask, scale, is_causal=False):
    """PyTorch's SDPA on (B, S, H, D) tensors. fp16 on CPUs runs in fp32 (rounded once at the end): PyTorch's CPU
    kernels have no fp16 arithmetic and took 1.6-2.6x the fp32 time (causal, 32/8 heads, D = 128, S = 128-2048, on
    the AMD EPYC machine; bench/NOTES.md, "Session 24")."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.float16:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2).to(dtype)


def _dense_attention_torch(q, k, v, causal, left, right, scale, softcap, return_lse):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D): the PyTorch path of attention / attention_varlen."""
    if (
        (causal or right == 0)
        and left < 0
        and q.shape[1] == k.shape[1]
        and q.numel() * k.numel() > 0
        and softcap == 0
        and not return_lse
    ):
        # Square causal: SDPA's is_causal (top-left aligned, the same as ours when Sq == Sk) lets its kernels skip
        # the blocks above the diagonal, which a bool mask does not (S = 2048 on the AMD CPU: 1.6-1.75x faster).
        return _sdpa(q, k, v, None, scale, is_causal=True), _lse_out(None, False, q)
    mask = _dense_mask(q.shape[1], k.shape[1], causal, left, right, q.device)
    return _masked_attention_torch(q, k, v, mask, scale, softcap, return_lse)


def _masked_attention_torch(q, k, v, mask, scale, softcap, return_lse):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), mask None or bool broadcastable to (B, Sq, Sk)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if q.numel() == 0 or Sk == 0:
        return torch.zeros_like(q), q.new_full((B, Hq, Sq), float("-inf"), dtype=torch.float32)
    if softcap == 0 and not return_lse:
        attn_mask = None if mask is None else mask[:, None] if mask.dim() == 3 else mask
        out = _sdpa(q, k, v, attn_mask, scale)
        if mask is not None:  # rows with no visible key: zeros, never NaN
            empty = ~mask.any(-1)  # (Sq,) or (B, Sq)
            out = out.masked_fill(empty[..., None, None], 0)
        return out, _lse_out(None, False, q)
    # softcap / lse: explicit fp32 math, query heads grouped per KV head (no K/V repeat), chunked over Sq.
    G = Hq // Hkv
    kf = k.float().permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, Sk, D)
    vf = v.float().permute(0, 2, 1, 3)[:, :, None]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    chunk = max(1, (1 << 26) // max(1, B * Hq * Sk))
    for s0 in range(0, Sq, chunk):
        s1 = min(Sq, s0 + chunk)
        qg = q[:, s0:s1].float().reshape(B, s1 - s0, Hkv, G, D).permute(0, 2, 3, 1, 4)
        s = (qg @ kf.transpose(-1, -2)) * scale  # (B, Hkv, G, sq, Sk)
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if mask is not None:
            m = mask[..., s0:s1, :] if mask.dim() == 3 else mask[s0:s1][None]
            s = s.masked_fill(~m[:, None, None], float("-inf"))
        lse_c = torch.logsumexp(s, dim=-1)
        p = torch.nan_to_num(torch.exp(s - lse_c[..., None]), nan=0.0)
        o = p @ vf  # (B, Hkv, G, sq, D)
        out[:, s0:s1] = o.permute(0, 3, 1, 2, 4).reshape(B, s1 - s0, Hq, D).to(q.dtype)
        lse[:, :, s0:s1] = lse_c.reshape(B, Hq, s1 - s0)
    return out, _lse_out(lse, return_lse, q)


def _dense_mask(sq, sk, causal, left, right, device):
    if not causal and left < 0 and right < 0:
        return None
    return ref.visible(sq, sk, causal, (left, right), device)


def append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table=None, *, backend: str = "auto") -> None:
    """Write new tokens k/v (B, Snew, Hkv, D) at positions ``cache_seqlens[b] + t`` of the caches, in place,
    without a host sync. Caches: contiguous (B, S_max, Hkv, D) or, with block_table (B, max_blocks) int32, paged
    (num_blocks, block_size, Hkv, D), in k's dtype; cache_seqlens (B,) int32. :func:`attention_with_kvcache`
    does this itself when given k and v. backend: "triton" (one kernel for k and v; "auto" on CUDA), "cpu" (a C++
    row copy; "auto" on CPUs) or "torch" (indexing, 6-10 ATen ops). Positions past the cache are the caller's
    error, unchecked on CUDA (a host sync): PyTorch's indexing and the C++ copy raise on them (the C++ copy before
    writing anything), the Triton kernel leaves them unwritten."""
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    B, _, hkv, D = k.shape
    check_tensor("v", v, ndim=4, dtypes=(k.dtype,))
    check_shape("v", v, tuple(k.shape), "like k")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, ndim=4, dtypes=(k.dtype,))
        rows = None if block_table is not None else B  # paged: (num_blocks, block_size, Hkv, D)
        check_shape(
            name, cache, (rows, None, hkv, D), f"({'num_blocks' if rows is None else 'B'}, *, Hkv, D)"
        )
        check_last_dim_contiguous(name, cache)
    check_shape("v_cache", v_cache, tuple(k_cache.shape), "like k_cache")
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=INDEX_DTYPES)
    check_shape("cache_seqlens", cache_seqlens, (B,), "(B,)")
    if block_table is not None:
        check_tensor("block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
        check_shape("block_table", block_table, (B, None), "(B, max_blocks)")
    device = check_same_device(
        k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k=k, v=v, block_table=block_table
    )
    name = _dispatch.resolve(
        "append_kv", backend, device, ("triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    )
    _dispatch.call("append_kv", _append_kv_impl, k_cache, v_cache, cache_seqlens, k, v, block_table, name)


def _append_kv_impl(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_table: torch.Tensor | None,
    backend: str,
) -> None:
    if backend == "triton":
        from .kernels.append_kv import append_kv_triton

        append_kv_triton(k_cache, v_cache, cache_seqlens, k, v, block_table)
        return
    if backend == "cpu":
        torch.ops.flashquant.kvcache_append(k_cache, v_cache, cache_seqlens, k, v, block_table)
        return
    B, snew = k.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(snew, device=k.device)  # (B, Snew)
    if block_table is None:
        rows = torch.arange(B, device=k.device)[:, None].expand(B, snew)
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
    else:
        bs = k_cache.shape[1]
        blocks = block_table.long().gather(1, pos // bs)
        k_cache[blocks, pos % bs] = k
        v_cache[blocks, pos % bs] = v


_append_kv_op = torch.library.custom_op(
    "flashquant::append_kv", _append_kv_impl, mutates_args=("k_cache", "v_cache")
)


@_append_kv_op.register_fake
def _(k_cache, v_cache, cache_seqlens, k, v, block_table, backend):
    return None


def _kvcache_torch(
    q, k_cache, v_cache, seqlens_k, block_table, causal, scale, left, right, softcap, return_lse
):
    B, Sq = q.shape[:2]
    if block_table is not None:
        nb, bs = block_table.shape[1], k_cache.shape[1]
        k_all = k_cache[block_table.long()].reshape(B, nb * bs, *k_cache.shape[2:])
        v_all = v_cache[block_table.long()].reshape(B, nb * bs, *v_cache.shape[2:])
    else:
        k_all, v_all = k_cache, v_cache
    sk = k_all.shape[1]
    j = torch.arange(sk, device=q.device)[None, None, :]
    lens = seqlens_k.long()[:, None, None]
    diag = torch.arange(Sq, device=q.device)[None, :, None] + lens - Sq
    mask = j < lens
    if causal:
        right = 0
    if right >= 0:
        mask = mask & (j <= diag + right)
    if left >= 0:
        mask = mask & (j >= diag - left)
    return _masked_attention_torch(q, k_all, v_all, mask, scale, softcap, return_lse)


# ---- custom ops (one per public op; torch.compile traces through them) ---------------------------------
def _attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    return_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    if backend == "reference":
        out, lse = ref.attention_ref(q, k, v, causal, softmax_scale, window, softcap)
        return out, _lse_out(lse, return_lse, q)
    if backend == "triton":
        from .kernels import attention as tri

        return tri.attention_dense(q, k, v, causal, softmax_scale, window, softcap, return_lse)
    if backend == "cpu" and q.numel() > 0 and k.shape[1] > 0:
        # The C++ KV-cache kernel with k / v as a full contiguous cache: Sk keys in every sequence, q the last Sq
        # positions, which is this op's bottom-right alignment. (Nothing to attend: the PyTorch path's zeros.)
        seqlens_k = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32)
        out, lse = torch.ops.flashquant.kvcache_attention(
            q, k, v, seqlens_k, None, softmax_scale, causal, window_left, window_right, softcap, 0
        )
        return out, _lse_out(lse, return_lse, q)
    return _dense_attention_torch(
        q, k, v, causal, window_left, window_right, softmax_scale, softcap, return_lse
    )


_attention_op = torch.library.custom_op("flashquant::attention", _attention_impl, mutates_args=())


def _dense_fake(q, return_lse):
    """Output metadata of the (B, Sq, Hq, D) ops: out like q, lse (B, Hq, Sq) fp32 or the empty placeholder."""
    B, Sq, Hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, Sq) if return_lse else (0,), dtype=torch.float32)


@_attention_op.register_fake
def _(q, k, v, causal, softmax_scale, window_left, window_right, softcap, return_lse, backend):
    return _dense_fake(q, return_lse)


def _attention_varlen_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    return_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    if backend == "reference":
        out, lse = ref.attention_varlen_ref(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window, softcap
        )
        return out, _lse_out(lse, return_lse, q)
    if backend == "triton":
        from .kernels import attention as tri

        return tri.attention_varlen(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            causal,
            softmax_scale,
            window,
            softcap,
            return_lse,
        )
    if backend == "cpu":
        # The C++ KV-cache kernel reading each sequence's keys from the packed k / v (csrc/cpu/kvcache_attention.h).
        out, lse = torch.ops.flashquant.varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left, window_right, softcap, 0
        )
        return out, _lse_out(lse, return_lse, q)
    # PyTorch path: one dense call per sequence (reads cu_seqlens on the host).
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        (qs, qe), (ks, ke) = (cq[b], cq[b + 1]), (ck[b], ck[b + 1])
        if qe == qs:
            continue
        o, lse_b = _dense_attention_torch(
            q[None, qs:qe],
            k[None, ks:ke],
            v[None, ks:ke],
            causal,
            window_left,
            window_right,
            softmax_scale,
            softcap,
            return_lse,
        )
        out[qs:qe] = o[0]
        if return_lse:
            lse[:, qs:qe] = lse_b[0]
    return out, _lse_out(lse, return_lse, q)


_attention_varlen_op = torch.library.custom_op(
    "flashquant::attention_varlen", _attention_varlen_impl, mutates_args=()
)


@_attention_varlen_op.register_fake
def _(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    softmax_scale,
    window_left,
    window_right,
    softcap,
    return_lse,
    backend,
):
    return torch.empty_like(q), q.new_empty(
        (q.shape[1], q.shape[0]) if return_lse else (0,), dtype=torch.float32
    )


def _attention_kvcache_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    block_table: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    return_lse: bool,
    num_splits: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    if backend == "reference":
        out, lse = ref.attention_kvcache_ref(
            q, k_cache, v_cache, cache_seqlens, k, v, block_table, causal, softmax_scale, window, softcap
        )
        return out, _lse_out(lse, return_lse, q)
    seqlens_k = cache_seqlens
    if k is not None and k.shape[1] > 0 and k.shape[2] > 0:
        # Next to the Triton/CUDA attention kernels the append is one Triton kernel, which also writes the new
        # lengths (no separate add launch); next to the C++ CPU kernel a C++ row copy; PyTorch indexing otherwise.
        if backend == "triton" or backend == "cuda" and _dispatch._available("triton"):
            from .kernels.append_kv import append_kv_triton

            seqlens_k = torch.empty(cache_seqlens.shape, dtype=torch.int32, device=cache_seqlens.device)
            append_kv_triton(k_cache, v_cache, cache_seqlens, k, v, block_table, seqlens_k)
        else:
            _append_kv_impl(
                k_cache, v_cache, cache_seqlens, k, v, block_table, "cpu" if backend == "cpu" else "torch"
            )
            seqlens_k = cache_seqlens + k.shape[1]
    if backend == "triton":
        from .kernels import attention as tri

        return tri.attention_kvcache(
            q,
            k_cache,
            v_cache,
            seqlens_k,
            block_table,
            causal,
            softmax_scale,
            window,
            softcap,
            return_lse,
            num_splits,
        )
    if backend == "cpu":
        out, lse = torch.ops.flashquant.kvcache_attention(
            q, k_cache, v_cache, seqlens_k, block_table, softmax_scale, causal, window_left, window_right, softcap,
            num_splits,
        )  # fmt: skip
        return out, _lse_out(lse, return_lse, q)
    if backend == "cuda":
        out = torch.ops.flashquant.decode_attention_packed(
            q[:, 0], k_cache, v_cache, seqlens_k.to(torch.int32), block_table, softmax_scale, num_splits
        )
        return out[:, None], _lse_out(None, False, q)
    return _kvcache_torch(
        q,
        k_cache,
        v_cache,
        seqlens_k,
        block_table,
        causal,
        softmax_scale,
        window_left,
        window_right,
        softcap,
        return_lse,
    )


_attention_kvcache_op = torch.library.custom_op(
    "flashquant::attention_with_kvcache", _attention_kvcache_impl, mutates_args=("k_cache", "v_cache")
)


@_attention_kvcache_op.register_fake
def _(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    k,
    v,
    block_table,
    causal,
    softmax_scale,
    window_left,
    window_right,
    softcap,
    return_lse,
    num_splits,
    backend,
):
    return _dense_fake(q, return_lse)


# ---- public API -----------------------------------------------------------------------------------------
def attention(
    q,
    k,
    v,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size=(-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Multi-/grouped-/multi-query attention, fused (never materialises the Sq x Sk matrix on the kernels).

    Args:
        q: (B, Sq, Hq, D) fp16/bf16 (fp32 too). k, v: (B, Sk, Hkv, D), same dtype/device, Hq % Hkv == 0.
        causal: bottom-right aligned: query i sees key j iff j <= i + Sk - Sq.
        softmax_scale: defaults to 1/sqrt(D).
        window_size: (left, right) sliding window, -1 = unbounded (flash-attn semantics).
        softcap: if > 0, scores become softcap * tanh(scores / softcap).
        return_lse: also return the log-sum-exp of the scaled scores, (B, Hq, Sq) fp32 (-inf for empty rows).
        backend: "auto", "reference", "torch", "triton" or "cpu" (the C++ KV-cache kernel with k / v as the
            cache, fp32 inside; auto picks it on CPUs for decode-sized Sq, the same bound as
            :func:`attention_with_kvcache`'s, e.g. a transformers model's decode step, and SDPA above it).
    Returns:
        out (B, Sq, Hq, D) in q.dtype, or (out, lse) if return_lse.
    """
    _check_qkv(q, k, v, 4, "(B, Sk, Hkv, D)")
    B, Sq, Hq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k must have shape (B={B}, Sk, Hkv, D={D}), got {tuple(k.shape)}")
    device = check_same_device(q=q, k=k, v=v)
    scale, left, right, softcap = _scalars(q, softmax_scale, window_size, softcap)
    grad = _dispatch.needs_grad(q, k, v)
    order = None if device.type == "cuda" else _kvcache_auto_order(device, False, Sq, q.dtype, D)
    name = _dispatch.resolve("attention", backend, device, order, grad=grad)
    out, lse = _dispatch.call(
        "attention",
        _attention_impl,
        q,
        k,
        v,
        bool(causal),
        scale,
        left,
        right,
        softcap,
        bool(return_lse),
        name,
        grad=grad,
    )
    return (out, lse) if return_lse else out


def attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size=(-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over a packed batch of variable-length sequences.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D). cu_seqlens_q / cu_seqlens_k: int32 (batch + 1,) cumulative
    lengths starting at 0 (sequence b is rows cu[b]:cu[b+1]; empty sequences are allowed). max_seqlen_q/k:
    upper bounds on the lengths (max_seqlen_q sizes the Triton launch, max_seqlen_k its split of each sequence's
    keys for decode-sized batches; checked against cu_seqlens on CPU tensors, not on CUDA, where that would need a
    host sync: there a max_seqlen_q below the longest query sequence drops rows, as in flash-attn, while a low
    max_seqlen_k only costs speed; on CPUs max_seqlen_q also picks the backend). Masking as
    in :func:`attention`, per sequence. Query rows outside every sequence (from cu_seqlens_q[-1] on) get zeros.
    backend: "auto", "reference", "torch" (SDPA once per sequence), "triton" or "cpu" (the C++ KV-cache kernel,
    every sequence in one call; auto picks it on CPUs when max_seqlen_q is decode-sized, the bound of
    :func:`attention_with_kvcache`, e.g. continuous batching of decode steps; above it auto runs the decode-sized
    sequences on the kernel and the longer ones, e.g. a chunk of a prompt, with SDPA, in eager mode).
    Returns out (total_q, Hq, D) or (out, lse (Hq, total_q) fp32).
    """
    _check_qkv(q, k, v, 3, "(total_k, Hkv, D)")
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, None, q.shape[0], max_seqlen_q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape[0] - 1, k.shape[0], max_seqlen_k)
    scale, left, right, softcap = _scalars(q, softmax_scale, window_size, softcap)
    grad = _dispatch.needs_grad(q, k, v)
    device = q.device
    order = (
        None
        if device.type == "cuda"
        else _kvcache_auto_order(device, False, max_seqlen_q, q.dtype, q.shape[2])
    )
    name = _dispatch.resolve("attention_varlen", backend, device, order, grad=grad)
    if (
        name == "torch"
        and backend == "auto"
        and device.type == "cpu"
        and not grad
        and _dispatch._available("cpu")
    ):
        # max_seqlen_q is past the kernel's bound, but the batch may mix a prefill chunk with decode steps
        mixed = _varlen_cpu_by_length(
            q, k, v, cu_seqlens_q, cu_seqlens_k, bool(causal), scale, left, right, softcap, bool(return_lse)
        )
        if mixed is not None:
            return mixed if return_lse else mixed[0]
    out, lse = _dispatch.call(
        "attention_varlen",
        _attention_varlen_impl,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        bool(causal),
        scale,
        left,
        right,
        softcap,
        bool(return_lse),
        name,
        grad=grad,
    )
    return (out, lse) if return_lse else out


def _varlen_cpu_by_length(
    q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, left, right, softcap, return_lse
):
    """`auto` on CPUs for a packed batch whose longest query sequence is past cpu_kvcache_max_sq, e.g. a server's
    step that mixes a chunk of a prompt with other sequences' decode tokens: each run of consecutive decode-sized
    sequences is one call of the C++ kernel, each run of longer ones SDPA per sequence (the "torch" path), outputs
    written into one (total_q, Hq, D) tensor. Without it every decode token of such a batch would take its own SDPA
    call (bench/NOTES.md, "Session 31"). Returns None, leaving the batch to the PyTorch path, when no sequence is
    decode-sized or under torch.compile (the runs depend on cu_seqlens_q's values)."""
    if torch.compiler.is_compiling():
        return None
    most = cpu_kvcache_max_sq(q.dtype, q.shape[2])
    cq = cu_seqlens_q.tolist()
    short = [cq[b + 1] - cq[b] <= most for b in range(len(cq) - 1)]  # empty sequences count as short: no work
    if not any(s and cq[b + 1] > cq[b] for b, s in enumerate(short)):
        return None
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    b0 = 0
    while b0 < len(short):
        b1 = b0 + 1
        while b1 < len(short) and short[b1] == short[b0]:
            b1 += 1
        q0, q1 = cq[b0], cq[b1]
        if q1 > q0:
            # rows q0:q1 of q, the run's keys still read from the whole packed k / v at cu_seqlens_k's offsets
            o, lse_run = _attention_varlen_impl(
                q[q0:q1],
                k,
                v,
                cu_seqlens_q[b0 : b1 + 1] - q0,
                cu_seqlens_k[b0 : b1 + 1],
                max(cq[b + 1] - cq[b] for b in range(b0, b1)),
                k.shape[0],
                causal,
                scale,
                left,
                right,
                softcap,
                return_lse,
                "cpu" if short[b0] else "torch",
            )
            out[q0:q1] = o
            if return_lse:
                lse[:, q0:q1] = lse_run
        b0 = b1
    return out, _lse_out(lse, return_lse, q)


# Up to this many new tokens per sequence, `auto` runs attention_with_kvcache on CPUs with the C++ kernel; above it
# (chunked prefill) with SDPA, whose blocked matmuls win once there are many query rows per key. Measured
# (bench/NOTES.md, "CPU decode attention", "Session 17" and "Session 18"; B = 1-4, 2k-8k cached keys, G = 1-8 query
# heads per KV head): in fp32 and fp16 the kernel is 1.03-1.29x the SDPA path at Sq = 16 and 0.81-0.97x at 32; in
# bf16 on CPUs whose torch multiplies bf16 on AMX tiles, 0.91-1.32x at Sq = 8 and 0.59-0.73x at 16, hence the lower
# bound there, unless the kernel multiplies on AMX tiles too (bf16, head_dim % 32 == 0): then 1.5-2.7x at Sq = 48
# and 0.69-1.44x at 64.
CPU_KVCACHE_MAX_SQ = 16
CPU_KVCACHE_MAX_SQ_BF16_AMX = 8
CPU_KVCACHE_MAX_SQ_BF16_AMX_KERNEL = 48


@functools.cache
def _torch_has_amx() -> bool:
    """Whether torch's own CPU matmuls (oneDNN) run bf16 on AMX tiles here: what makes its SDPA path fast in bf16."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def _kernel_has_amx() -> bool:
    """Whether the C++ kernel multiplies bf16 on AMX tiles now (FLASHQUANT_CPU_SIMD can cap it; read per call)."""
    return _dispatch._available("cpu") and torch.ops.flashquant.cpu_simd_level() == "amx_bf16"


def cpu_kvcache_max_sq(dtype: torch.dtype, head_dim: int) -> int:
    """The most new tokens per sequence for which `auto` takes the C++ kernel on CPU tensors of `dtype`."""
    if dtype == torch.bfloat16:
        if head_dim % 32 == 0 and _kernel_has_amx():
            return CPU_KVCACHE_MAX_SQ_BF16_AMX_KERNEL
        if _torch_has_amx():
            return CPU_KVCACHE_MAX_SQ_BF16_AMX
    return CPU_KVCACHE_MAX_SQ


def _kvcache_auto_order(
    device: torch.device, cuda_ok: bool, sq: int, dtype: torch.dtype, head_dim: int
) -> tuple[str, ...]:
    """Backends `auto` tries for attention_with_kvcache. On CUDA, the compiled flash-decoding kernel first where it
    applies. Measured on an H100 (bench/NOTES.md, "First H100 session"), Llama-3-8B heads, bf16: eager at batch
    1-16 with an 8k cache it takes 0.16-0.30 ms a call against Triton's 0.28-0.43 ms (both host-bound there: the
    C++ op launches without Triton's Python launch path); replayed from a CUDA graph the Triton kernel is 1-12%
    faster (0.026 vs 0.030 ms at batch 1), and at B x S >= 256k cached tokens it is 4-14% faster eager too
    (85-92% of HBM bandwidth against 75-82%). Eager small-batch decode is where launch cost dominates a model's
    step, so the CUDA kernel stays first; `backend="triton"` is the choice for large batches. On CPUs, the C++
    kernel for decode-sized Sq (cpu_kvcache_max_sq)."""
    if device.type != "cuda":
        # every bound is at least CPU_KVCACHE_MAX_SQ_BF16_AMX: decode-sized Sq skips the query
        fits = sq <= CPU_KVCACHE_MAX_SQ_BF16_AMX or sq <= cpu_kvcache_max_sq(dtype, head_dim)
        return ("cpu", "torch") if fits else ("torch",)
    return (("cuda",) if cuda_ok else ()) + ("triton", "torch")


def attention_with_kvcache(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    k=None,
    v=None,
    block_table=None,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size=(-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    num_splits: int = 0,
    backend: str = "auto",
):
    """Decoding / chunked prefill against a KV cache, optionally appending new tokens first.

    Args:
        q: (B, Sq, Hq, D) queries of the new tokens.
        k_cache, v_cache: contiguous (B, S_max, Hkv, D), or paged (num_blocks, block_size, Hkv, D) when
            block_table is given (block_size a power of two >= 16 for the Triton kernel, a multiple of 16
            for the CUDA one).
        cache_seqlens: int32 (B,): tokens already in the cache for each sequence.
        k, v: optional (B, Snew, Hkv, D) new tokens, written in place into the caches at positions
            cache_seqlens[b] ... cache_seqlens[b] + Snew - 1 before attending (cache_seqlens is not updated).
        block_table: int32 (B, max_blocks) of cache block indices (paged cache), or None.
        causal: bottom-right aligned over the cache_seqlens[b] + Snew visible keys.
        num_splits: split-KV parallelism of the Triton, CUDA and CPU kernels (0 = choose from the cache capacity,
            on CPUs from the thread count).
        backend: "auto", "reference", "torch", "triton", "cuda" or "cpu" (the C++ kernel for CPU tensors, any
            option; auto picks it for Sq <= cpu_kvcache_max_sq(dtype, D): 16; in bf16 48 where the kernel
            multiplies on AMX tiles (D % 32 == 0), else 8 where torch does).
    Returns:
        out (B, Sq, Hq, D), or (out, lse (B, Hq, Sq) fp32).
    On CUDA the capacity bound (cache_seqlens + Snew <= capacity) is not checked on the host (that would
    need a sync): the kernels clamp each length to the capacity, so they never read past a sequence's cache,
    and the append kernel drops tokens that fall past it (PyTorch's indexing, on the "torch" backend, fails
    with a device-side assert instead).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=INDEX_DTYPES)
    B, Sq, Hq, D = q.shape
    check_shape("v_cache", v_cache, tuple(k_cache.shape), "like k_cache")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache/v_cache must have q's dtype {q.dtype}, got {k_cache.dtype}/{v_cache.dtype}")
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache must have head_dim D={D} like q, got {tuple(k_cache.shape)}")
    if hkv == 0 or Hq % hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of the cache's Hkv={hkv}")
    check_shape("cache_seqlens", cache_seqlens, (B,), "(B,)")
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(
                f"contiguous k_cache must have shape (B={B}, S_max, Hkv, D), got {tuple(k_cache.shape)}"
            )
        capacity = k_cache.shape[1]
    else:
        check_tensor("block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
        if block_table.shape[0] != B:
            raise ValueError(
                f"block_table must have shape (B={B}, max_blocks), got {tuple(block_table.shape)}"
            )
        capacity = block_table.shape[1] * k_cache.shape[1]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    snew = 0
    if k is not None:
        check_tensor("k", k, ndim=4, dtypes=(q.dtype,))
        check_tensor("v", v, ndim=4, dtypes=(q.dtype,))
        check_shape("k", k, (B, None, hkv, D), "(B, Snew, Hkv, D)")
        check_shape("v", v, tuple(k.shape), "like k")
        snew = k.shape[1]
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, t)
    device = check_same_device(
        q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k=k, v=v, block_table=block_table
    )
    if device.type == "cpu" and B > 0 and not torch.compiler.is_compiling():  # data-dependent: eager only
        lens = cache_seqlens.tolist()
        if min(lens) < 0 or max(lens) + snew > capacity:
            raise ValueError(
                f"cache_seqlens + Snew must lie in [0, capacity={capacity}], got cache_seqlens={lens}, "
                f"Snew={snew}"
            )
        if (
            block_table is not None
            and block_table.numel()
            and (int(block_table.min()) < 0 or int(block_table.max()) >= k_cache.shape[0])
        ):
            raise ValueError(f"block_table entries must lie in [0, num_blocks={k_cache.shape[0]})")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    scale, left, right, softcap = _scalars(q, softmax_scale, window_size, softcap)
    group = Hq // hkv
    cuda_ok = (
        Sq == 1
        and left < 0
        and (right < 0 or causal)
        and softcap == 0
        and not return_lse
        and (D in (64, 128) and group <= 16 or D == 256 and group <= 8)
        and (block_table is None or k_cache.shape[1] % 16 == 0)
        and q.dtype in (torch.float16, torch.bfloat16)
    )
    order = _kvcache_auto_order(device, cuda_ok, Sq, q.dtype, D)
    grad = _dispatch.needs_grad(q, k_cache, v_cache, k, v)
    name = _dispatch.resolve("attention_with_kvcache", backend, device, order, grad=grad)
    if name == "cuda" and not cuda_ok:
        raise ValueError(
            "backend='cuda' for attention_with_kvcache supports Sq=1 without window/softcap/lse, fp16/bf16, "
            "head_dim 64/128 with up to 16 query heads per KV head or head_dim 256 with up to 8, and paged "
            f"blocks of a multiple of 16 keys; got Sq={Sq}, window={window_size}, softcap={softcap}, "
            f"return_lse={return_lse}, D={D}, Hq/Hkv={Hq}/{hkv}, dtype={q.dtype}, "
            f"block_size={k_cache.shape[1] if block_table is not None else None}"
        )
    out, lse = _dispatch.call(
        "attention_with_kvcache",
        _attention_kvcache_impl,
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k,
        v,
        block_table,
        bool(causal),
        scale,
        left,
        right,
        softcap,
        bool(return_lse),
        num_splits,
        name,
        grad=grad,
    )
    return (out, lse) if return_lse else out
