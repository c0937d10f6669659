// GQA flash-decoding kernel (one query token per sequence) over a contiguous or paged KV cache, on tensor cores.
//
// Device code only: decode_attention.cu launches it, and tests/cuda_host/ compiles this same header for the CPU
// (one std::thread per CUDA thread, the MMA emulated from the PTX fragment tables) to run it against the
// reference on machines without a GPU. So: PTX only through cuda/ptx.cuh, no static __shared__ arrays,
// warp-uniform shuffles and MMAs.
//
// Grid: grid(p), one block per (sequence, KV head, split of its keys). A block computes all G = Hq / Hkv query
// heads of the group together, so each K/V byte is read once per group. Each of its 4 warps takes every 4th step
// of 16 keys and keeps its own online softmax, combined through shared memory at the end; each split writes its
// normalised partial output and LSE, and combine_kernel merges splits exactly like the Triton path (weights
// exp(lse_i - max)).
//
// Per step, with mma.sync.m16n8k16 (fp32 accumulators) and K/V straight from global memory into registers:
//  * S (16 heads x 8 keys, twice) = Q . K^T: Q (the group's heads, zero rows past G) is the A operand, loaded
//    once; K is B. An MMA sums over k, so any permutation of the head dimension applied to both is harmless:
//    lane (g = lane / 4, t = lane % 4) loads the 16 bytes at dims 32c + 8t of its rows and uses their words as
//    its fragment elements of the MMAs of chunk c (slots 2t, 2t+1 <- dims 8t + 4s, +1; slots 2t+8, 2t+9 <-
//    dims 8t + 4s + 2, +3 in k-step s). B column g of key tile j is key 4 (g / 2) + 2j + g % 2, so that lane t
//    ends up holding the scores of keys 4t .. 4t+3, exactly the P elements it supplies next.
//  * O^T (16 dims x 8 heads) += V^T . P^T: P (rounded to T) is the B operand straight from the S accumulators,
//    no shuffles (slots 2t, 2t+1 <- keys 4t, 4t+1; slots 2t+8, 2t+9 <- keys 4t+2, 4t+3). V^T is A: lane
//    (g, t) loads the 16 bytes at dims 64c + 8g of keys 4t .. 4t+3, and two PRMTs per pair of keys turn them
//    into A rows: M-tile i of chunk c has rows g, g+8 = dims 64c + 8g + 2i, +1. So V needs no shared memory and
//    no transposing load either.
// The online softmax works in base 2 on the fp32 scores; a head's running max lives in the lanes of its S row
// (g) and is shuffled to the lanes that hold its O^T column (t) once per step.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "cuda/launchers.h"
#include "cuda/ptx.cuh"

namespace flashquant::cuda::decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStep = 16;             // keys per warp step: one MMA k-step of P @ V
constexpr int kTile = kWarps * kStep;  // keys per block iteration; split_len is a multiple of it
constexpr int kMaxGroup = 16;          // query heads per KV head: two n8 tiles of O^T
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
// (lo, hi) rounded to T and packed as an MMA fragment register (lo in the lower 16 bits).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    return to_bits(__floats2half2_rn(lo, hi));
  } else {
    return to_bits(__floats2bfloat162_rn(lo, hi));
  }
}

// Output-head tiles of O^T (n8 each) for a group of G query heads.
__host__ __device__ constexpr int head_tiles(int G) { return G <= 8 ? 1 : 2; }
// Shared memory of one block: each warp's unnormalised O (8 * head tiles rows of D floats), running max and sum.
__host__ __device__ constexpr size_t smem_bytes(int G, int D) {
  return static_cast<size_t>(kWarps) * 8 * head_tiles(G) * (D + 2) * sizeof(float);
}

