// Packed int4/int8 weights -> dense (code - zero) * scale in fp32 / fp16 / bf16, on the CPU, in one pass.
//
// Why: at prefill-sized M a quantized linear is compute-bound, and the fastest way to run it on a CPU is the
// BLAS's own GEMM (oneDNN / MKL, on AMX tiles where the CPU has them) on a weight dequantized once per call: the
// fused kernels decode each weight again for every block of activation rows (bench/NOTES.md, "Session 15").
// The CPU quant_matmul (flashquant.quant) switches to dequant_matmul_cpu (chunks of this + at::mm) from a measured M
// on; the same idea as the Triton launcher's dequantize + cuBLAS (src/flashquant/kernels/dequantize.py).
// SIMD: 16 codes per step on AVX2, 32 on AVX-512; portable C++ elsewhere (FLASHQUANT_CPU_SIMD caps it, as for the
// GEMV).
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

#define FLASHQUANT_DEQ512_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))

// 16 fp32 values -> 16 outputs of type T (as store8; vcvtneps2bf16 is not used: it treats denormals as zero).
template <typename T>
FLASHQUANT_DEQ512_TARGET inline void store16(__m512 v, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(out, v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
  }
}

// decode_avx2 on zmm: 32 codes per step (AVX-512 CPUs: twice the codes per instruction).
template <int BITS, typename T>
FLASHQUANT_DEQ512_TARGET void decode_avx512(const uint8_t* row, int64_t k0, int64_t k1, float zero, float scale,
                                            T* out) {
  const __m512 z = _mm512_set1_ps(zero), s = _mm512_set1_ps(scale);
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) {
    __m128i c0, c1;  // codes k..k+15 and k+16..k+31, one per byte
    if constexpr (BITS == 8) {
      c0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
      c1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16));
    } else {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
      const __m128i nib = _mm_set1_epi8(0x0F);
      const __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
      c0 = _mm_unpacklo_epi8(lo, hi);
      c1 = _mm_unpackhi_epi8(lo, hi);
    }
    const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c0));
    const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c1));
    store16(_mm512_mul_ps(_mm512_sub_ps(f0, z), s), out + k);
    store16(_mm512_mul_ps(_mm512_sub_ps(f1, z), s), out + k + 16);
  }
  decode_avx2<BITS>(row, k, k1, zero, scale, out);  // < 32 codes left: 16 at a time, then scalar
}
#endif

// Weight rows [n0, n1) into out, row n at out + (n - out_row0) * K.
template <int BITS, typename T>
void decode_rows(const Rows& p, int64_t n0, int64_t n1, int64_t out_row0, T* out, SimdLevel level) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.q + n * p.row_bytes;
    T* dst = out + (n - out_row0) * p.K;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t k0 = g * p.group_size, k1 = k0 + p.group_size;
      const float zero = p.zeros ? p.zeros[n * p.G + g] : p.default_zero, scale = p.scales[n * p.G + g];
#ifdef FLASHQUANT_X86
      if (level >= SimdLevel::kAvx2 && (BITS == 8 || k0 % 2 == 0)) {  // int4 SIMD loads start on a whole byte
        level >= SimdLevel::kAvx512Vnni ? decode_avx512<BITS>(row, k0, k1, zero, scale, dst)
                                        : decode_avx2<BITS>(row, k0, k1, zero, scale, dst);
        continue;
      }
#endif
      decode_scalar<BITS>(row, k0, k1, zero, scale, dst);
    }
  }
}

// The weight as decode_rows needs it: fp32 scales / zeros, contiguous codes (owned here, so the pointers in rows()
// stay valid while this lives).
struct PackedWeight {
  at::Tensor q, sf;
  std::optional<at::Tensor> zf;
  int64_t N, K, bits, group_size;

  PackedWeight(const char* op, const at::Tensor& qdata, const at::Tensor& scales,
               const std::optional<at::Tensor>& zeros, int64_t bits_, int64_t group_size_)
      : bits(bits_), group_size(group_size_) {
    K = check_packed_weight(op, qdata, scales, zeros, bits, group_size);
    N = qdata.size(0);
    q = qdata.contiguous();
    sf = scales.to(at::kFloat).contiguous();
    if (zeros) zf = zeros->to(at::kFloat).contiguous();
  }

