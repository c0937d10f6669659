// int4/int8 weight-only GEMV / small-M matmul for CPUs.
//
// Work split: each thread owns a range of output channels n (rows of the packed weight), so every packed
// weight byte is read from memory exactly once per call and dequantized once per tile of up to
// kMaxRows activation rows. Per group we accumulate sum_k q_k * x_k in fp32 and apply the affine part once:
//     out[m, n] += scale_g * (sum_k q_k x_mk - zero_g * sum_k x_mk)
// so the inner loop is only "widen the integers, convert, FMA".
#include "cpu/quant_gemv.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FLASHQUANT_X86 1
#endif

namespace flashquant::cpu {
namespace {

constexpr int kMaxRows = 4;  // activation rows per tile: 4 ymm accumulators stay in registers

struct Problem {
  const float* x;       // (M, K) fp32, row-major
  const float* xsum;    // (M, G): sum of x over each group (for the zero-point term)
  const uint8_t* q;     // packed weights, row n starts at q + n * row_bytes
  int64_t row_bytes;
  const float* scales;  // (N, G) fp32
  const float* zeros;   // (N, G) fp32, or nullptr => 2^(bits-1)
  float default_zero;
  int64_t M, N, K, G, group_size;
  float* out;           // (M, N) fp32
};

// ---- portable path ---------------------------------------------------------------------------------
template <int BITS>
inline float load_q(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 8) {
    return static_cast<float>(row[k]);
  } else {
    const uint8_t b = row[k >> 1];
    return static_cast<float>((k & 1) ? (b >> 4) : (b & 0xF));
  }
}

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
        for (int64_t k = k0; k < k0 + p.group_size; ++k) dot += load_q<BITS>(row, k) * xm[k];
        const float zero = p.zeros ? p.zeros[n * p.G + g] : p.default_zero;
        total += p.scales[n * p.G + g] * (dot - zero * p.xsum[m * p.G + g]);
      }
      p.out[m * p.N + n] = total;
    }
  }
}

// ---- AVX2 + FMA path -------------------------------------------------------------------------------
#ifdef FLASHQUANT_X86
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline __m256 u8x8_to_ps(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

// One row n, a tile of ROWS activation rows starting at m0.
template <int BITS, int ROWS>
__attribute__((target("avx2,fma"))) void row_tile_avx2(const Problem& p, int64_t n, int64_t m0) {
  const uint8_t* row = p.q + n * p.row_bytes;
  const float* x[ROWS];
  float total[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    x[r] = p.x + (m0 + r) * p.K;
    total[r] = 0.f;
  }
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t k0 = g * p.group_size, k_end = k0 + p.group_size;
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 32 <= k_end; k += 32) {
      __m256 w[4];
      if constexpr (BITS == 4) {
        // 16 bytes = 32 weights; interleave low/high nibbles back into k order.
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (k >> 1)));
        const __m128i lo = _mm_and_si128(b, low_nibbles);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibbles);
        const __m128i k0_15 = _mm_unpacklo_epi8(lo, hi), k16_31 = _mm_unpackhi_epi8(lo, hi);
        w[0] = u8x8_to_ps(k0_15);
        w[1] = u8x8_to_ps(_mm_srli_si128(k0_15, 8));
        w[2] = u8x8_to_ps(k16_31);
        w[3] = u8x8_to_ps(_mm_srli_si128(k16_31, 8));
      } else {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        const __m128i b0 = _mm256_castsi256_si128(b), b1 = _mm256_extracti128_si256(b, 1);
        w[0] = u8x8_to_ps(b0);
        w[1] = u8x8_to_ps(_mm_srli_si128(b0, 8));
        w[2] = u8x8_to_ps(b1);
        w[3] = u8x8_to_ps(_mm_srli_si128(b1, 8));
      }
      for (int r = 0; r < ROWS; ++r) {
        acc[r] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x[r] + k), acc[r]);
        acc[r] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x[r] + k + 8), acc[r]);
        acc[r] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x[r] + k + 16), acc[r]);
        acc[r] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x[r] + k + 24), acc[r]);
      }
    }
    const float scale = p.scales[n * p.G + g];
    const float zero = p.zeros ? p.zeros[n * p.G + g] : p.default_zero;
    for (int r = 0; r < ROWS; ++r) {
      float dot = hsum(acc[r]);
      for (int64_t kk = k; kk < k_end; ++kk) dot += load_q<BITS>(row, kk) * x[r][kk];  // group tail
      total[r] += scale * (dot - zero * p.xsum[(m0 + r) * p.G + g]);
    }
  }
  for (int r = 0; r < ROWS; ++r) p.out[(m0 + r) * p.N + n] = total[r];
}

