// int4/int8 weight-only GEMV / small-M matmul (M <= 16) for fp16/bf16 activations, on tensor cores.
//
// Computes out^T (N x M) = W (N x K) . x^T (K x M) with mma.sync.m16n8k16 and fp32 accumulators: a warp owns
// 16 output channels (the MMA's 16 A rows) and the M activation rows are B's columns: one n8 tile for
// M <= 8, two for M <= 16. The instructions per weight therefore do not grow with M. (The per-lane FFMA
// version this replaces spent 6.5 SASS instructions per weight at M = 1 and 45 at M = 16 on sm_90a, an
// issue-bound ceiling of ~11% of HBM bandwidth at M = 16; see bench/NOTES.md.)
//
// Layout: an MMA sums over k, so any permutation of k applied to both A and B leaves the result unchanged.
// Lane (g = lane / 4, t = lane % 4) loads the 16 bytes at k = k0 + t * kCodes of rows g and g + 8 (32 int4 or
// 16 int8 codes: one 128-bit load per row), and uses the codes, in the order its dequantization produces
// them, as its A-fragment elements of the next 8 (int4) or 4 (int8) MMAs. It loads x at exactly those k for
// its B fragment (B's column g is activation row g). No shared memory, no shuffles, no offline repacking;
// tests/test_cuda_on_cpu.py runs this kernel on the CPU against the reference (tests/cuda_host/).
//
// Dequantization without int->float conversion instructions:
//  * int4: ((w >> 4s) & 0x000F000F) | magic is the pair (magic + c[s], magic + c[s + 4]) of word w's eight
//    codes, as a half2 (magic 1024 = 0x6400) or bf162 (magic 128 = 0x4300); subtracting magic + zero is exact.
//  * int8, fp16: __byte_perm puts two codes into the low bytes of half2(1024, 1024), exact as above.
//  * int8, bf16: bf16 cannot hold 128 + an 8-bit code, so the codes go through fp32 (byte into the mantissa
//    of 2^23, subtract 2^23 + zero: exact) and are packed to bf162 by one cvt (exact: |code - zero| <= 255).
// (code - zero) is then multiplied by the group scale in the activation dtype: one rounding per weight, the
// rounding dequantize() + F.linear makes too. A lane's 16-byte chunk never straddles a group (group_size is a
// multiple of 32 and chunks start at multiples of 16 or 32 codes), so a lane needs one scale per row per step.
// With split_k > 1, grid.y slices of K write fp32 partials (split_k, M, N), and the last block of each column
// of slices to finish sums them in slice order into the output (deterministic; no second kernel).
// Weight loads run kStepsAhead steps ahead of the math, in a ring of registers (see the main loop).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launchers.h"
#include "cuda/ptx.cuh"

namespace flashquant::cuda::gemv {

constexpr int kWarpsPerBlock = 4;
constexpr int kRowsPerWarp = 16;  // output channels per warp: the MMA's M dimension
constexpr int kRowsPerBlock = kWarpsPerBlock * kRowsPerWarp;
constexpr int kMaxM = 16;
// Steps whose weight loads are in flight while a warp computes one (1 KB of weights each per warp): with ~16
// warps per SM (the split-K target of ops_cuda.cpp), ~48 KB in flight per SM, about what ~3 TB/s needs at
// ~1-2 us of loaded DRAM latency (Little's law, METHOD.md).
constexpr int kStepsAhead = 3;

template <typename T>
struct Types;
template <>
struct Types<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024)
  static constexpr float kBias = 1024.f;
  __device__ static T2 splat(float v) { return __float2half2_rn(v); }
  __device__ static T2 pair(__half v) { return __halves2half2(v, v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static float to_float(__half v) { return __half2float(v); }
};
template <>
struct Types<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf162(128, 128)
  static constexpr float kBias = 128.f;
  __device__ static T2 splat(float v) { return __float2bfloat162_rn(v); }
  __device__ static T2 pair(__nv_bfloat16 v) { return __halves2bfloat162(v, v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// One 16-byte chunk of a row -> its (code - zero) * scale as kCodes / 2 packed pairs, in A-fragment order:
//  int4: out[4p + s] = (c[8p + s], c[8p + s + 4])  for word p = 0..3, s = 0..3
//  int8: out[2p + h] = (c[4p + 2h], c[4p + 2h + 1]) for word p = 0..3, h = 0..1
template <typename T, int BITS>
__device__ __forceinline__ void dequant_chunk(const uint4& packed, int zero, T scale,
                                              uint32_t (&out)[BITS == 4 ? 16 : 8]) {
  using TT = Types<T>;
  using T2 = typename TT::T2;
  const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
  const T2 scale2 = TT::pair(scale);
  if constexpr (BITS == 4) {
    const T2 bias = TT::splat(TT::kBias + zero);  // exact: an integer below 2^11 (fp16) / 2^8 (bf16)
#pragma unroll
    for (int p = 0; p < 4; ++p) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint32_t bits = and_or(words[p] >> (4 * s), 0x000F000Fu, TT::kMagic);
        out[4 * p + s] = to_bits(__hmul2(__hsub2(bits_to<T2>(bits), bias), scale2));
      }
    }
  } else if constexpr (std::is_same_v<T, __half>) {
    const T2 bias = TT::splat(TT::kBias + zero);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      // bytes (c0, 0x64, c1, 0x64) and (c2, 0x64, c3, 0x64): half2(1024 + c0, 1024 + c1), ...
      const uint32_t lo = __byte_perm(words[p], TT::kMagic, 0x7150);
      const uint32_t hi = __byte_perm(words[p], TT::kMagic, 0x7352);
      out[2 * p] = to_bits(__hmul2(__hsub2(bits_to<T2>(lo), bias), scale2));
      out[2 * p + 1] = to_bits(__hmul2(__hsub2(bits_to<T2>(hi), bias), scale2));
    }
  } else {
    const float bias = 8388608.f + zero;  // 2^23 + zero
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(__byte_perm(words[p], 0x4B000000u, 0x7540 | i)) - bias;
      out[2 * p] = to_bits(__hmul2(__floats2bfloat162_rn(v[0], v[1]), scale2));
      out[2 * p + 1] = to_bits(__hmul2(__floats2bfloat162_rn(v[2], v[3]), scale2));
    }
  }
}

