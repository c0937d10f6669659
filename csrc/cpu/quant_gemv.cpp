// int4/int8 weight-only GEMV / small-M matmul for CPUs.
//
// Work split: each thread owns a range of output channels n (rows of the packed weight), so every packed
// weight byte is read from memory exactly once per call and decoded once per tile of up to 4 (AVX2) or 8
// (AVX-512) activation rows.
//
// SIMD paths: integer dot products. Activations are converted once per call to int16 with one fp32 scale per
// (row, weight group): xq = round(x / sx), sx = max|x_group| / 32767. That rounding (relative 2^-16 of the
// group's max) is far below the rounding already in fp16/bf16 activations (2^-11 / 2^-8). Codes are widened to
// int16 lanes and multiplied in pairs with exact int32 sums (AVX2: vpmaddwd + vpaddd, 16 products; AVX-VNNI:
// vpdpwssd on ymm, 16 products in one instruction; AVX-512 VNNI: vpdpwssd on zmm, 32); per group the int32 lanes
// are scaled into fp32 lane accumulators (scale_w * sx) and the zero-point term is subtracted once per output:
//     out = sum_g scale_w * sx * (sum_k code_k * xq_k) - sum_g scale_w * zero * (sx * sum_k xq_k).
// For int4 the activations of each chunk of W codes (32 on ymm, 64 on zmm) are stored [W/2 even k][W/2 odd k],
// matching the low/high nibbles of W/2 packed bytes, so decoding a chunk is one widen, one shift and one AND.
// The tile itself is written once, in quant_gemv_tile.inc, and compiled per instruction set below.
//
// Portable path (non-x86 or FLASHQUANT_CPU_SIMD=0): the same loop structure in plain fp32.
#include "cpu/quant_gemv.h"
#include "cpu/quant_gemm_amx.h"
#include "cpu/simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>


namespace flashquant::cpu {
namespace {

struct Problem {
  int64_t M, N, K, G, group_size;
  const uint8_t* q;     // packed weights, row n starts at q + n * row_bytes
  int64_t row_bytes;
  const float* scales;  // fp32 scales of rows scale_row0.. (G per row): scales_of(p, n)
  const float* zeros;   // the same for zero points, or nullptr => default_zero
  int64_t scale_row0;   // the first row in scales / zeros (tasks convert their own rows' scales: quant_matmul_cpu)
  float default_zero;
  float* out;           // (M, N) fp32
  const float* xsum;    // (M, G): each group's sum of activations (SIMD paths: of the quantized ones, sx * sum xq)
  // portable path
  const float* x;       // (M, K) fp32
  // SIMD paths
  const int16_t* xq;    // (M, K) int16, chunk-permuted for int4
  const float* xscale;  // (M, G)
};

// Row n's G scales / zero points (fp32).
inline const float* scales_of(const Problem& p, int64_t n) { return p.scales + (n - p.scale_row0) * p.G; }
inline const float* zeros_of(const Problem& p, int64_t n) {
  return p.zeros ? p.zeros + (n - p.scale_row0) * p.G : nullptr;
}

// ---- portable path ---------------------------------------------------------------------------------
template <int BITS>
void rows_scalar(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.q + n * p.row_bytes;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xm = p.x + m * p.K;
      float total = 0.f;
      for (int64_t g = 0; g < p.G; ++g) {
        float dot = 0.f;
        const int64_t k0 = g * p.group_size;
        for (int64_t k = k0; k < k0 + p.group_size; ++k) dot += static_cast<float>(code_at<BITS>(row, k)) * xm[k];
        const float zero = p.zeros ? zeros_of(p, n)[g] : p.default_zero;
        total += scales_of(p, n)[g] * (dot - zero * p.xsum[m * p.G + g]);
      }
      p.out[m * p.N + n] = total;
    }
  }
}

