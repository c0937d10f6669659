// The KV-cache append on the CPU: backend="cpu" of flashquant.append_kv, and the append step of
// attention_with_kvcache(backend="cpu"). Each new token's head rows are copied into their slot with memcpy, one
// (sequence, token) row per loop step. PyTorch's indexing does the same with ~8 ATen ops (an arange, the position
// arithmetic, two index_put_) at ~40 us each call for a decode step; this is a few microseconds.
#include "cpu/kvcache_attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>

namespace flashquant::cpu {

void kvcache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                        const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "kvcache_append_cpu: k and v must both be (B, Snew, Hkv, D), "
              "got ", k.sizes(), " and ", v.sizes());
  const int64_t B = k.size(0), snew = k.size(1), Hkv = k.size(2), D = k.size(3);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == Hkv &&
                  k_cache.size(3) == D,
              "kvcache_append_cpu: k_cache and v_cache must both be (*, *, Hkv=", Hkv, ", D=", D, "), got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == k.scalar_type() && v_cache.scalar_type() == k.scalar_type() &&
                  v.scalar_type() == k.scalar_type(),
              "kvcache_append_cpu: caches and new tokens must share one dtype, got k_cache ", k_cache.scalar_type(),
              ", v_cache ", v_cache.scalar_type(), ", k ", k.scalar_type(), ", v ", v.scalar_type());
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "kvcache_append_cpu: k_cache/v_cache need unit stride in head_dim");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B && cache_seqlens.scalar_type() == at::kInt,
              "kvcache_append_cpu: cache_seqlens must be int32 (B=", B, ",), got ", cache_seqlens.scalar_type(), " ",
              cache_seqlens.sizes());
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu() && cache_seqlens.device().is_cpu() &&
                  k.device().is_cpu() && v.device().is_cpu(),
              "kvcache_append_cpu: all tensors must be on the CPU");
  if (k.numel() == 0) return;
  const int64_t block_size = k_cache.size(1);
  int64_t capacity = block_size;
  at::Tensor table;
  if (block_table) {
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == B && block_table->scalar_type() == at::kInt &&
                    block_table->device().is_cpu(),
                "kvcache_append_cpu: block_table must be int32 (B=", B, ", max_blocks) on the CPU, got ",
                block_table->scalar_type(), " ", block_table->sizes());
    table = block_table->contiguous();
    capacity = table.size(1) * block_size;
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "kvcache_append_cpu: a contiguous k_cache must be (B=", B,
                ", S_max, Hkv, D), got ", k_cache.sizes());
  }
  // Rows copy with memcpy, so the new tokens need unit stride in head_dim (strided views of a fused projection
  // output, the usual case, already have it).
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  const at::Tensor lens = cache_seqlens.contiguous();
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  const int32_t* table_ptr = block_table ? table.data_ptr<int32_t>() : nullptr;
  // Every slot is checked before anything is written, so a bad call leaves the caches as they were.
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(len_ptr[b] >= 0 && len_ptr[b] + snew <= capacity, "kvcache_append_cpu: cache_seqlens[", b,
                      "] + Snew = ", len_ptr[b], " + ", snew, " must lie in [0, capacity=", capacity, "]");
    if (!table_ptr) continue;
    for (int64_t j = len_ptr[b] / block_size; j <= (len_ptr[b] + snew - 1) / block_size; ++j) {
      const int32_t blk = table_ptr[b * table.size(1) + j];
      TORCH_CHECK_VALUE(blk >= 0 && blk < k_cache.size(0), "kvcache_append_cpu: block_table[", b, ", ", j, "] = ", blk,
                        " is outside [0, num_blocks=", k_cache.size(0), ")");
    }
  }

  auto* k_dst = static_cast<char*>(k_cache.data_ptr());
  auto* v_dst = static_cast<char*>(v_cache.data_ptr());
  const auto* k_src = static_cast<const char*>(kc.data_ptr());
  const auto* v_src = static_cast<const char*>(vc.data_ptr());
  const int64_t es = k.element_size(), row_bytes = D * es;
  // A (sequence, token) row of Hkv heads is ~2 KB for Llama 3: small work, so large grains (one thread for a
  // decode step; chunked prefills split).
  at::parallel_for(0, B * snew, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / snew, t = r % snew, pos = len_ptr[b] + t;
      const int64_t slot0 = table_ptr ? table_ptr[b * table.size(1) + pos / block_size] : b;
      const int64_t slot1 = table_ptr ? pos % block_size : pos;
      for (int64_t h = 0; h < Hkv; ++h) {
        std::memcpy(k_dst + (slot0 * k_cache.stride(0) + slot1 * k_cache.stride(1) + h * k_cache.stride(2)) * es,
                    k_src + (b * kc.stride(0) + t * kc.stride(1) + h * kc.stride(2)) * es, row_bytes);
        std::memcpy(v_dst + (slot0 * v_cache.stride(0) + slot1 * v_cache.stride(1) + h * v_cache.stride(2)) * es,
                    v_src + (b * vc.stride(0) + t * vc.stride(1) + h * vc.stride(2)) * es, row_bytes);
      }
    }
  });
}

}  // namespace flashquant::cpu
