// Packed int4/int8 weights -> dense (code - zero) * scale in fp32 / fp16 / bf16, on the CPU, in one pass.
//
// Why: at prefill-sized M a quantized linear is compute-bound, and the fastest way to run it on a CPU is the
// BLAS's own GEMM (oneDNN / MKL, on AMX tiles where the CPU has them) on a weight dequantized once per call: the
// fused kernels decode each weight again for every block of activation rows (bench/NOTES.md, "Session 15").
// The CPU quant_matmul (flashquant.quant) switches to this + F.linear from a measured M on; the same idea as the
// Triton launcher's dequantize + cuBLAS (src/flashquant/kernels/dequantize.py).
//
// Bit for bit what reference.quant.dequantize_ref(...).to(dtype) computes: (code - zero) is an exact integer in
// fp32, multiplied by the fp32 scale (one rounding) and rounded once, to nearest-even, to the output dtype.
#include "cpu/quant_gemv.h"
#include "cpu/simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace flashquant::cpu {
namespace {

struct Rows {
  const uint8_t* q;      // packed codes, row n at q + n * row_bytes
  int64_t row_bytes, K, G, group_size;
  const float* scales;   // (N, G)
  const float* zeros;    // (N, G) or nullptr => default_zero
  float default_zero;
};

template <int BITS>
inline int code_at(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 8) {
    return row[k];
  } else {
    const uint8_t b = row[k >> 1];
    return (k & 1) ? (b >> 4) : (b & 0xF);
  }
}

template <typename T>
inline T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return T(v);  // c10::Half / c10::BFloat16: round to nearest even, as torch's .to(dtype)
  }
}

// Portable path, and the tails of the SIMD one: codes [k0, k1) of one group of one row.
template <int BITS, typename T>
inline void decode_scalar(const uint8_t* row, int64_t k0, int64_t k1, float zero, float scale, T* out) {
  for (int64_t k = k0; k < k1; ++k) out[k] = from_float<T>((static_cast<float>(code_at<BITS>(row, k)) - zero) * scale);
}

#ifdef FLASHQUANT_X86
#define FLASHQUANT_DEQ_TARGET __attribute__((target("avx2,fma,f16c")))

// 8 fp32 values -> 8 outputs of type T at out (round to nearest even, like the scalar path).
template <typename T>
FLASHQUANT_DEQ_TARGET inline void store8(__m256 v, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(out, v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    // bf16 = the high half of the fp32 bits after adding 0x7fff + (the kept half's lowest bit): round to nearest
    // even. The values are finite (finite codes and scales), so the NaN case of c10::BFloat16 never arises.
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    // 32-bit lanes holding 16-bit values -> 8 packed uint16 (packus works per 128-bit half, hence the permute)
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
  }
}

// Codes [k0, k1) of one group: 16 at a time, then the tail. int4 needs an even k0 (byte-aligned); callers check.
template <int BITS, typename T>
FLASHQUANT_DEQ_TARGET void decode_avx2(const uint8_t* row, int64_t k0, int64_t k1, float zero, float scale, T* out) {
  const __m256 z = _mm256_set1_ps(zero), s = _mm256_set1_ps(scale);
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    __m128i codes;  // 16 codes, in k order, one per byte
    if constexpr (BITS == 8) {
      codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
    } else {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2));
      const __m128i nib = _mm_set1_epi8(0x0F);
      // even k in the low nibbles, odd k in the high ones: interleave them back into k order
      codes = _mm_unpacklo_epi8(_mm_and_si128(b, nib), _mm_and_si128(_mm_srli_epi16(b, 4), nib));
    }
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
    store8(_mm256_mul_ps(_mm256_sub_ps(lo, z), s), out + k);  // no FMA: (code - zero) * scale rounds once
    store8(_mm256_mul_ps(_mm256_sub_ps(hi, z), s), out + k + 8);
  }
  decode_scalar<BITS>(row, k, k1, zero, scale, out);
}
#endif

template <int BITS, typename T>
void decode_rows(const Rows& p, int64_t n0, int64_t n1, T* out, bool simd) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.q + n * p.row_bytes;
    T* dst = out + n * p.K;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t k0 = g * p.group_size, k1 = k0 + p.group_size;
      const float zero = p.zeros ? p.zeros[n * p.G + g] : p.default_zero, scale = p.scales[n * p.G + g];
#ifdef FLASHQUANT_X86
      if (simd && (BITS == 8 || k0 % 2 == 0)) {
        decode_avx2<BITS>(row, k0, k1, zero, scale, dst);
        continue;
      }
#endif
      decode_scalar<BITS>(row, k0, k1, zero, scale, dst);
    }
  }
}

}  // namespace

at::Tensor dequantize_cpu(const at::Tensor& qdata, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                          int64_t bits, int64_t group_size, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "dequantize_cpu: dtype must be float32, float16 or bfloat16, got ", dtype);
  const int64_t K = check_packed_weight("dequantize_cpu", qdata, scales, zeros, bits, group_size);
  const int64_t N = qdata.size(0);
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  const std::optional<at::Tensor> zf =
      zeros ? std::optional<at::Tensor>(zeros->to(at::kFloat).contiguous()) : std::nullopt;
  const at::Tensor q = qdata.contiguous();
  at::Tensor out = at::empty({N, K}, qdata.options().dtype(dtype));
  if (N == 0 || K == 0) return out;
  Rows p{q.data_ptr<uint8_t>(), q.size(1), K, K / group_size, group_size, sf.data_ptr<float>(),
         zf ? zf->data_ptr<float>() : nullptr, static_cast<float>(1 << (bits - 1))};
  const bool simd = simd_enabled();
  // ~64k weights per task: enough to amortise the scheduling, fine enough to balance two to a few dozen threads
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / K);
  auto run = [&](auto* dst) {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      bits == 4 ? decode_rows<4>(p, n0, n1, dst, simd) : decode_rows<8>(p, n0, n1, dst, simd);
    });
  };
  if (dtype == at::kFloat) run(out.data_ptr<float>());
  else if (dtype == at::kHalf) run(out.data_ptr<c10::Half>());
  else run(out.data_ptr<c10::BFloat16>());
  return out;
}

}  // namespace flashquant::cpu