// Exact k / d for 0 <= k < 2^31 and 2 <= d < 2^31 with one multiply-high instead of a division (Granlund and
// Montgomery 1994, theorem 4.2 with N = 31): l = ceil(log2 d), magic = floor(2^(31 + l) / d) + 1 < 2^32, and
// k / d = umulhi(k, magic) >> (l - 1). So group sizes that are not powers of two cost no branch or division.
struct GroupDivisor {
  uint32_t magic;
  int shift;
};
__host__ __device__ inline GroupDivisor group_divisor(int d) {
  int l = 0;
  while ((int64_t{1} << l) < d) ++l;
  return {static_cast<uint32_t>((uint64_t{1} << (31 + l)) / static_cast<uint64_t>(d) + 1), l - 1};
}
__host__ __device__ inline int group_of(int k, GroupDivisor div) {
  return static_cast<int>((static_cast<uint64_t>(static_cast<uint32_t>(k)) * div.magic >> 32) >> div.shift);
}

// A warp step's loads from DRAM: the lane's 16-byte chunks of rows g and g + 8, and each row's scale (its bits
// in the low half) and zero point (the high half) in one register: 4 stages of 2 rows are in flight.
struct Stage {
  uint4 packed[2];
  uint32_t scale_zero[2];
};
template <typename T>
__device__ __forceinline__ T from_bits16(uint32_t v) {
  const uint16_t b = static_cast<uint16_t>(v);
  T out;
  __builtin_memcpy(static_cast<void*>(&out), &b, sizeof(out));
  return out;
}

