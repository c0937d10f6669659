// GQA flash-decoding (one query token per sequence) over a contiguous or paged KV cache.
//
// Grid: (num_splits, B * Hkv). A block owns one KV head of one sequence and one slice of its keys, and
// computes all G = Hq / Hkv query heads of the group together, so each K/V byte is read once per group.
// Per tile of kTile keys: K is staged in shared memory with 16-byte loads, the G x kTile scores are
// computed from shared memory, an online softmax (base 2) updates per-head max/sum, then V is staged and
// accumulated into fp32 per-(head, dim) accumulators. Each split writes its normalised partial output and
// LSE; combine_kernel merges splits exactly like the Triton path (weights exp(lse_i - max)).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "cuda/launchers.h"

namespace flashquant::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 64;  // keys per shared-memory tile
constexpr int kMaxGroup = 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Stage rows [tile_start, tile_start + kTile) of one KV head into smem (zeros past `end`).
template <typename T, int D>
__device__ void load_tile(T* dst, const T* cache, const DecodeParams& p, int b, int hkv, int tile_start, int end,
                          int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  constexpr int kVecsPerRow = D / kVec;
  for (int i = threadIdx.x; i < kTile * kVecsPerRow; i += kThreads) {
    const int j = i / kVecsPerRow, c = (i % kVecsPerRow) * kVec;
    const int pos = tile_start + j;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (pos < end) {
      int64_t base;
      if (p.block_table) {
        const int blk = p.block_table[static_cast<int64_t>(b) * p.max_blocks + pos / p.block_size];
        base = blk * batch_stride + static_cast<int64_t>(pos % p.block_size) * row_stride;
      } else {
        base = b * batch_stride + static_cast<int64_t>(pos) * row_stride;
      }
      val = *reinterpret_cast<const uint4*>(cache + base + hkv * head_stride + c);
    }
    *reinterpret_cast<uint4*>(dst + j * D + c) = val;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeParams p) {
  const int split = blockIdx.x;
  const int b = blockIdx.y / p.Hkv, hkv = blockIdx.y % p.Hkv;
  const int G = p.Hq / p.Hkv;
  const int seqlen = p.seqlens_k[b];
  const int start = split * p.split_len;
  const int end = min(seqlen, start + p.split_len);

  extern __shared__ float smem[];
  float* q_s = smem;                     // [G][D], pre-scaled by softmax_scale * log2(e)
  float* acc_s = q_s + G * D;            // [G][D]
  float* p_s = acc_s + G * D;            // [G][kTile]
  float* m_s = p_s + G * kTile;          // [G]
  float* l_s = m_s + G;                  // [G]
  float* alpha_s = l_s + G;              // [G]
  T* kv_s = reinterpret_cast<T*>(alpha_s + G + 3);  // [kTile][D]; +3 keeps 16-byte alignment for G <= 16

  const T* q = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.Hq + hkv * G) * D;
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    q_s[i] = to_f(q[i]) * p.softmax_scale * kLog2e;
    acc_s[i] = 0.f;
  }
  for (int g = threadIdx.x; g < G; g += kThreads) {
    m_s[g] = -FLT_MAX;  // finite sentinel: exp2(-FLT_MAX - m) underflows to 0 without inf - inf
    l_s[g] = 0.f;
  }
  __syncthreads();

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int tile = start; tile < end; tile += kTile) {
    load_tile<T, D>(kv_s, k_cache, p, b, hkv, tile, end, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
    __syncthreads();
    for (int i = threadIdx.x; i < G * kTile; i += kThreads) {
      const int g = i / kTile, j = i % kTile;
      float s = -FLT_MAX;
      if (tile + j < end) {
        s = 0.f;
        const float* qg = q_s + g * D;
        const T* kj = kv_s + j * D;
#pragma unroll 8
        for (int d = 0; d < D; ++d) s = fmaf(qg[d], to_f(kj[d]), s);
      }
      p_s[i] = s;
    }
    __syncthreads();
    for (int g = warp; g < G; g += kThreads / 32) {  // one warp per head: online softmax update
      float* row = p_s + g * kTile;
      float mx = fmaxf(row[lane], row[lane + 32]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_s[g], mx);
      const float p0 = exp2f(row[lane] - m_new), p1 = exp2f(row[lane + 32] - m_new);
      row[lane] = p0;
      row[lane + 32] = p1;
      float sum = p0 + p1;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane == 0) {
        const float alpha = exp2f(m_s[g] - m_new);
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();
    load_tile<T, D>(kv_s, v_cache, p, b, hkv, tile, end, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += kThreads) {
      const int g = i / D, d = i % D;
      const float* pg = p_s + g * kTile;
      float a = acc_s[i] * alpha_s[g];
#pragma unroll 8
      for (int j = 0; j < kTile; ++j) a = fmaf(pg[j], to_f(kv_s[j * D + d]), a);
      acc_s[i] = a;
    }
    __syncthreads();
  }

  // Masked keys got score -FLT_MAX, so a split whose keys are all masked or absent has l = 0.
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    const int h = hkv * G + g;
    const float l = l_s[g];
    const float o = l > 0.f ? acc_s[i] / l : 0.f;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[(static_cast<int64_t>(b) * p.Hq + h) * D + d] = from_f<T>(o);
    } else {
      const int64_t row = (static_cast<int64_t>(split) * p.B + b) * p.Hq + h;
      p.out_partial[row * D + d] = o;
      if (d == 0) p.lse_partial[row] = l > 0.f ? (m_s[g] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(D) combine_kernel(DecodeParams p) {
  const int64_t row = blockIdx.x;  // over (B, Hq)
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq;
  float m = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) m = fmaxf(m, p.lse_partial[s * rows + row]);
  const float m_safe = m == -INFINITY ? 0.f : m;
  float w_sum = 0.f, o = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float w = __expf(p.lse_partial[s * rows + row] - m_safe);
    w_sum += w;
    o = fmaf(w, p.out_partial[(s * rows + row) * D + threadIdx.x], o);
  }
  static_cast<T*>(p.out)[row * D + threadIdx.x] = from_f<T>(w_sum > 0.f ? o / w_sum : 0.f);
}

template <typename T, int D>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  const int G = p.Hq / p.Hkv;
  const size_t smem = (2 * G * D + G * kTile + 3 * G + 3) * sizeof(float) + kTile * D * sizeof(T);
  auto kernel = decode_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(p.num_splits, p.B * p.Hkv), kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  combine_kernel<T, D><<<p.B * p.Hq, D, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const DecodeParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    case 256: return launch<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t decode_attention(const DecodeParams& p, cudaStream_t stream) {
  const int G = p.Hkv > 0 ? p.Hq / p.Hkv : 0;
  if (G < 1 || G > kMaxGroup || p.Hq % p.Hkv || p.split_len % kTile || p.num_splits < 1) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
  return p.dtype == DType::kHalf ? launch_dtype<__half>(p, stream) : launch_dtype<__nv_bfloat16>(p, stream);
}

}  // namespace flashquant::cuda
