// Plain-C++ launch interface of the CUDA kernels: raw pointers and a stream, no torch headers, so the .cu
// files compile with nvcc alone (CI compile check) and the torch glue (ops_cuda.cpp) stays apart.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace flashquant::cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

struct QuantGemvParams {
  const void* x;          // (M, K) activations, row-major, dtype
  const uint8_t* qdata;   // (N, K * bits / 8) packed codes (QuantizedWeight layout), 16-byte aligned rows
  const void* scales;     // (N, G) in dtype
  const uint8_t* zeros;   // (N, G) or nullptr => 2^(bits-1)
  const void* bias;       // (N,) in dtype, added to the fp32 sums before their rounding, or nullptr
  void* out;              // (M, N) dtype
  float* partials;        // split_k > 1: fp32 workspace (split_k, M, N), else unused
  int* tile_counters;     // split_k > 1: (ceil(N / 64),) int32 workspace, zeroed by quant_gemv, else unused
  int M, N, K, G, group_size, bits, split_k;
  DType dtype;
};

// Requirements (checked by the caller): 1 <= M <= 16, K % 32 == 0, group_size % 32 == 0, K < 2^31, split_k >= 1.
// One kernel launch (after a memset of tile_counters when split_k > 1): the split-K sum happens in the kernel.
cudaError_t quant_gemv(const QuantGemvParams& p, cudaStream_t stream);

struct DecodeParams {
  const void* q;             // (B, Hq, D)
  const void* k_cache;       // contiguous (B, S_max, Hkv, D) or paged (num_blocks, block_size, Hkv, D)
  const void* v_cache;
  const int32_t* seqlens_k;  // (B,)
  const int32_t* block_table;  // (B, max_blocks) or nullptr
  void* out;                 // (B, Hq, D) dtype
  float* out_partial;        // (num_splits, B, Hq, D) fp32, when num_splits > 1
  float* lse_partial;        // (num_splits, B, Hq)
  int64_t k_batch_stride, k_row_stride, k_head_stride;  // in elements (batch = block for paged caches)
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int B, Hq, Hkv, D, block_size, max_blocks, split_len, num_splits;
  int capacity;  // keys a sequence's cache can hold: seqlens_k past it are clamped, never read past the cache
  float softmax_scale;
  DType dtype;
};

// D in {64, 128, 256}; Hq / Hkv <= 16; split_len a multiple of 64.
cudaError_t decode_attention(const DecodeParams& p, cudaStream_t stream);

}  // namespace flashquant::cuda