// Whether the kernel takes these parameters (decode_attention returns cudaErrorInvalidValue otherwise). A paged
// cache's block_size must be a multiple of 16, so that the 16 keys of a step share one cache block. G > 8 needs
// two head tiles of accumulators, which at D = 256 would not fit in registers.
inline bool supported(const DecodeParams& p) {
  const int G = p.Hkv > 0 ? p.Hq / p.Hkv : 0;
  return G >= 1 && G <= kMaxGroup && p.Hq % p.Hkv == 0 && p.split_len % kTile == 0 && p.num_splits >= 1 &&
         (p.D == 64 || p.D == 128 || (p.D == 256 && G <= 8)) && (!p.block_table || p.block_size % kStep == 0) &&
         reinterpret_cast<uintptr_t>(p.q) % 16 == 0 &&
         static_cast<int64_t>(p.num_splits) * p.B * p.Hkv <= INT32_MAX;  // grid(p)
}

// decode_kernel's grid, flat on x (up to 2^31 - 1 blocks, split fastest): B * Hkv on grid.y would be capped at
// 65535, which batch 8192 with 8 KV heads already passes.
inline dim3 grid(const DecodeParams& p) {
  return dim3(static_cast<unsigned>(p.num_splits) * static_cast<unsigned>(p.B) * static_cast<unsigned>(p.Hkv));
}

// launch.template operator()<T, D, HEAD_TILES>() for p (supported()): the one place that maps runtime parameters
// to kernel instantiations, for decode_attention.cu and for the CPU test harness alike.
template <typename T, int D, typename Launch>
auto dispatch_tiles(const DecodeParams& p, const Launch& launch) {
  if constexpr (D == 256) {
    return launch.template operator()<T, D, 1>();
  } else {
    return head_tiles(p.Hq / p.Hkv) == 1 ? launch.template operator()<T, D, 1>() : launch.template operator()<T, D, 2>();
  }
}
template <typename T, typename Launch>
auto dispatch_d(const DecodeParams& p, const Launch& launch) {
  if (p.D == 64) return dispatch_tiles<T, 64>(p, launch);
  if (p.D == 128) return dispatch_tiles<T, 128>(p, launch);
  return dispatch_tiles<T, 256>(p, launch);
}
template <typename Launch>
auto dispatch(const DecodeParams& p, const Launch& launch) {
  return p.dtype == DType::kHalf ? dispatch_d<__half>(p, launch) : dispatch_d<__nv_bfloat16>(p, launch);
}

// Element offset of key `pos` of sequence b (head 0) in a cache; for a paged cache, pos's block holds the whole
// 16-key step that pos starts.
__device__ __forceinline__ int64_t row_offset(const DecodeParams& p, int b, int pos, int64_t batch_stride,
                                              int64_t row_stride) {
  if (!p.block_table) return b * batch_stride + static_cast<int64_t>(pos) * row_stride;
  const int blk = p.block_table[static_cast<int64_t>(b) * p.max_blocks + pos / p.block_size];
  return blk * batch_stride + static_cast<int64_t>(pos % p.block_size) * row_stride;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T, int D, int HEAD_TILES>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeParams p) {
  constexpr int kQkChunks = D / 32;  // 16-byte chunks of a Q/K row per lane (32 dims per chunk across 4 lanes)
  constexpr int kPvChunks = D / 64;  // 16-byte chunks of a V row per lane (64 dims per chunk across 8 lanes)
  constexpr int kMTiles = D / 16;    // M-tiles of O^T
  const int split = blockIdx.x % p.num_splits;
  const int bh = blockIdx.x / p.num_splits;
  const int b = bh / p.Hkv, hkv = bh % p.Hkv;
  const int G = p.Hq / p.Hkv;
  const int seqlen = min(p.seqlens_k[b], p.capacity);
  const int start = split * p.split_len;
  const int end = min(seqlen, start + p.split_len);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const uint4 zero4 = make_uint4(0, 0, 0, 0);

  // Q rows g and g + 8 of the group (zeros past G), lane t's 16 bytes of each 32-dim chunk: A fragments.
  const T* q = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.Hq + hkv * G) * D + 8 * t;
  uint4 q_frag[HEAD_TILES][kQkChunks];
