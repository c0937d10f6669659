// int4/int8 weight-only GEMV / small-M matmul for CPUs.
//
// Work split: each thread owns a range of output channels n (rows of the packed weight), so every packed
// weight byte is read from memory exactly once per call and decoded once per tile of up to 4 activation rows.
//
// AVX2 path: integer dot products. Activations are converted once per call to int16 with one fp32 scale per
// (row, weight group): xq = round(x / sx), sx = max|x_group| / 32767. That rounding (relative 2^-16 of the
// group's max) is far below the rounding already in fp16/bf16 activations (2^-11 / 2^-8). Codes are widened to
// int16 lanes and multiplied with _mm256_madd_epi16 (16 products per instruction, exact int32 sums); per group
// the int32 lanes are scaled into fp32 lane accumulators (scale_w * sx) and the zero-point term
// zero * scale_w * sx * sum_k xq_k is subtracted once per output:
//     out = sum_g scale_w * sx * (sum_k code_k * xq_k - zero * sum_k xq_k).
// For int4 the activations of each 32-wide chunk are stored [16 even k][16 odd k], matching the low/high nibbles
// of 16 packed bytes, so decoding a chunk is one widen, one shift and two ANDs.
//
// Portable path (non-x86 or FLASHQUANT_CPU_SIMD=0): the same loop structure in plain fp32.
#include "cpu/quant_gemv.h"
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
  const float* scales;  // (N, G) fp32
  const float* zeros;   // (N, G) fp32, or nullptr => default_zero
  float default_zero;
  float* out;           // (M, N) fp32
  // portable path
  const float* x;       // (M, K) fp32
  const float* xsum;    // (M, G)
  // AVX2 path
  const int16_t* xq;    // (M, K) int16, chunk-permuted for int4
  const float* xscale;  // (M, G)
  const int32_t* xqsum; // (M, G)
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
        const float zero = p.zeros ? p.zeros[n * p.G + g] : p.default_zero;
        total += p.scales[n * p.G + g] * (dot - zero * p.xsum[m * p.G + g]);
      }
      p.out[m * p.N + n] = total;
    }
  }
}

// ---- AVX2 path -------------------------------------------------------------------------------------
#ifdef FLASHQUANT_X86
// Position of activation k inside xq: int4 chunks of 32 are stored [even k][odd k].
template <int BITS>
inline int64_t xq_index(int64_t k, int64_t K) {
  if constexpr (BITS == 8) {
    return k;
  } else {
    const int64_t base = k & ~int64_t(31);
    if (base + 32 > K) return k;  // a tail shorter than a chunk keeps natural order
    const int64_t j = k & 31;
    return base + (j & 1) * 16 + (j >> 1);
  }
}

constexpr int64_t kPrefetchBytes = 1024;

// 32 codes starting at k -> two vectors of 16 int16 lanes in the order xq stores the activations.
template <int BITS>
__attribute__((target("avx2"))) inline void decode_chunk(const uint8_t* row, int64_t k, __m256i& w0, __m256i& w1) {
  if constexpr (BITS == 4) {
    // 16 bytes -> 16 int16 lanes; low nibbles are the even k, high nibbles the odd k of the chunk.
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (k >> 1))));
    w0 = _mm256_and_si256(b, _mm256_set1_epi16(0x0F));
    w1 = _mm256_srli_epi16(b, 4);
  } else {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
    w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(b));
    w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(b, 1));
  }
}

template <int BITS, int ROWS>
__attribute__((target("avx2,fma"))) void row_tile_avx2(const Problem& p, int64_t n, int64_t m0) {
  const uint8_t* row = p.q + n * p.row_bytes;
  const int16_t* xq[ROWS];
  __m256 total[ROWS];  // per-lane fp32 sums; one horizontal sum per output instead of one per group
  float zero_term[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    xq[r] = p.xq + (m0 + r) * p.K;
    total[r] = _mm256_setzero_ps();
    zero_term[r] = 0.f;
  }
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t k0 = g * p.group_size, k_end = k0 + p.group_size;
    __m256i acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_si256();
    int64_t k = k0;
    // Two 32-wide chunks per iteration with separate accumulators: more independent work per loop trip.
    __m256i acc2[ROWS];
    for (int r = 0; r < ROWS; ++r) acc2[r] = _mm256_setzero_si256();
    for (; k + 64 <= k_end; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(row + (k * BITS / 8) + kPrefetchBytes), _MM_HINT_T0);
      __m256i a0, a1, b0, b1;
      decode_chunk<BITS>(row, k, a0, a1);
      decode_chunk<BITS>(row, k + 32, b0, b1);
      for (int r = 0; r < ROWS; ++r) {
        const int16_t* xk = xq[r] + k;
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk))));
        acc2[r] = _mm256_add_epi32(acc2[r], _mm256_madd_epi16(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk + 16))));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(b0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk + 32))));
        acc2[r] = _mm256_add_epi32(acc2[r], _mm256_madd_epi16(b1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk + 48))));
      }
    }
    for (; k + 32 <= k_end; k += 32) {  // groups of 32, or the odd chunk of a group
      _mm_prefetch(reinterpret_cast<const char*>(row + (k * BITS / 8) + kPrefetchBytes), _MM_HINT_T0);
      __m256i w0, w1;
      decode_chunk<BITS>(row, k, w0, w1);
      for (int r = 0; r < ROWS; ++r) {
        const int16_t* xk = xq[r] + k;
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk))));
        acc2[r] = _mm256_add_epi32(acc2[r], _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xk + 16))));
      }
    }
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_add_epi32(acc[r], acc2[r]);
    const float scale = p.scales[n * p.G + g];
    const float zero = p.zeros ? p.zeros[n * p.G + g] : p.default_zero;
    for (int r = 0; r < ROWS; ++r) {
      const int64_t mg = (m0 + r) * p.G + g;
      const float s = scale * p.xscale[mg];
      if (k < k_end) {  // group tail shorter than a chunk (per-channel groups with K % 32 != 0)
        int64_t tail = 0;
        for (int64_t kk = k; kk < k_end; ++kk) tail += code_at<BITS>(row, kk) * xq[r][xq_index<BITS>(kk, p.K)];
        acc[r] = _mm256_add_epi32(acc[r], _mm256_setr_epi32(static_cast<int32_t>(tail), 0, 0, 0, 0, 0, 0, 0));
      }
      total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(s), total[r]);
      zero_term[r] += s * zero * static_cast<float>(p.xqsum[mg]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(total[r]), _mm256_extractf128_ps(total[r], 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    p.out[(m0 + r) * p.N + n] = _mm_cvtss_f32(v) - zero_term[r];
  }
}