// Activation rows are taken in blocks whose int16 copy fits in L2 (~192 KB of Zen 3's / Skylake's 512 KB /
// 1 MB), and every weight row of the thread's range is run against one block before the next: otherwise each
// weight row would stream all M x K activations from L3 again (32 GB at M = 1024, K = N = 4096), which made
// large M (prefill) bound by L3 bandwidth. Weights are re-read once per block instead (M / block times).
constexpr int64_t kActivationBlockBytes = 192 * 1024;
inline int64_t activation_block_rows(int64_t K) {
  const int64_t block = (kActivationBlockBytes / (2 * K)) & ~int64_t(3);
  return block < 4 ? 4 : block;
}

// Weight rows whose fp16 / bf16 scales a task converts to fp32 at a time: 64 x G floats (8 KB at K = 4096, g128).
// Converting the whole (N, G) tensor up front (a 1.8 MB fp32 copy for 14336x4096 g128, written out and read back)
// cost 6-9% of an int4 M = 1 call (bench/NOTES.md, "Session 17").
constexpr int64_t kScaleChunkRows = 64;

#ifdef FLASHQUANT_X86
// Elements [begin, end) of a contiguous fp16 / bf16 tensor as fp32 into dst, 8 at a time.
__attribute__((target("avx2,f16c"))) void rows_to_float_avx2(const at::Tensor& t, int64_t begin, int64_t end,
                                                              float* dst) {
  const auto* src = static_cast<const uint16_t*>(t.const_data_ptr()) + begin;
  const int64_t n = end - begin;
  int64_t i = 0;
  if (t.scalar_type() == at::kBFloat16) {  // bf16 -> fp32: the 16 bits become the high half
    for (; i + 8 <= n; i += 8) {
      const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
    }
    for (; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      std::memcpy(dst + i, &bits, 4);
    }
  } else {  // fp16
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
  }
}
#endif

// Rows [n0, n1) of a contiguous (N, G) fp32 / fp16 / bf16 / uint8 tensor as fp32, G per row, into dst.
void rows_to_float(const at::Tensor& t, int64_t n0, int64_t n1, bool simd, float* dst) {
  const int64_t G = t.size(1), begin = n0 * G, end = n1 * G;
  switch (t.scalar_type()) {
    case at::kFloat:
      std::memcpy(dst, t.const_data_ptr<float>() + begin, (end - begin) * sizeof(float));
      return;
    case at::kBFloat16:
    case at::kHalf:
#ifdef FLASHQUANT_X86
      if (simd) return rows_to_float_avx2(t, begin, end, dst);
#endif
      if (t.scalar_type() == at::kBFloat16) {
        const auto* src = t.const_data_ptr<at::BFloat16>();
        for (int64_t i = begin; i < end; ++i) dst[i - begin] = static_cast<float>(src[i]);
      } else {
        const auto* src = t.const_data_ptr<at::Half>();
        for (int64_t i = begin; i < end; ++i) dst[i - begin] = static_cast<float>(src[i]);
      }
      return;
    case at::kByte: {  // zero points as QuantizedWeight stores them
      const auto* src = t.const_data_ptr<uint8_t>();
      for (int64_t i = begin; i < end; ++i) dst[i - begin] = static_cast<float>(src[i]);
      return;
    }
    default:  // quant_matmul_cpu converts any other dtype to fp32 up front
      TORCH_CHECK(false, "rows_to_float: unexpected dtype ", t.scalar_type());
  }
}

// ---- SIMD paths --------------------------------------------------------------------------------------
#ifdef FLASHQUANT_X86
// Position of activation k inside xq: int4 chunks of W codes (W = the SIMD path's kCodes) are stored
// [W/2 even k][W/2 odd k], matching the low / high nibbles of W/2 packed bytes, so decoding a chunk is one widen,
// one shift and one AND. A tail shorter than a chunk keeps natural order.
template <int BITS>
inline int64_t xq_index(int64_t k, int64_t K, int64_t W) {
  if constexpr (BITS == 8) {
    return k;
  } else {
    const int64_t base = k & ~(W - 1);  // W is 32 or 64
    if (base + W > K) return k;
    const int64_t j = k - base;
    return base + (j & 1) * (W / 2) + (j >> 1);
  }
}