#pragma unroll
  for (int h = 0; h < HEAD_TILES; ++h) {
#pragma unroll
    for (int c = 0; c < kQkChunks; ++c) {
      q_frag[h][c] = g + 8 * h < G ? *reinterpret_cast<const uint4*>(q + (g + 8 * h) * D + 32 * c) : zero4;
    }
  }
  const float qk_scale = p.softmax_scale * kLog2e;

  const T* k_cache = static_cast<const T*>(p.k_cache) + hkv * p.k_head_stride;
  const T* v_cache = static_cast<const T*>(p.v_cache) + hkv * p.v_head_stride;
  // The keys this lane loads within a step: K row of key tile j, V rows 4t .. 4t+3.
  const int k_key[2] = {4 * (g / 2) + g % 2, 4 * (g / 2) + 2 + g % 2};

  float o[HEAD_TILES][kMTiles][4] = {};  // O^T: {O[2t][d], O[2t+1][d], O[2t][d+1], O[2t+1][d+1]}, head + 8h
  float m_run[HEAD_TILES], l_run[HEAD_TILES];  // heads g + 8h: running max (log2 units), this lane's sum share
#pragma unroll
  for (int h = 0; h < HEAD_TILES; ++h) m_run[h] = -FLT_MAX, l_run[h] = 0.f;  // finite: no inf - inf

  for (int step = start + warp * kStep; step < end; step += kTile) {  // warp-uniform
    const int64_t k_base = row_offset(p, b, step, p.k_batch_stride, p.k_row_stride);
    const int64_t v_base = row_offset(p, b, step, p.v_batch_stride, p.v_row_stride);
    // Keys past `end` read as zeros (never a stale block_table entry).
    uint4 v_rows[kPvChunks][4];
    auto load_v = [&] {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool valid = step + 4 * t + i < end;
        const T* row = v_cache + v_base + (4 * t + i) * p.v_row_stride + 8 * g;
#pragma unroll
        for (int c = 0; c < kPvChunks; ++c) v_rows[c][i] = valid ? load_streaming(row + 64 * c) : zero4;
      }
    };
    // Every load of the step in flight at once, except at D = 256, where K and V together (128 registers per
    // lane) do not fit beside the accumulators: there V is loaded once the scores no longer need K.
    if constexpr (D <= 128) load_v();
    uint4 k_rows[2][kQkChunks];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const bool valid = step + k_key[j] < end;
      const T* row = k_cache + k_base + k_key[j] * p.k_row_stride + 8 * t;
#pragma unroll
      for (int c = 0; c < kQkChunks; ++c) k_rows[j][c] = valid ? load_streaming(row + 32 * c) : zero4;
    }

    // S = Q . K^T for key tiles j = 0, 1: s[j] = {S[g][4t+2j], S[g][4t+2j+1], S[g+8][4t+2j], S[g+8][4t+2j+1]}.
    float s[2][4] = {};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int c = 0; c < kQkChunks; ++c) {
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          const uint32_t hi0 = HEAD_TILES == 2 ? word(q_frag[HEAD_TILES - 1][c], 2 * ks) : 0u;
          const uint32_t hi1 = HEAD_TILES == 2 ? word(q_frag[HEAD_TILES - 1][c], 2 * ks + 1) : 0u;
          mma_16816<T>(s[j], word(q_frag[0][c], 2 * ks), hi0, word(q_frag[0][c], 2 * ks + 1), hi1,
                       word(k_rows[j][c], 2 * ks), word(k_rows[j][c], 2 * ks + 1));
        }
      }
    }

    if constexpr (D > 128) load_v();

    // Online softmax per head (rows g, g + 8), then P fragments and the rescale of O^T.
    uint32_t p_frag[HEAD_TILES][2];
