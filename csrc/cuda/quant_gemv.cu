// int4/int8 weight-only GEMV / small-M matmul (M <= 16) for fp16/bf16 activations.
//
// One warp per output channel n; each lane streams 16-byte (128-bit) chunks of the packed row: 32 int4 or
// 16 int8 codes. Codes become (code - zero) with exponent tricks instead of int->float casts:
//  * int4, fp16: (w & 0x000F000F) | 0x64006400 is the half2 (1024 + c_a, 1024 + c_b); one __hsub2 of
//    (1024 + zero) leaves the exact integers. bf16 uses 0x43004300 (128 + c). Shifting w by 4/8/12 yields the
//    other nibble pairs: a 32-bit word gives k pairs (0,4), (1,5), (2,6), (3,7).
//  * int8: __byte_perm places each code in the low mantissa byte of the float 2^23 (0x4B000000); subtracting
//    2^23 + zero is exact.
// Products accumulate in fp32; the group scale is applied once per 8 codes; lanes reduce with shuffles.
// With split_k > 1 each grid.y slice writes an fp32 partial (M, N) that the caller sums (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/launchers.h"

namespace flashquant::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxM = 16;

template <typename T>
struct Types;
template <>
struct Types<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024)
  static constexpr float kBias = 1024.f;
  __device__ static float2 to_float2(T2 v) { return __half22float2(v); }
  __device__ static T2 from_float(float v) { return __float2half2_rn(v); }
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Types<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf162(128, 128)
  static constexpr float kBias = 128.f;
  __device__ static float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  __device__ static T2 from_float(float v) { return __float2bfloat162_rn(v); }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// 8 int4 codes of one 32-bit word -> (code - zero) as floats, in k order 0..7.
template <typename T>
__device__ __forceinline__ void dequant_int4_word(uint32_t w, typename Types<T>::T2 bias, float (&out)[8]) {
  using TT = Types<T>;
  using T2 = typename TT::T2;
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const uint32_t bits = ((w >> (4 * s)) & 0x000F000Fu) | TT::kMagic;
    const T2 v = *reinterpret_cast<const T2*>(&bits);
    const float2 f = TT::to_float2(__hsub2(v, bias));  // exact small integers
    out[s] = f.x;      // k = s       (low half: bits 4s..4s+3)
    out[s + 4] = f.y;  // k = s + 4   (high half: bits 16+4s..)
  }
}

// 4 int8 codes of one 32-bit word -> (code - zero) as floats, k order 0..3.
__device__ __forceinline__ void dequant_int8_word(uint32_t w, float zero_plus_magic, float (&out)[4]) {
  const uint32_t magic = 0x4B000000u;  // float 2^23: its low mantissa byte holds the code exactly
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t bits = __byte_perm(w, magic, 0x7540 | i);
    out[i] = __uint_as_float(bits) - zero_plus_magic;
  }
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const typename Types<T>::T2* h = reinterpret_cast<const typename Types<T>::T2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Types<T>::to_float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T, int BITS, int M>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    quant_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qdata, const T* __restrict__ scales,
                      const uint8_t* __restrict__ zeros, void* __restrict__ out, int m_rows, int N, int K,
                      int G, int group_size, int k_per_split, int split_k) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (n >= N) return;
  constexpr int kCodesPerChunk = BITS == 4 ? 32 : 16;  // one 16-byte load
  const int k_begin = blockIdx.y * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  const uint8_t* row = qdata + static_cast<int64_t>(n) * (K * BITS / 8);
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;

  for (int k0 = k_begin + lane * kCodesPerChunk; k0 < k_end; k0 += 32 * kCodesPerChunk) {
    const uint4 packed = *reinterpret_cast<const uint4*>(row + k0 * BITS / 8);
    const int g = k0 / group_size;
    const float scale = Types<T>::to_float(scales[static_cast<int64_t>(n) * G + g]);
    const int zero = zeros ? zeros[static_cast<int64_t>(n) * G + g] : (1 << (BITS - 1));
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
      float wv[8];
      int k = 0;
      if constexpr (BITS == 4) {
        dequant_int4_word<T>(words[wi], Types<T>::from_float(Types<T>::kBias + zero), wv);
        k = k0 + wi * 8;
      } else {
        float w4[4];
        dequant_int8_word(words[wi], 8388608.f + zero, w4);
#pragma unroll
        for (int i = 0; i < 4; ++i) wv[i] = w4[i];
        k = k0 + wi * 4;
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m < m_rows) {  // M is the template's row capacity, m_rows the real count
          const T* xm = x + static_cast<int64_t>(m) * K + k;
          float xv[8] = {};
          if constexpr (BITS == 4) {
            load8(xm, xv);
          } else {
            const uint2 raw = *reinterpret_cast<const uint2*>(xm);  // 4 activations
            const typename Types<T>::T2* h = reinterpret_cast<const typename Types<T>::T2*>(&raw);
            const float2 a = Types<T>::to_float2(h[0]), b = Types<T>::to_float2(h[1]);
            xv[0] = a.x; xv[1] = a.y; xv[2] = b.x; xv[3] = b.y;
        }
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < (BITS == 4 ? 8 : 4); ++i) dot = fmaf(wv[i], xv[i], dot);
        acc[m] = fmaf(scale, dot, acc[m]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (m >= m_rows) continue;
      if (split_k == 1) {
        static_cast<T*>(out)[static_cast<int64_t>(m) * N + n] = Types<T>::from_f(acc[m]);
      } else {
        static_cast<float*>(out)[(static_cast<int64_t>(blockIdx.y) * m_rows + m) * N + n] = acc[m];
      }
    }
  }
}

template <typename T, int BITS, int M>
cudaError_t launch_m(const QuantGemvParams& p, cudaStream_t stream) {
  const int k_per_split = (p.K / 32 + p.split_k - 1) / p.split_k * 32;
  const dim3 grid((p.N + kWarpsPerBlock - 1) / kWarpsPerBlock, p.split_k);
  quant_gemv_kernel<T, BITS, M><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(p.x), p.qdata, static_cast<const T*>(p.scales), p.zeros, p.out, p.M, p.N, p.K, p.G,
      p.group_size, k_per_split, p.split_k);
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t launch_bits(const QuantGemvParams& p, cudaStream_t stream) {
  switch (p.M) {  // M is a template argument so the accumulators stay in registers
    case 1: return launch_m<T, BITS, 1>(p, stream);
    case 2: return launch_m<T, BITS, 2>(p, stream);
    case 3: case 4: return launch_m<T, BITS, 4>(p, stream);
    case 5: case 6: case 7: case 8: return launch_m<T, BITS, 8>(p, stream);
    default: return launch_m<T, BITS, kMaxM>(p, stream);
  }
}

}  // namespace

cudaError_t quant_gemv(const QuantGemvParams& p, cudaStream_t stream) {
  if (p.M < 1 || p.M > kMaxM || p.K % 32 || p.group_size % 32 || (p.bits != 4 && p.bits != 8)) {
    return cudaErrorInvalidValue;
  }
  if (p.dtype == DType::kHalf) return p.bits == 4 ? launch_bits<__half, 4>(p, stream) : launch_bits<__half, 8>(p, stream);
  return p.bits == 4 ? launch_bits<__nv_bfloat16, 4>(p, stream) : launch_bits<__nv_bfloat16, 8>(p, stream);
}

}  // namespace flashquant::cuda