  Rows rows() const {
    return Rows{q.data_ptr<uint8_t>(), q.size(1), K, K / group_size, group_size, sf.data_ptr<float>(),
                zf ? zf->data_ptr<float>() : nullptr, static_cast<float>(1 << (bits - 1))};
  }

  // Rows [r0, r1) of the dequantized weight into dst, (r1 - r0, K) contiguous, of dst's dtype; multithreaded.
  void decode(int64_t r0, int64_t r1, at::Tensor& dst) const {
    if (r1 <= r0 || K == 0) return;
    const Rows p = rows();
    const SimdLevel level = simd_level_enabled();
    // ~64k weights per task: enough to amortise the scheduling, fine enough to balance two to a few dozen threads
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / K);
    auto run = [&](auto* out) {
      at::parallel_for(r0, r1, grain, [&](int64_t n0, int64_t n1) {
        bits == 4 ? decode_rows<4>(p, n0, n1, r0, out, level) : decode_rows<8>(p, n0, n1, r0, out, level);
      });
    };
    const at::ScalarType dtype = dst.scalar_type();
    if (dtype == at::kFloat) run(dst.data_ptr<float>());
    else if (dtype == at::kHalf) run(dst.data_ptr<c10::Half>());
    else run(dst.data_ptr<c10::BFloat16>());
  }
};

void check_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
}

}  // namespace

at::Tensor dequantize_cpu(const at::Tensor& qdata, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                          int64_t bits, int64_t group_size, at::ScalarType dtype) {
  check_dtype("dequantize_cpu", dtype);
  const PackedWeight w("dequantize_cpu", qdata, scales, zeros, bits, group_size);
  at::Tensor out = at::empty({w.N, w.K}, qdata.options().dtype(dtype));
  w.decode(0, w.N, out);
  return out;
}

at::Tensor dequant_matmul_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                              int64_t chunk_elements, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "dequant_matmul_cpu: x must be a 2-D CPU tensor, got ",
              x.sizes(), " on ", x.device());
  check_dtype("dequant_matmul_cpu", x.scalar_type());
  TORCH_CHECK(chunk_elements > 0, "dequant_matmul_cpu: chunk_elements must be positive, got ", chunk_elements);
  const PackedWeight w("dequant_matmul_cpu", qdata, scales, zeros, bits, group_size);
  TORCH_CHECK(x.size(1) == w.K, "dequant_matmul_cpu: x ", x.sizes(), " must have K=", w.K, " columns to match qdata ",
              qdata.sizes());
  check_bias("dequant_matmul_cpu", bias, w.N);
  // In x's dtype, as F.linear takes it; the BLAS adds it to its fp32 sums before their one rounding.
  const std::optional<at::Tensor> b =
      bias ? std::optional<at::Tensor>(bias->to(x.scalar_type()).contiguous()) : std::nullopt;
  at::Tensor out = at::empty({x.size(0), w.N}, x.options());
  if (w.K == 0) return b ? out.copy_(b->expand({x.size(0), w.N})) : out.zero_();
  const int64_t rows = std::max<int64_t>(1, std::min(w.N, chunk_elements / w.K));
  // One chunk buffer per calling thread, kept between calls: a fresh multi-MB tensor per call costs more in page
  // faults than the dequantize itself (a new 32 MB buffer ~7 ms on the AMX Xeon against ~1.5 ms of decode).
  // thread_local so that threads calling quant_matmul at once never share it; bytes, viewed as x's dtype, so a
  // model that mixes dtypes does not reallocate it. It holds at most chunk_elements weights (8 MB of bf16 at the
  // default) per thread that ever took this path.
  thread_local at::Tensor workspace;
  const int64_t item = x.element_size(), need = rows * w.K * item;
  if (!workspace.defined() || workspace.numel() < need) workspace = at::empty({need}, x.options().dtype(at::kByte));
  for (int64_t n0 = 0; n0 < w.N; n0 += rows) {
    const int64_t n1 = std::min(w.N, n0 + rows);
    at::Tensor chunk =
        workspace.narrow(0, 0, (n1 - n0) * w.K * item).view(x.scalar_type()).view({n1 - n0, w.K});
    w.decode(n0, n1, chunk);
    at::Tensor dst = out.narrow(1, n0, n1 - n0);
    if (b)
      at::addmm_out(dst, b->narrow(0, n0, n1 - n0), x, chunk.t());
    else
      at::mm_out(dst, x, chunk.t());
  }
  return out;
}

}  // namespace flashquant::cpu