#pragma unroll
    for (int h = 0; h < HEAD_TILES; ++h) {
      float x[4];  // keys 4t .. 4t+3
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        x[i] = step + 4 * t + i < end ? s[i / 2][2 * h + i % 2] * qk_scale : -FLT_MAX;
      }
      float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[h], mx);  // finite: the step has at least one key before `end`
      const float alpha = exp2f(m_run[h] - m_new);
      m_run[h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        x[i] = exp2f(x[i] - m_new);  // masked keys: exp2(-FLT_MAX - m_new) = 0
        sum += x[i];
      }
      l_run[h] = l_run[h] * alpha + sum;
      p_frag[h][0] = pack2<T>(x[0], x[1]);  // B = P^T: slots 2t, 2t+1 <- keys 4t, 4t+1
      p_frag[h][1] = pack2<T>(x[2], x[3]);  //          slots 2t+8, 2t+9 <- keys 4t+2, 4t+3
      // O^T column 2t (2t+1) is head 2t (2t+1) of this tile, whose alpha is in the lanes of row 2t (2t+1).
      const float alpha0 = __shfl_sync(0xffffffffu, alpha, 8 * t);
      const float alpha1 = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        o[h][mt][0] *= alpha0, o[h][mt][1] *= alpha1, o[h][mt][2] *= alpha0, o[h][mt][3] *= alpha1;
      }
    }

    // O^T += V^T . P^T: M-tile (c, i) has rows g, g+8 = dims 64c + 8g + 2i, +1; k slots as in P.
#pragma unroll
    for (int c = 0; c < kPvChunks; ++c) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // word i of key 4t + r's chunk: V[4t + r][dims 64c + 8g + 2i, +1]
        const uint32_t w0 = word(v_rows[c][0], i), w1 = word(v_rows[c][1], i);
        const uint32_t w2 = word(v_rows[c][2], i), w3 = word(v_rows[c][3], i);
        const uint32_t a0 = __byte_perm(w0, w1, 0x5410), a1 = __byte_perm(w0, w1, 0x7632);
        const uint32_t a2 = __byte_perm(w2, w3, 0x5410), a3 = __byte_perm(w2, w3, 0x7632);
#pragma unroll
        for (int h = 0; h < HEAD_TILES; ++h) mma_16816<T>(o[h][4 * c + i], a0, a1, a2, a3, p_frag[h][0], p_frag[h][1]);
      }
    }
  }

  // Combine the warps. Each writes its unnormalised O rows (heads 2t, 2t+1 of each tile; lane g's dims 8g .. 8g+7
  // of every 64-dim chunk) and its running max and sum per head.
  extern __shared__ float smem[];
  constexpr int kHeads = 8 * HEAD_TILES;
  float* o_s = smem;                          // [kWarps][kHeads][D]
  float* m_s = o_s + kWarps * kHeads * D;     // [kWarps][kHeads]
  float* l_s = m_s + kWarps * kHeads;         // [kWarps][kHeads]
#pragma unroll
  for (int h = 0; h < HEAD_TILES; ++h) {
#pragma unroll
    for (int c = 0; c < kPvChunks; ++c) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float* acc = o[h][4 * c + i];
        float* row = o_s + (warp * kHeads + 8 * h + 2 * t) * D + 64 * c + 8 * g + 2 * i;
        *reinterpret_cast<float2*>(row) = make_float2(acc[0], acc[2]);
        *reinterpret_cast<float2*>(row + D) = make_float2(acc[1], acc[3]);
      }
    }
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (t == 0) {
      m_s[warp * kHeads + 8 * h + g] = m_run[h];
      l_s[warp * kHeads + 8 * h + g] = l;
    }
  }
  __syncthreads();

  // A warp that had no keys has m = -FLT_MAX and l = 0, so it gets weight 0 (or, if no warp had any, the split's
  // l is 0: zeros and LSE -inf, as the Triton path gives).
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int head = idx / D, d = idx % D;
    float m = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, m_s[w * kHeads + head]);
    float l = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = exp2f(m_s[w * kHeads + head] - m);
      l += weight * l_s[w * kHeads + head];
      acc += weight * o_s[(w * kHeads + head) * D + d];
    }
    const int hq = hkv * G + head;
    const float out = l > 0.f ? acc / l : 0.f;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[(static_cast<int64_t>(b) * p.Hq + hq) * D + d] = from_f<T>(out);
    } else {
      const int64_t row = (static_cast<int64_t>(split) * p.B + b) * p.Hq + hq;
      p.out_partial[row * D + d] = out;
      if (d == 0) p.lse_partial[row] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
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