template <typename T, int BITS, int M_TILES, bool ASYM>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    quant_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qdata, const T* __restrict__ scales,
                      const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out,
                      float* __restrict__ partials,
                      int* __restrict__ tile_counters, int m_rows, int N, int K, int G, GroupDivisor group_div,
                      int k_per_split) {
  constexpr int kCodes = BITS == 4 ? 32 : 16;  // codes per lane per row: one 16-byte load
  constexpr int kPairs = kCodes / 2;
  constexpr int kStep = 4 * kCodes;  // k per warp step: the 4 lanes of a row group cover it
  constexpr int kRing = kStepsAhead + 1;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int n0 = (blockIdx.x * kWarpsPerBlock + threadIdx.x / 32) * kRowsPerWarp;
  // Warps past N compute nothing but stay for the split-K barriers below; live is warp-uniform, so every lane of
  // a live warp reaches each mma.sync.
  const bool live = n0 < N;
  const int k_begin = blockIdx.y * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  const int steps = live && k_end > k_begin ? (k_end - k_begin + kStep - 1) / kStep : 0;
  // Rows past N are clamped (their results are never stored); so are B columns past M (activation rows).
  const int64_t rows[2] = {min(n0 + g, N - 1), min(n0 + g + 8, N - 1)};
  const uint8_t* wrow[2];
  const T* srow[2];
  const uint8_t* zrow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    wrow[r] = qdata + rows[r] * (static_cast<int64_t>(K) * BITS / 8) + t * (kCodes * BITS / 8);
    srow[r] = scales + rows[r] * G;
    zrow[r] = ASYM ? zeros + rows[r] * G : nullptr;
  }
  const T* xrow[M_TILES];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) xrow[mt] = x + static_cast<int64_t>(min(mt * 8 + g, m_rows - 1)) * K + t * kCodes;
  float acc[M_TILES][4] = {};

  // Step j's weights, scales and zero points. A lane whose chunk lies at or past k_end (the last step of a slice
  // can end mid-step; steps past the last one are prefetched for nothing) loads nothing and gets scale 0, so its
  // weights are exact zeros. k_begin, k_end and k are multiples of kCodes: chunks are whole.
  auto load = [&](Stage& s, int j) {
    const int k0 = k_begin + j * kStep, k = k0 + t * kCodes;  // wrow[r] already points at the lane's chunk
    const bool active = k < k_end;
    const int group = group_of(k, group_div);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      s.packed[r] = active ? load_streaming(wrow[r] + static_cast<int64_t>(k0) * BITS / 8) : make_uint4(0, 0, 0, 0);
      const uint32_t scale_bits = active ? reinterpret_cast<const uint16_t*>(srow[r])[group] : 0u;  // 0: +0.0
      const uint32_t zero = ASYM ? (active ? zrow[r][group] : 0u) : 1u << (BITS - 1);
      s.scale_zero[r] = scale_bits | zero << 16;
    }
  };
  // Step j on tensor cores, from its loaded stage. x is 0 past k_end too (0 * an inf in x past the slice would
  // be NaN); it is re-read by every warp of the block, so it comes from L1, not DRAM.
  auto compute = [&](const Stage& s, int j) {
    const int k0 = k_begin + j * kStep;
    const bool active = k0 + t * kCodes < k_end;
    uint32_t a[2][kPairs];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      dequant_chunk<T, BITS>(s.packed[r], static_cast<int>(s.scale_zero[r] >> 16), from_bits16<T>(s.scale_zero[r]), a[r]);
    }
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      uint32_t xw[kPairs];  // x[m][k .. k + kCodes) as packed pairs, in k order (B column g = activation row m)
      const uint4* xp = reinterpret_cast<const uint4*>(xrow[mt] + k0);
#pragma unroll
      for (int i = 0; i < kPairs; i += 4) {
        const uint4 v = active ? __ldg(xp + i / 4) : make_uint4(0, 0, 0, 0);
        xw[i] = v.x, xw[i + 1] = v.y, xw[i + 2] = v.z, xw[i + 3] = v.w;
      }
      if constexpr (BITS == 4) {
        // MMA j = 2p + h uses the pairs (c[8p + 2h], c[8p + 2h + 4]) and (c[8p + 2h + 1], c[8p + 2h + 5]), so B
        // takes (x[8p + 2h], x[8p + 2h + 4]) and (x[8p + 2h + 1], x[8p + 2h + 5]) from x's words 4p + h, 4p + h + 2.
#pragma unroll
        for (int p = 0; p < 4; ++p) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t lo = xw[4 * p + h], hi = xw[4 * p + h + 2];
            mma_16816<T>(acc[mt], a[0][4 * p + 2 * h], a[1][4 * p + 2 * h], a[0][4 * p + 2 * h + 1],
                         a[1][4 * p + 2 * h + 1], __byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632));
          }
        }
      } else {
        // MMA j = p uses the pairs (c[4p], c[4p + 1]) and (c[4p + 2], c[4p + 3]): x's words 2p and 2p + 1.
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          mma_16816<T>(acc[mt], a[0][2 * p], a[1][2 * p], a[0][2 * p + 1], a[1][2 * p + 1], xw[2 * p],
                       xw[2 * p + 1]);
        }
      }
    }
  };

  // Software pipeline in registers: while a warp dequantizes and multiplies step j, the loads of steps
  // j + 1 .. j + kStepsAhead are in flight (a ring of kRing stages, indexed by compile-time constants so that it
  // stays in registers). One step's loads alone (1 KB per warp) left DRAM latency exposed on every step.
  Stage ring[kRing];