// Activation rows are taken in blocks whose int16 copy fits in L2 (~192 KB of Zen 3's / Skylake's 512 KB /
// 1 MB), and every weight row of the thread's range is run against one block before the next: otherwise each
// weight row would stream all M x K activations from L3 again (32 GB at M = 1024, K = N = 4096), which made
// large M (prefill) bound by L3 bandwidth. Weights are re-read once per block instead (M / block times).
constexpr int64_t kActivationBlockBytes = 192 * 1024;

template <int BITS>
void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t block = std::max<int64_t>(4, (kActivationBlockBytes / (2 * p.K)) & ~int64_t(3));
  for (int64_t mb = 0; mb < p.M; mb += block) {
    const int64_t me = std::min(p.M, mb + block);
    for (int64_t n = n0; n < n1; ++n) {
      int64_t m = mb;
      for (; m + 4 <= me; m += 4) row_tile_avx2<BITS, 4>(p, n, m);
      switch (me - m) {
        case 3: row_tile_avx2<BITS, 3>(p, n, m); break;
        case 2: row_tile_avx2<BITS, 2>(p, n, m); break;
        case 1: row_tile_avx2<BITS, 1>(p, n, m); break;
        default: break;
      }
    }
  }
}

// x (M, K) fp32 -> int16 codes (chunk-permuted for int4), per-(row, group) scales and code sums.
template <int BITS>
void quantize_activations(const float* x, int64_t M, int64_t K, int64_t group_size, int16_t* xq, float* xscale,
                          int32_t* xqsum) {
  const int64_t G = K / group_size;
  at::parallel_for(0, M * G, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / G, k0 = (i % G) * group_size;
      const float* xs = x + m * K + k0;
      float amax = 0.f;
      for (int64_t j = 0; j < group_size; ++j) amax = std::max(amax, std::fabs(xs[j]));
      const float s = amax > 0.f ? amax / 32767.f : 1.f;
      const float inv = 1.f / s;
      int32_t sum = 0;
      for (int64_t j = 0; j < group_size; ++j) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(xs[j] * inv));
        xq[m * K + xq_index<BITS>(k0 + j, K)] = static_cast<int16_t>(std::max(-32767, std::min(32767, v)));
        sum += v;
      }
      xscale[i] = s;
      xqsum[i] = sum;
    }
  });
}

#endif  // FLASHQUANT_X86

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
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  const std::optional<at::Tensor> zf =
      zeros ? std::optional<at::Tensor>(zeros->to(at::kFloat).contiguous()) : std::nullopt;
  const at::Tensor q = qdata.contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out.to(x.scalar_type());

  Problem p{};
  p.M = M, p.N = N, p.K = K, p.G = G, p.group_size = group_size;
  p.q = q.data_ptr<uint8_t>(), p.row_bytes = q.size(1);
  p.scales = sf.data_ptr<float>(), p.zeros = zf ? zf->data_ptr<float>() : nullptr;
  p.default_zero = static_cast<float>(1 << (bits - 1));
  p.out = out.data_ptr<float>();
  const bool simd = simd_enabled();
  at::Tensor xsum, xq, xscale, xqsum;
#ifdef FLASHQUANT_X86
  if (simd) {
    xq = at::empty({M, K}, x.options().dtype(at::kShort));
    xscale = at::empty({M, G}, x.options().dtype(at::kFloat));
    xqsum = at::empty({M, G}, x.options().dtype(at::kInt));
    (bits == 4 ? quantize_activations<4> : quantize_activations<8>)(
        xf.data_ptr<float>(), M, K, group_size, xq.data_ptr<int16_t>(), xscale.data_ptr<float>(),
        xqsum.data_ptr<int32_t>());
    p.xq = xq.data_ptr<int16_t>(), p.xscale = xscale.data_ptr<float>(), p.xqsum = xqsum.data_ptr<int32_t>();
  }
#endif
  if (!simd) {
    xsum = xf.view({M, G, group_size}).sum(-1).contiguous();
    p.x = xf.data_ptr<float>(), p.xsum = xsum.data_ptr<float>();
  }
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
