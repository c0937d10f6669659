// The "mse" clip search of quantize(method="mse"): per group of weights, the clip ratio (of a given list) whose
// quantized group is closest to the weights in squared error.
//
// Why: reference.quant.mse_clip_ratios quantizes and dequantizes the whole matrix once per ratio (33 passes of a
// dozen torch ops each over memory); here each group is read into cache once and all ratios are tried on it in
// registers. Same arithmetic, so the same choice: the grid (scale rounded to w's dtype, zero point) is computed
// operation for operation as reference.quant.group_grid does in fp32; each element's error (dequantized - w)^2 is
// rounded to fp32 exactly as the reference rounds it (no FMA contraction: see no_contract); the per-group sums are
// accumulated in fp64 on both sides, so summation order cannot flip a choice (only an exact tie could, and ties go
// to the first ratio on both sides).
// SIMD: 8 weights per step on AVX2; portable C++ elsewhere (FLASHQUANT_CPU_SIMD caps it, as for the other kernels).
#include "cpu/mse_clip.h"

#include "cpu/simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace flashquant::cpu {
namespace {

struct Grid {
  float scale, zero;  // the scale after rounding to the storage dtype, as fp32
};

// w's dtype: the scale is stored in it, so the codes are computed against the rounded value.
float round_to_storage(float v, at::ScalarType dtype) {
  if (dtype == at::kHalf) return static_cast<float>(c10::Half(v));          // round to nearest even
  if (dtype == at::kBFloat16) return static_cast<float>(c10::BFloat16(v));  // round to nearest even
  return v;
}

struct GroupRange {
  float absmax, min, max;
};

// reference.quant.group_grid for one group at one ratio, in the same fp32 operations and order.
Grid grid_at(const GroupRange& r, float ratio, int64_t bits, bool symmetric, at::ScalarType dtype, float tiny) {
  float scale, lo = 0.f;
  if (symmetric) {
    scale = r.absmax * ratio / static_cast<float>((1 << (bits - 1)) - 1);
  } else {
    lo = std::min(r.min, 0.f) * ratio;
    const float hi = std::max(r.max, 0.f) * ratio;
    scale = (hi - lo) / static_cast<float>((1 << bits) - 1);
  }
  scale = scale == 0.f ? 1.f : std::max(scale, tiny);
  scale = round_to_storage(scale, dtype);
  const float top = static_cast<float>((1 << bits) - 1);
  const float zero = symmetric ? static_cast<float>(1 << (bits - 1)) : std::clamp(std::nearbyint(-lo / scale), 0.f, top);
  return Grid{scale, zero};
}

// Elements [k0, k1) of x: the sum of (dequantize(quantize(x)) - x)^2 on the grid g, each term rounded to fp32.
double group_error_scalar(const float* x, int64_t k0, int64_t k1, Grid g, float top) {
  double err = 0.0;
  for (int64_t k = k0; k < k1; ++k) {
    const float code = std::clamp(std::nearbyint(x[k] / g.scale) + g.zero, 0.f, top);
    volatile float approx = (code - g.zero) * g.scale;  // volatile: never fused into approx - x[k] (one FMA)
    const float e = approx - x[k];
    err += static_cast<double>(e * e);
  }
  return err;
}

#ifdef FLASHQUANT_X86
#define FLASHQUANT_MSE_TARGET __attribute__((target("avx2,fma,f16c")))

// An optimisation barrier: the compiler may not fuse a product that passes through it into a later add (gcc
// contracts a * b - c into an FMA by default when FMA is enabled, which rounds once where the reference rounds twice).
FLASHQUANT_MSE_TARGET inline __m256 no_contract(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

FLASHQUANT_MSE_TARGET double group_error_avx2(const float* x, int64_t n, Grid g, float top) {
  const __m256 scale = _mm256_set1_ps(g.scale), zero = _mm256_set1_ps(g.zero), hi = _mm256_set1_ps(top);
  const __m256 lo = _mm256_setzero_ps();
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    const __m256 r = _mm256_round_ps(_mm256_div_ps(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 code = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, zero), lo), hi);
    const __m256 approx = no_contract(_mm256_mul_ps(_mm256_sub_ps(code, zero), scale));
    const __m256 e = _mm256_sub_ps(approx, v);
    const __m256 sq = no_contract(_mm256_mul_ps(e, e));
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(sq, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + group_error_scalar(x, k, n, g, top);
}
#endif

}  // namespace

at::Tensor mse_clip_search_cpu(const at::Tensor& w, int64_t bits, int64_t group_size, bool symmetric,
                               at::ArrayRef<double> ratios) {
  TORCH_CHECK(w.dim() == 2, "mse_clip_search: w must be 2-D (N, K), got shape ", w.sizes());
  const at::ScalarType dtype = w.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "mse_clip_search: w must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(bits == 4 || bits == 8, "mse_clip_search: bits must be 4 or 8, got ", bits);
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t gs = group_size == -1 ? K : group_size;
  TORCH_CHECK(gs > 0 && K % gs == 0, "mse_clip_search: group_size=", group_size, " must divide K=", K);
  TORCH_CHECK(!ratios.empty(), "mse_clip_search: ratios must not be empty");
  const int64_t G = K / gs;
  at::Tensor best = at::empty({N, G}, w.options().dtype(at::kFloat));
  if (N * G == 0) return best;

  const at::Tensor x = w.to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();
  float* out = best.data_ptr<float>();
  std::vector<float> ratio_f(ratios.begin(), ratios.end());  // the reference multiplies by each ratio in fp32
  const float tiny = dtype == at::kHalf ? 6.103515625e-05f : std::numeric_limits<float>::min();  // finfo.tiny
  const float top = static_cast<float>((1 << bits) - 1);
  [[maybe_unused]] const bool simd = simd_level_enabled() >= SimdLevel::kAvx2;
  // ~64k weights per task, as the dequantize kernel: amortises scheduling, balances a few dozen threads
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / gs);

  at::parallel_for(0, N * G, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* grp = xp + i * gs;  // row i / G, group i % G: contiguous in a row-major (N, K) matrix
      GroupRange r{0.f, grp[0], grp[0]};
      for (int64_t k = 0; k < gs; ++k) {
        r.absmax = std::max(r.absmax, std::abs(grp[k]));
        r.min = std::min(r.min, grp[k]);
        r.max = std::max(r.max, grp[k]);
      }
      double best_err = 0.0;
      float best_ratio = ratio_f[0];
      for (size_t j = 0; j < ratio_f.size(); ++j) {
        const Grid g = grid_at(r, ratio_f[j], bits, symmetric, dtype, tiny);
#ifdef FLASHQUANT_X86
        const double err = simd ? group_error_avx2(grp, gs, g, top) : group_error_scalar(grp, 0, gs, g, top);
#else
        const double err = group_error_scalar(grp, 0, gs, g, top);
#endif
        if (j == 0 || err < best_err) {  // strictly smaller: ties keep the earlier (wider) ratio, as the reference
          best_err = err;
          best_ratio = ratio_f[j];
        }
      }
      out[i] = best_ratio;
    }
  });
  return best;
}

}  // namespace flashquant::cpu
