// Attention of a few new query tokens against a KV cache, on the CPU: declarations shared by ops.cpp and
// kvcache_attention.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace flashquant::cpu {

// q (B, Sq, Hq, D); k_cache / v_cache (B, S_max, Hkv, D) contiguous caches or, with block_table, paged
// (num_blocks, block_size, Hkv, D), any strides but unit stride in D; seqlens_k int32 (B,): keys visible to each
// sequence (the cache length after any append); block_table int32 (B, max_blocks) or nullopt.
// Query row s of sequence b sits at key position seqlens_k[b] - Sq + s (bottom-right aligned) and sees key j
// when j < seqlens_k[b], j <= pos + window_right (causal: window_right = 0) if window_right >= 0, and
// j >= pos - window_left if window_left >= 0. softcap > 0 applies softcap * tanh(s / softcap) to the scaled
// scores. num_splits: how many pieces each (sequence, KV head) splits its keys into (0 = choose from the
// thread count). seqstart_k int (B,) or nullopt, contiguous caches only: sequence b's keys are cache positions
// seqstart_k[b] .. seqstart_k[b] + seqlens_k[b] - 1 (a left-padded batch: the padding's length), key j above being
// position seqstart_k[b] + j. Returns out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) fp32 (natural log; -inf
// and zero output for rows that see no key).
std::tuple<at::Tensor, at::Tensor> kvcache_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                                         const std::optional<at::Tensor>& block_table,
                                                         double softmax_scale, bool causal, int64_t window_left,
                                                         int64_t window_right, double softcap, int64_t num_splits,
                                                         const std::optional<at::Tensor>& seqstart_k);

// The same attention over a packed batch of variable-length sequences (flashquant.attention_varlen): q
// (total_q, Hq, D), k / v (total_k, Hkv, D) with unit stride in D; cu_seqlens_q / cu_seqlens_k (B + 1,) int32 or
// int64, non-decreasing: sequence b is query tokens [cu_seqlens_q[b], cu_seqlens_q[b+1]) and keys
// [cu_seqlens_k[b], cu_seqlens_k[b+1]), its queries bottom-right aligned to its keys as above. Query tokens outside
// every sequence get zeros. Returns out (total_q, Hq, D) in q's dtype and lse (Hq, total_q) fp32.
std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                        double softmax_scale, bool causal, int64_t window_left,
                                                        int64_t window_right, double softcap, int64_t num_splits);

// Writes the new tokens k / v (B, Snew, Hkv, D) into the caches (laid out as above) at positions
// cache_seqlens[b] + t, in place; cache_seqlens int32 (B,) is not changed. Raises, writing nothing, when a position
// lies past a sequence's capacity or a needed block_table entry outside the pool.
void kvcache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                        const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& block_table);

}  // namespace flashquant::cpu
