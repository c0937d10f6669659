// GQA flash-decoding kernels (one query token per sequence) over a contiguous or paged KV cache.
//
// Device code only: decode_attention.cu launches these, and tests/cuda_host/ compiles this same header for the
// CPU (one std::thread per CUDA thread) to run it against the reference on machines without a GPU. So: no
// inline PTX, no static __shared__ arrays, warp-uniform shuffles.
//
// Grid: (num_splits, B * Hkv). A block owns one KV head of one sequence and one slice of its keys, and
// computes all G = Hq / Hkv query heads of the group together, so each K/V byte is read once per group.
// Per tile of kTile keys: the G x kTile scores come from K in shared memory, an online softmax (base 2)
// updates per-head max/sum, and V in shared memory is accumulated into fp32 per-(head, dim) accumulators.
// The next tile's global loads are issued into registers before the current tile's math (V during QK and the
// softmax, the next K during PV), so their latency overlaps compute. Each split writes its normalised partial
// output and LSE; combine_kernel merges splits exactly like the Triton path (weights exp(lse_i - max)).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "cuda/launchers.h"

namespace flashquant::cuda::decode {

constexpr int kThreads = 128;
constexpr int kTile = 64;  // keys per shared-memory tile
constexpr int kMaxGroup = 16;
// A K/V row in shared memory spans D + 8 elements: the 16 bytes of padding shift consecutive rows by 4 banks,
// so the QK loop's 16-byte reads of 8 different rows per quarter-warp hit distinct banks (with rows D apart,
// they would all hit the same 4 banks: an 8-way conflict).
constexpr int kRowPad = 8;
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

// Shared memory of one block, in floats before the K/V tile, rounded up so the tile starts 16-byte aligned.
__host__ __device__ constexpr int float_words(int G, int D) { return (2 * G * D + G * kTile + 3 * G + 3) / 4 * 4; }
template <typename T>
__host__ __device__ constexpr size_t smem_bytes(int G, int D) {
  return float_words(G, D) * sizeof(float) + static_cast<size_t>(kTile) * (D + kRowPad) * sizeof(T);
}

// Whether the kernels take these parameters (decode_attention returns cudaErrorInvalidValue otherwise).
inline bool supported(const DecodeParams& p) {
  const int G = p.Hkv > 0 ? p.Hq / p.Hkv : 0;
  return G >= 1 && G <= kMaxGroup && p.Hq % p.Hkv == 0 && p.split_len % kTile == 0 && p.num_splits >= 1 &&
         (p.D == 64 || p.D == 128 || p.D == 256);
}

// launch.template operator()<T, D>() for p's dtype and head_dim (p supported()): the one place that maps runtime
// parameters to kernel instantiations, for decode_attention.cu and for the CPU test harness alike.
template <typename T, typename Launch>
auto dispatch_d(const DecodeParams& p, const Launch& launch) {
  if (p.D == 64) return launch.template operator()<T, 64>();
  if (p.D == 128) return launch.template operator()<T, 128>();
  return launch.template operator()<T, 256>();
}
template <typename Launch>
auto dispatch(const DecodeParams& p, const Launch& launch) {
  return p.dtype == DType::kHalf ? dispatch_d<__half>(p, launch) : dispatch_d<__nv_bfloat16>(p, launch);
}

// The 16-byte vectors of one tile (kTile rows of D elements) that one thread moves.
template <typename T, int D>
struct TileRegs {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kVecsPerRow = D / kVec;
  static constexpr int kCount = kTile * kVecsPerRow / kThreads;
  uint4 v[kCount];
};

// Global -> registers: rows [tile_start, tile_start + kTile) of one KV head (zeros past `end`).
template <typename T, int D>
__device__ __forceinline__ void load_tile(TileRegs<T, D>& regs, const T* cache, const DecodeParams& p, int b,
                                          int hkv, int tile_start, int end, int64_t batch_stride,
                                          int64_t row_stride, int64_t head_stride) {
  using R = TileRegs<T, D>;
#pragma unroll
  for (int i = 0; i < R::kCount; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int j = idx / R::kVecsPerRow, c = (idx % R::kVecsPerRow) * R::kVec;
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
    regs.v[i] = val;
  }
}

// Registers -> the shared-memory tile (row stride D + kRowPad).
template <typename T, int D>
__device__ __forceinline__ void store_tile(T* dst, const TileRegs<T, D>& regs) {
  using R = TileRegs<T, D>;
#pragma unroll
  for (int i = 0; i < R::kCount; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int j = idx / R::kVecsPerRow, c = (idx % R::kVecsPerRow) * R::kVec;
    *reinterpret_cast<uint4*>(dst + j * (D + kRowPad) + c) = regs.v[i];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) decode_kernel(DecodeParams p) {
  constexpr int kStride = D + kRowPad;
  const int split = blockIdx.x;
  const int b = blockIdx.y / p.Hkv, hkv = blockIdx.y % p.Hkv;
  const int G = p.Hq / p.Hkv;
  const int seqlen = p.seqlens_k[b];
  const int start = split * p.split_len;
  const int end = min(seqlen, start + p.split_len);

  extern __shared__ float smem[];
  float* q_s = smem;             // [G][D], pre-scaled by softmax_scale * log2(e)
  float* acc_s = q_s + G * D;    // [G][D]
  float* p_s = acc_s + G * D;    // [G][kTile]
  float* m_s = p_s + G * kTile;  // [G]
  float* l_s = m_s + G;          // [G]
  float* alpha_s = l_s + G;      // [G]
  T* kv_s = reinterpret_cast<T*>(smem + float_words(G, D));  // [kTile][kStride], 16-byte aligned

  const T* q = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.Hq + hkv * G) * D;
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    q_s[i] = to_f(q[i]) * p.softmax_scale * kLog2e;
    acc_s[i] = 0.f;
  }
  for (int g = threadIdx.x; g < G; g += kThreads) {
    m_s[g] = -FLT_MAX;  // finite sentinel: exp2(-FLT_MAX - m) underflows to 0 without inf - inf
    l_s[g] = 0.f;
  }

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  TileRegs<T, D> regs;
  if (start < end) load_tile<T, D>(regs, k_cache, p, b, hkv, start, end, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  for (int tile = start; tile < end; tile += kTile) {
    store_tile<T, D>(kv_s, regs);  // K of this tile
    __syncthreads();               // K (and, the first time, q_s / m_s / l_s) visible
    load_tile<T, D>(regs, v_cache, p, b, hkv, tile, end, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
    for (int i = threadIdx.x; i < G * kTile; i += kThreads) {
      const int g = i / kTile, j = i % kTile;
      float s = -FLT_MAX;
      if (tile + j < end) {
        s = 0.f;
        const float* qg = q_s + g * D;
        const T* kj = kv_s + j * kStride;
#pragma unroll 2
        for (int d = 0; d < D; d += 8) {
          const uint4 kv = *reinterpret_cast<const uint4*>(kj + d);
          const T* kh = reinterpret_cast<const T*>(&kv);
          const float4 q0 = *reinterpret_cast<const float4*>(qg + d);
          const float4 q1 = *reinterpret_cast<const float4*>(qg + d + 4);
          s = fmaf(q0.x, to_f(kh[0]), s);
          s = fmaf(q0.y, to_f(kh[1]), s);
          s = fmaf(q0.z, to_f(kh[2]), s);
          s = fmaf(q0.w, to_f(kh[3]), s);
          s = fmaf(q1.x, to_f(kh[4]), s);
          s = fmaf(q1.y, to_f(kh[5]), s);
          s = fmaf(q1.z, to_f(kh[6]), s);
          s = fmaf(q1.w, to_f(kh[7]), s);
        }
      }
      p_s[i] = s;
    }
    __syncthreads();               // scores complete; K no longer read
    store_tile<T, D>(kv_s, regs);  // V of this tile (waits for its loads, issued before QK)
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
    __syncthreads();  // V and the probabilities visible
    if (tile + kTile < end) {
      load_tile<T, D>(regs, k_cache, p, b, hkv, tile + kTile, end, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
    }
    for (int i = threadIdx.x; i < G * D; i += kThreads) {
      const int g = i / D, d = i % D;
      const float* pg = p_s + g * kTile;
      float a = acc_s[i] * alpha_s[g];
#pragma unroll 4
      for (int j = 0; j < kTile; ++j) a = fmaf(pg[j], to_f(kv_s[j * kStride + d]), a);
      acc_s[i] = a;
    }
    __syncthreads();  // V and p_s free for the next tile
  }
  __syncthreads();  // an empty split skipped the loop: q_s / m_s / l_s initialised by other threads

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

}  // namespace flashquant::cuda::decode
