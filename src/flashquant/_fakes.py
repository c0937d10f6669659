"""Fake (meta) implementations of the C++ op schemas, so torch.compile / opcheck can trace them.
Imported by _ext right after flashquant._C has registered the schemas."""

import torch


@torch.library.register_fake("flashquant::quant_matmul_packed")
def _quant_matmul_packed_fake(x, qdata, scales, zeros, bits, group_size, bias=None):
    return x.new_empty((x.shape[0], qdata.shape[0]))


@torch.library.register_fake("flashquant::dequantize_packed")
def _dequantize_packed_fake(qdata, scales, zeros, bits, group_size, dtype):
    return qdata.new_empty((qdata.shape[0], qdata.shape[1] * (8 // bits)), dtype=dtype)


@torch.library.register_fake("flashquant::dequant_matmul_packed")
def _dequant_matmul_packed_fake(x, qdata, scales, zeros, bits, group_size, chunk_elements, bias=None):
    return x.new_empty((x.shape[0], qdata.shape[0]))


@torch.library.register_fake("flashquant::decode_attention_packed")
def _decode_attention_packed_fake(q, k_cache, v_cache, seqlens_k, block_table, softmax_scale, num_splits):
    return torch.empty_like(q)


@torch.library.register_fake("flashquant::kvcache_attention")
def _kvcache_attention_fake(
    q,
    k_cache,
    v_cache,
    seqlens_k,
    block_table,
    softmax_scale,
    causal,
    window_left,
    window_right,
    softcap,
    num_splits,
    seqstart_k=None,
):
    B, Sq, Hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@torch.library.register_fake("flashquant::varlen_attention")
def _varlen_attention_fake(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    softmax_scale,
    causal,
    window_left,
    window_right,
    softcap,
    num_splits,
):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("flashquant::kvcache_append")
def _kvcache_append_fake(k_cache, v_cache, cache_seqlens, k, v, block_table):
    return None


@torch.library.register_fake("flashquant::rms_norm_rows")
def _rms_norm_rows_fake(x, weight, residual, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))


@torch.library.register_fake("flashquant::rotary_qk")
def _rotary_qk_fake(q, k, positions, inv_freq):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.register_fake("flashquant::silu_mul_rows")
def _silu_mul_rows_fake(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake("flashquant::mse_clip_search")
def _mse_clip_search_fake(w, bits, group_size, symmetric, ratios):
    groups = 1 if group_size == -1 else w.shape[1] // group_size
    return w.new_empty((w.shape[0], groups), dtype=torch.float32)