template <int BITS>
void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) row_tile_avx2<BITS, 4>(p, n, m);
    switch (p.M - m) {
      case 3: row_tile_avx2<BITS, 3>(p, n, m); break;
      case 2: row_tile_avx2<BITS, 2>(p, n, m); break;
      case 1: row_tile_avx2<BITS, 1>(p, n, m); break;
      default: break;
    }
  }
}

bool cpu_has_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}
#endif  // FLASHQUANT_X86

bool simd_enabled() {
  const char* env = std::getenv("FLASHQUANT_CPU_SIMD");
  if (env && std::strcmp(env, "0") == 0) return false;
#ifdef FLASHQUANT_X86
  return cpu_has_avx2();
#else
  return false;
#endif
}

}  // namespace

const char* simd_level() { return simd_enabled() ? "avx2" : "scalar"; }

at::Tensor quant_matmul_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2, "quant_matmul_cpu: x must be 2-D (M, K), got ", x.sizes());
  TORCH_CHECK(bits == 4 || bits == 8, "quant_matmul_cpu: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 2,
              "quant_matmul_cpu: qdata must be a 2-D uint8 tensor, got ", qdata.scalar_type(), " ", qdata.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = qdata.size(0);
  TORCH_CHECK(qdata.size(1) * (bits == 4 ? 2 : 1) == K, "quant_matmul_cpu: qdata ", qdata.sizes(),
              " does not hold K=", K, " ", bits, "-bit values per row");
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "quant_matmul_cpu: group_size ", group_size,
              " must divide K=", K);
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G, "quant_matmul_cpu: scales must be (",
              N, ", ", G, "), got ", scales.sizes());
  if (zeros) {
    TORCH_CHECK(zeros->sizes() == scales.sizes(), "quant_matmul_cpu: zeros must be (", N, ", ", G, "), got ",
                zeros->sizes());
  }
  TORCH_CHECK(x.device().is_cpu() && qdata.device().is_cpu() && scales.device().is_cpu(),
              "quant_matmul_cpu: all tensors must be on the CPU");

  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor xsum = xf.view({M, G, group_size}).sum(-1).contiguous();
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  const std::optional<at::Tensor> zf =
      zeros ? std::optional<at::Tensor>(zeros->to(at::kFloat).contiguous()) : std::nullopt;
  const at::Tensor q = qdata.contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out.to(x.scalar_type());

  Problem p{xf.data_ptr<float>(), xsum.data_ptr<float>(), q.data_ptr<uint8_t>(), q.size(1),
            sf.data_ptr<float>(), zf ? zf->data_ptr<float>() : nullptr, static_cast<float>(1 << (bits - 1)),
            M, N, K, G, group_size, out.data_ptr<float>()};
  const bool simd = simd_enabled();
  // ~16 rows of 4096 int4 weights = 32 KB per task: big enough to amortise scheduling.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#ifdef FLASHQUANT_X86
    if (simd) {
      bits == 4 ? rows_avx2<4>(p, n0, n1) : rows_avx2<8>(p, n0, n1);
      return;
    }
#endif
    bits == 4 ? rows_scalar<4>(p, n0, n1) : rows_scalar<8>(p, n0, n1);
  });
  return out.to(x.scalar_type());
}

}  // namespace flashquant::cpu