// The zero-point term of one output, sum_g scales[g] * zero_g * xsum[g] (zero_g = zeros[g], or default_zero when
// zeros is null), over the G groups of a row: 8 groups per step instead of a scalar update per group.
__attribute__((target("avx2,fma"))) inline float zero_term(const float* scales, const float* zeros,
                                                           float default_zero, const float* xsum, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    __m256 sz = _mm256_loadu_ps(scales + g);
    if (zeros) sz = _mm256_mul_ps(sz, _mm256_loadu_ps(zeros + g));
    acc = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xsum + g), acc);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float total = 0.f;
  for (float l : lanes) total += l;
  if (!zeros) total *= default_zero;
  for (; g < G; ++g) total += scales[g] * (zeros ? zeros[g] : default_zero) * xsum[g];
  return total;
}

// One copy of quant_gemv_tile.inc per instruction set, each compiled for that set only (see the note there).

// AVX2: 16 int16 products per vpmaddwd, then an int32 add.
FLASHQUANT_TARGET_PUSH("avx2,fma,f16c")
namespace avx2 {
struct V {
  using ivec = __m256i;
  using fvec = __m256;
  static constexpr int64_t kCodes = 32;
  static constexpr int kMaxRows = 4;
  template <int BITS>
  static inline void decode(const uint8_t* chunk, ivec& w0, ivec& w1) {
    if constexpr (BITS == 4) {  // 16 bytes -> 16 int16 lanes; low nibbles = even k, high nibbles = odd k
      const ivec b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk)));
      w0 = _mm256_and_si256(b, _mm256_set1_epi16(0x0F));
      w1 = _mm256_srli_epi16(b, 4);
    } else {
      w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk)));
      w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + 16)));
    }
  }
  static inline ivec load(const int16_t* x) { return _mm256_loadu_si256(reinterpret_cast<const ivec*>(x)); }
  static inline ivec dot(ivec acc, ivec w, ivec x) {
    ivec sum = _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
    // Each sum stays in its accumulator register, in order. Without this, GCC reassociated a group's integer adds
    // (its accumulators start at zero), issued all the group's vpmaddwd first and spilled their products to the
    // stack: ~30 stores and reloads per 32 products in the 4-row tile.
    asm("" : "+x"(sum));
    return sum;
  }
  static inline ivec izero() { return _mm256_setzero_si256(); }
  static inline ivec iadd(ivec a, ivec b) { return _mm256_add_epi32(a, b); }
  static inline fvec fzero() { return _mm256_setzero_ps(); }
  static inline fvec fmadd_scaled(fvec t, ivec a, float s) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(s), t);
  }
  static inline float hsum(fvec t) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
  }
};
#include "cpu/quant_gemv_tile.inc"
}  // namespace avx2
FLASHQUANT_TARGET_POP

// AVX-VNNI (VEX, 256-bit): the AVX2 tile with vpdpwssd (multiply + accumulate in one instruction), for client cores
// that have it without AVX-512.
FLASHQUANT_TARGET_PUSH("avx2,fma,f16c,avxvnni")
namespace avxvnni {
struct V : avx2::V {
  static inline ivec dot(ivec acc, ivec w, ivec x) { return _mm256_dpwssd_avx_epi32(acc, w, x); }
};
#include "cpu/quant_gemv_tile.inc"
}  // namespace avxvnni
FLASHQUANT_TARGET_POP

// AVX-512 VNNI, 256-bit: the AVX2 tile with vpdpwssd (multiply + accumulate in one instruction). Used for group
// sizes that are not multiples of 64.
FLASHQUANT_TARGET_PUSH("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni256 {
struct V : avx2::V {
  static inline ivec dot(ivec acc, ivec w, ivec x) { return _mm256_dpwssd_epi32(acc, w, x); }
};
#include "cpu/quant_gemv_tile.inc"
}  // namespace vnni256

