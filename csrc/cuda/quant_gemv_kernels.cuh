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
// With split_k > 1, grid.y slices of K write fp32 partials (split_k, M, N) that the caller sums (no atomics);
// every slice writes its partial, even an empty one.
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
constexpr int kMaxM = 16;

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
};
template <>
struct Types<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf162(128, 128)
  static constexpr float kBias = 128.f;
  __device__ static T2 splat(float v) { return __float2bfloat162_rn(v); }
  __device__ static T2 pair(__nv_bfloat16 v) { return __halves2bfloat162(v, v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
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

template <typename T, int BITS, int M_TILES, bool ASYM>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    quant_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qdata, const T* __restrict__ scales,
                      const uint8_t* __restrict__ zeros, void* __restrict__ out, int m_rows, int N, int K,
                      int G, int group_size, int group_shift, int k_per_split) {
  constexpr int kCodes = BITS == 4 ? 32 : 16;  // codes per lane per row: one 16-byte load
  constexpr int kPairs = kCodes / 2;
  constexpr int kStep = 4 * kCodes;  // k per warp step: the 4 lanes of a row group cover it
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int n0 = (blockIdx.x * kWarpsPerBlock + threadIdx.x / 32) * kRowsPerWarp;
  if (n0 >= N) return;  // warp-uniform, so every lane of a live warp reaches each mma.sync
  const int k_begin = blockIdx.y * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
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

  // One warp step at k0. GUARD: the step may run past k_end (only the last step of a slice can), so a lane
  // whose chunk lies past it loads nothing and contributes exact zeros: scale 0 makes its weights 0, and x is 0.
  auto step = [&](int k0, auto guard) {
    constexpr bool GUARD = decltype(guard)::value;
    const int k = k0 + t * kCodes;  // k_begin, k_end and k are multiples of kCodes: chunks are whole
    const bool active = !GUARD || k < k_end;
    const int group = group_shift >= 0 ? k >> group_shift : k / group_size;
    uint32_t a[2][kPairs];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      uint4 packed = make_uint4(0, 0, 0, 0);
      T scale = Types<T>::from_float(0.f);
      int zero = 1 << (BITS - 1);
      if (active) {
        packed = load_streaming(wrow[r] + static_cast<int64_t>(k0) * BITS / 8);
        scale = srow[r][group];
        if constexpr (ASYM) zero = zrow[r][group];
      }
      dequant_chunk<T, BITS>(packed, zero, scale, a[r]);
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
  int k0 = k_begin;
#pragma unroll 2
  for (; k0 + kStep <= k_end; k0 += kStep) step(k0, std::false_type{});
  if (k0 < k_end) step(k0, std::true_type{});

  // C fragment: acc[mt] = {C[g][2t], C[g][2t + 1], C[g + 8][2t], C[g + 8][2t + 1]}, C[n][m] = out[m][n0 + n].
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = n0 + g + (i / 2) * 8, m = mt * 8 + 2 * t + i % 2;
      if (n >= N || m >= m_rows) continue;
      if (gridDim.y == 1) {
        static_cast<T*>(out)[static_cast<int64_t>(m) * N + n] = Types<T>::from_float(acc[mt][i]);
      } else {
        static_cast<float*>(out)[(static_cast<int64_t>(blockIdx.y) * m_rows + m) * N + n] = acc[mt][i];
      }
    }
  }
}

// Grid, K slicing and group indexing of one launch: shared by quant_gemv.cu and the CPU test harness.
struct LaunchConfig {
  unsigned blocks_n;
  int k_per_split, group_shift;
};
template <int BITS>
__host__ __device__ inline LaunchConfig launch_config(const QuantGemvParams& p) {
  constexpr int kStep = BITS == 4 ? 128 : 64;  // k per warp step
  const int rows_per_block = kWarpsPerBlock * kRowsPerWarp;
  LaunchConfig c{};
  c.blocks_n = static_cast<unsigned>((p.N + rows_per_block - 1) / rows_per_block);
  // Whole steps per slice, so that only the last slice of K can end mid-step.
  c.k_per_split = ((p.K + p.split_k - 1) / p.split_k + kStep - 1) / kStep * kStep;
  int shift = 0;
  while ((1 << shift) < p.group_size) ++shift;
  c.group_shift = (1 << shift) == p.group_size ? shift : -1;  // -1: not a power of two, divide
  return c;
}

// Whether the kernel takes these parameters (quant_gemv returns cudaErrorInvalidValue otherwise).
inline bool supported(const QuantGemvParams& p) {
  return p.M >= 1 && p.M <= kMaxM && p.K % 32 == 0 && p.group_size % 32 == 0 && (p.bits == 4 || p.bits == 8) &&
         p.split_k >= 1 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.qdata) % 16 == 0;
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