#pragma unroll
  for (int s = 0; s < kStepsAhead; ++s) load(ring[s], s);
  for (int j0 = 0; j0 < steps; j0 += kRing) {
#pragma unroll
    for (int s = 0; s < kRing; ++s) {
      if (j0 + s < steps) {
        load(ring[(s + kStepsAhead) % kRing], j0 + s + kStepsAhead);
        compute(ring[s], j0 + s);
      }
    }
  }

  // C fragment: acc[mt] = {C[g][2t], C[g][2t + 1], C[g + 8][2t], C[g + 8][2t + 1]}, C[n][m] = out[m][n0 + n].
  // Split K: every slice writes its fp32 partial (even an empty one); the block that finishes a column of
  // slices last (tile_counters, zeroed before the launch) sums them in slice order, so the result does not
  // depend on which block that is, and writes the output: no second kernel, no atomics on the data. The bias is
  // added to the fp32 sum where the output is written (one rounding, no second pass over the output).
  const bool split = gridDim.y > 1;
  if (live) {
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int n = n0 + g + (i / 2) * 8, m = mt * 8 + 2 * t + i % 2;
        if (n >= N || m >= m_rows) continue;
        if (split) {
          partials[(static_cast<int64_t>(blockIdx.y) * m_rows + m) * N + n] = acc[mt][i];
        } else {
          const float b = bias ? Types<T>::to_float(bias[n]) : 0.f;
          out[static_cast<int64_t>(m) * N + n] = Types<T>::from_float(acc[mt][i] + b);
        }
      }
    }
  }
  if (!split) return;
  __threadfence();  // this block's partials are visible device-wide before its arrival is counted
  __syncthreads();
  const bool last = __syncthreads_or(threadIdx.x == 0 &&
                                     atomicAdd(tile_counters + blockIdx.x, 1) == static_cast<int>(gridDim.y) - 1);
  if (!last) return;
  const int n_base = blockIdx.x * kRowsPerBlock;
  for (int i = threadIdx.x; i < kRowsPerBlock * m_rows; i += kWarpsPerBlock * 32) {
    const int n = n_base + i % kRowsPerBlock, m = i / kRowsPerBlock;
    if (n >= N) continue;
    float sum = bias ? Types<T>::to_float(bias[n]) : 0.f;
    for (int slice = 0; slice < static_cast<int>(gridDim.y); ++slice) {
      sum += __ldcg(partials + (static_cast<int64_t>(slice) * m_rows + m) * N + n);  // L2: other SMs wrote them
    }
    out[static_cast<int64_t>(m) * N + n] = Types<T>::from_float(sum);
  }
}

// Grid, K slicing and group indexing of one launch: shared by quant_gemv.cu and the CPU test harness.
struct LaunchConfig {
  unsigned blocks_n;
  int k_per_split;
  GroupDivisor group_div;
};
template <int BITS>
__host__ __device__ inline LaunchConfig launch_config(const QuantGemvParams& p) {
  constexpr int kStep = BITS == 4 ? 128 : 64;  // k per warp step
  LaunchConfig c{};
  c.blocks_n = static_cast<unsigned>((p.N + kRowsPerBlock - 1) / kRowsPerBlock);
  // Whole steps per slice, so that only the last slice of K can end mid-step.
  c.k_per_split = ((p.K + p.split_k - 1) / p.split_k + kStep - 1) / kStep * kStep;
  c.group_div = group_divisor(p.group_size);
  return c;
}

// Whether the kernel takes these parameters (quant_gemv returns cudaErrorInvalidValue otherwise).
inline bool supported(const QuantGemvParams& p) {
  return p.M >= 1 && p.M <= kMaxM && p.K % 32 == 0 && p.group_size % 32 == 0 && (p.bits == 4 || p.bits == 8) &&
         p.split_k >= 1 && (p.split_k == 1 || (p.partials && p.tile_counters)) &&
         reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.qdata) % 16 == 0;
}

// launch.template operator()<T, BITS, M_TILES, ASYM>() for p (supported()): the one place that maps runtime
// parameters to kernel instantiations, for quant_gemv.cu and for the CPU test harness alike. Template arguments
// keep each instantiation branch-free: one n8 tile of activation rows or two, zero points or none.
template <typename T, int BITS, typename Launch>
auto dispatch_tiles(const QuantGemvParams& p, const Launch& launch) {
  if (p.zeros) {
    return p.M <= 8 ? launch.template operator()<T, BITS, 1, true>() : launch.template operator()<T, BITS, 2, true>();
  }
  return p.M <= 8 ? launch.template operator()<T, BITS, 1, false>() : launch.template operator()<T, BITS, 2, false>();
}
template <typename Launch>
auto dispatch(const QuantGemvParams& p, const Launch& launch) {
  if (p.dtype == DType::kHalf) {
    return p.bits == 4 ? dispatch_tiles<__half, 4>(p, launch) : dispatch_tiles<__half, 8>(p, launch);
  }
  return p.bits == 4 ? dispatch_tiles<__nv_bfloat16, 4>(p, launch) : dispatch_tiles<__nv_bfloat16, 8>(p, launch);
}

}  // namespace flashquant::cuda::gemv