// AVX-512 VNNI, 512-bit: 32 int16 products per vpdpwssd, 64 codes per decode.
namespace vnni512 {
struct V {
  using ivec = __m512i;
  using fvec = __m512;
  static constexpr int64_t kCodes = 64;
  static constexpr int kMaxRows = 8;
  template <int BITS>
  static inline void decode(const uint8_t* chunk, ivec& w0, ivec& w1) {
    if constexpr (BITS == 4) {  // 32 bytes -> 32 int16 lanes
      const ivec b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk)));
      w0 = _mm512_and_si512(b, _mm512_set1_epi16(0x0F));
      w1 = _mm512_srli_epi16(b, 4);
    } else {
      w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk)));
      w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32)));
    }
  }
  static inline ivec load(const int16_t* x) { return _mm512_loadu_si512(x); }
  static inline ivec dot(ivec acc, ivec w, ivec x) { return _mm512_dpwssd_epi32(acc, w, x); }
  static inline ivec izero() { return _mm512_setzero_si512(); }
  static inline ivec iadd(ivec a, ivec b) { return _mm512_add_epi32(a, b); }
  static inline fvec fzero() { return _mm512_setzero_ps(); }
  static inline fvec fmadd_scaled(fvec t, ivec a, float s) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(s), t);
  }
  static inline float hsum(fvec t) { return _mm512_reduce_add_ps(t); }
};
#include "cpu/quant_gemv_tile.inc"
}  // namespace vnni512
FLASHQUANT_TARGET_POP

// x (M, K) fp32 -> int16 codes (chunk-permuted for int4), per-(row, group) scales and code sums. Rounds to nearest
// even (vcvtps2dq under the default MXCSR, as std::nearbyint would, without a libm call per element: that made
// this step ~20 us of a 60 us M = 1 call).
// One (row, group): xs = x[m, k0 : k0 + group_size], dst = xq[m, :].
template <int BITS>
__attribute__((target("avx2,fma"))) void quantize_group(const float* xs, int64_t k0, int64_t group_size, int64_t K,
                                                        int64_t W, int16_t* dst, float& scale_out,
                                                        float& sum_out) {
      alignas(32) int32_t v[8];
      __m256 vmax = _mm256_setzero_ps();
      const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      int64_t j = 0;
      for (; j + 8 <= group_size; j += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xs + j), abs_mask));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vmax);
      float amax = 0.f;
      for (float l : lanes) amax = amax > l ? amax : l;
      for (; j < group_size; ++j) amax = std::max(amax, std::fabs(xs[j]));
      const float s = amax > 0.f ? amax / 32767.f : 1.f;
      const float inv = 1.f / s;
      const __m256 vinv = _mm256_set1_ps(inv);
      const __m256i lo = _mm256_set1_epi32(-32767), hi = _mm256_set1_epi32(32767);
      __m256i vsum = _mm256_setzero_si256();
      for (j = 0; j + 8 <= group_size; j += 8) {
        __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xs + j), vinv));
        q = _mm256_min_epi32(_mm256_max_epi32(q, lo), hi);
        vsum = _mm256_add_epi32(vsum, q);
        _mm256_store_si256(reinterpret_cast<__m256i*>(v), q);
        for (int t = 0; t < 8; ++t) dst[xq_index<BITS>(k0 + j + t, K, W)] = static_cast<int16_t>(v[t]);
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(v), vsum);
      int32_t sum = 0;
      for (int32_t l : v) sum += l;
      for (; j < group_size; ++j) {
        const int32_t q = std::max(-32767, std::min(32767, _mm_cvtss_si32(_mm_set_ss(xs[j] * inv))));
        dst[xq_index<BITS>(k0 + j, K, W)] = static_cast<int16_t>(q);
        sum += q;
      }
      scale_out = s;
      sum_out = s * static_cast<float>(sum);
}

template <int BITS>
void quantize_activations(const float* x, int64_t M, int64_t K, int64_t group_size, int64_t W, int16_t* xq,
                          float* xscale, float* xsum) {
  const int64_t G = K / group_size;
  at::parallel_for(0, M * G, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / G, k0 = (i % G) * group_size;
      quantize_group<BITS>(x + m * K + k0, k0, group_size, K, W, xq + m * K, xscale[i], xsum[i]);
    }
  });
}

#endif  // FLASHQUANT_X86

}  // namespace

const char* simd_level() { return simd_level_name(simd_level_enabled()); }

int64_t check_packed_weight(const char* op, const at::Tensor& qdata, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 2, op, ": qdata must be a 2-D uint8 tensor, got ",
              qdata.scalar_type(), " ", qdata.sizes());
  const int64_t N = qdata.size(0), K = qdata.size(1) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(group_size > 0 && K % group_size == 0, op, ": group_size ", group_size, " must divide K=", K);
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G, op, ": scales must be (", N, ", ", G,
              "), got ", scales.sizes());
  if (zeros) {
    TORCH_CHECK(zeros->sizes() == scales.sizes(), op, ": zeros must be (", N, ", ", G, "), got ", zeros->sizes());
  }
  TORCH_CHECK(qdata.device().is_cpu() && scales.device().is_cpu() && (!zeros || zeros->device().is_cpu()), op,
              ": qdata, scales and zeros must be on the CPU");
  return K;
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be (N=", N, ",), got ", bias->sizes());
  TORCH_CHECK(at::isFloatingType(bias->scalar_type()) && bias->device().is_cpu(), op,
              ": bias must be a floating-point CPU tensor, got ", bias->scalar_type(), " on ", bias->device());
}

at::Tensor quant_matmul_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "quant_matmul_cpu: x must be 2-D (M, K), got ", x.sizes());
  const int64_t K = check_packed_weight("quant_matmul_cpu", qdata, scales, zeros, bits, group_size);
  TORCH_CHECK(x.size(1) == K, "quant_matmul_cpu: x ", x.sizes(), " must have K=", K, " columns to match qdata ",
              qdata.sizes(), " (", bits, "-bit codes)");
  const int64_t M = x.size(0), N = qdata.size(0), G = K / group_size;
  TORCH_CHECK(x.device().is_cpu(), "quant_matmul_cpu: x must be on the CPU, got ", x.device());
  check_bias("quant_matmul_cpu", bias, N);

  const at::Tensor q = qdata.contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  // The fp32 sums plus the bias (exact in fp32 from any of its dtypes), rounded once to x's dtype: add_out computes
  // in fp32 and writes x's dtype, one pass over the output.
  const auto finish = [&] {
    if (!bias) return out.to(x.scalar_type());
    at::Tensor result = x.scalar_type() == at::kFloat ? out : at::empty({M, N}, x.options());
    return at::add_out(result, out, *bias);
  };
  if (M == 0 || N == 0) return out.to(x.scalar_type());
  if (amx_takes(x, group_size)) {  // compute-bound: one fp32 copy of the scales up front costs nothing there
    const at::Tensor sf = scales.to(at::kFloat).contiguous();
    const std::optional<at::Tensor> zf =
        zeros ? std::optional<at::Tensor>(zeros->to(at::kFloat).contiguous()) : std::nullopt;
    quant_matmul_amx_bf16(x, q, sf, zf ? &*zf : nullptr, bits, group_size, out);
    return finish();
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const auto per_task = [](const at::Tensor& t) {  // what rows_to_float reads; any other dtype as fp32 up front
    const at::ScalarType st = t.scalar_type();
    const bool direct = st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kByte;
    return direct ? t.contiguous() : t.to(at::kFloat).contiguous();
  };
  const at::Tensor sc = per_task(scales);
  const std::optional<at::Tensor> zc = zeros ? std::optional<at::Tensor>(per_task(*zeros)) : std::nullopt;
  // fp16 / bf16 scales (and uint8 zeros) are converted by each task for its own rows, just before it reads them
  // (rows_to_float), not into an fp32 copy of the whole (N, G) tensor up front.
  const bool convert = sc.scalar_type() != at::kFloat || (zc && zc->scalar_type() != at::kFloat);

  Problem p{};
  p.M = M, p.N = N, p.K = K, p.G = G, p.group_size = group_size;
  p.q = q.data_ptr<uint8_t>(), p.row_bytes = q.size(1);
  if (!convert) p.scales = sc.data_ptr<float>(), p.zeros = zc ? zc->data_ptr<float>() : nullptr;
  p.default_zero = static_cast<float>(1 << (bits - 1));
  p.out = out.data_ptr<float>();
  const SimdLevel level = simd_level_enabled();
  const bool simd = level >= SimdLevel::kAvx2;
  // The 512-bit tile decodes 64 codes at a time: it takes groups that are multiples of 64 (or one group per row);
  // other group sizes run the 256-bit tile with the same multiply-accumulate instruction.
  [[maybe_unused]] const bool zmm = level >= SimdLevel::kAvx512Vnni && (group_size % 64 == 0 || G == 1);
  [[maybe_unused]] const int64_t chunk = zmm ? 64 : 32;
  at::Tensor xsum, xq, xscale;
#ifdef FLASHQUANT_X86
  if (simd) {
    xq = at::empty({M, K}, x.options().dtype(at::kShort));
    xscale = at::empty({M, G}, x.options().dtype(at::kFloat));
    xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
    (bits == 4 ? quantize_activations<4> : quantize_activations<8>)(
        xf.data_ptr<float>(), M, K, group_size, chunk, xq.data_ptr<int16_t>(), xscale.data_ptr<float>(),
        xsum.data_ptr<float>());
    p.xq = xq.data_ptr<int16_t>(), p.xscale = xscale.data_ptr<float>(), p.xsum = xsum.data_ptr<float>();
  }
#endif
  if (!simd) {
    xsum = xf.view({M, G, group_size}).sum(-1).contiguous();
    p.x = xf.data_ptr<float>(), p.xsum = xsum.data_ptr<float>();
  }
  const auto run = [&](const Problem& pt, int64_t n0, int64_t n1) {
#ifdef FLASHQUANT_X86
    if (zmm) return bits == 4 ? vnni512::rows<4>(pt, n0, n1) : vnni512::rows<8>(pt, n0, n1);
    if (level >= SimdLevel::kAvx512Vnni)
      return bits == 4 ? vnni256::rows<4>(pt, n0, n1) : vnni256::rows<8>(pt, n0, n1);
    if (level == SimdLevel::kAvxVnni)
      return bits == 4 ? avxvnni::rows<4>(pt, n0, n1) : avxvnni::rows<8>(pt, n0, n1);
    if (simd) return bits == 4 ? avx2::rows<4>(pt, n0, n1) : avx2::rows<8>(pt, n0, n1);
#endif
    bits == 4 ? rows_scalar<4>(pt, n0, n1) : rows_scalar<8>(pt, n0, n1);
  };
  // With one block of activation rows (decode) a task converts kScaleChunkRows rows' scales at a time, an
  // L1/L2-sized buffer; with several (rows() re-reads its weight rows once per block), its whole range at once, so
  // the activation blocks are still walked once per task.
  const int64_t chunk_rows = M <= activation_block_rows(K) ? kScaleChunkRows : N;
  // ~16 rows of 4096 int4 weights = 32 KB per task: big enough to amortise scheduling.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (!convert) return run(p, n0, n1);
    const int64_t rows_per_chunk = std::min(chunk_rows, n1 - n0);
    std::vector<float> s_buf(rows_per_chunk * G), z_buf(zc ? rows_per_chunk * G : 0);
    for (int64_t c0 = n0; c0 < n1; c0 += rows_per_chunk) {
      const int64_t c1 = std::min(n1, c0 + rows_per_chunk);
      Problem pt = p;
      pt.scale_row0 = c0;
      rows_to_float(sc, c0, c1, simd, s_buf.data());
      pt.scales = s_buf.data();
      if (zc) {
        rows_to_float(*zc, c0, c1, simd, z_buf.data());
        pt.zeros = z_buf.data();
      }
      run(pt, c0, c1);
    }
  });
  return finish();
}

}  // namespace flashquant::cpu
