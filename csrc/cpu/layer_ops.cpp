// The small ops between a decoder layer's matmuls on the CPU: backend="cpu" of flashquant.rms_norm (with the residual
// add before it), rotary_embedding (q and k in one call) and silu_mul. Each is one pass over its rows, computed in
// fp32 and rounded once to the input dtype: the semantics of the references and of the Triton kernels.
//
// Why: at decode sizes these ops move a few KB, so their cost is per-op overhead. Written in PyTorch ops (the
// "torch" backend, Hugging Face's forms), rms_norm is ~10 ATen calls and ~100 us a call on the 2-core AMD EPYC,
// rotary ~15 calls and ~140 us; here each is one call of a few microseconds, and one rounding instead of up to three.
//
// Rows are split over threads in pieces of at least kGrainElements elements, so a decode step (one row) runs on the
// calling thread without a fork/join. The SIMD path (AVX2 + FMA + F16C, vec_avx2.inc) runs where the CPU has it and
// FLASHQUANT_CPU_SIMD does not cap it; the portable path elsewhere. silu's exp comes from vec_exp2.inc's polynomial
// (relative error ~2e-7) on the SIMD path, std::exp on the portable one.
#include "cpu/layer_ops.h"
#include "cpu/simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace flashquant::cpu {
namespace {

constexpr int64_t kGrainElements = 16384;

inline int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(row_elements, 1));
}

// f(T{}) for the element type T of `dtype`: fp32, fp16 or bf16 (the callers have checked it is one of them).
template <typename F>
void dispatch_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: f(at::BFloat16{}); break;
  }
}

// ---- portable rows ------------------------------------------------------------------------------------
namespace portable {
template <typename T>
void rms_row(const T* x, const T* r, T* out, T* h, const float* w, int64_t H, float eps) {
  const T* src = x;
  if (r) {  // h = x + r rounded to T, as PyTorch's add; it is what gets normalized
    for (int64_t i = 0; i < H; ++i) h[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(r[i]));
    src = h;
  }
  double ss = 0.0;
  for (int64_t i = 0; i < H; ++i) {
    const float v = static_cast<float>(src[i]);
    ss += static_cast<double>(v) * v;
  }
  const float inv = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(H)) + eps);
  for (int64_t i = 0; i < H; ++i) out[i] = static_cast<T>(static_cast<float>(src[i]) * inv * w[i]);
}

template <typename T>
void rotary_row(const T* x, T* out, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
    out[i] = static_cast<T>(x1 * cos[i] - x2 * sin[i]);
    out[i + half] = static_cast<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

template <typename T>
void silu_mul_row(const T* g, const T* u, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gf = static_cast<float>(g[i]);
    out[i] = static_cast<T>(gf / (1.f + std::exp(-gf)) * static_cast<float>(u[i]));
  }
}
}  // namespace portable

// ---- AVX2 rows ------------------------------------------------------------------------------------------
// Full vectors of 8, then the tail through small zero-padded buffers (the same vector code, no scalar copy of it).
#ifdef FLASHQUANT_X86
FLASHQUANT_TARGET_PUSH("avx2,fma,f16c")
namespace avx2 {
#include "cpu/vec_avx2.inc"
#include "cpu/vec_exp2.inc"

constexpr int kL = V::kLanes;

template <typename T>
inline void copy_in(T* dst, const T* src, int64_t n) {
  std::memset(static_cast<void*>(dst), 0, sizeof(T) * kL);
  std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), sizeof(T) * n);
}

template <typename T>
void rms_row(const T* x, const T* r, T* out, T* h, const float* w, int64_t H, float eps) {
  const int64_t full = H - H % kL, tail = H - full;
  V::fvec acc = V::zero();
  const T* src = x;
  if (r) {
    for (int64_t i = 0; i < full; i += kL) V::store(h + i, V::add(V::load(x + i), V::load(r + i)));
    if (tail) {
      T xb[kL], rb[kL], hb[kL];
      copy_in(xb, x + full, tail), copy_in(rb, r + full, tail);
      V::store(hb, V::add(V::load(xb), V::load(rb)));
      std::memcpy(static_cast<void*>(h + full), static_cast<const void*>(hb), sizeof(T) * tail);
    }
    src = h;  // the rounded sums, reloaded
  }
  for (int64_t i = 0; i < full; i += kL) {
    const V::fvec v = V::load(src + i);
    acc = V::fmadd(v, v, acc);
  }
  T sb[kL];
  if (tail) {
    copy_in(sb, src + full, tail);  // zero padding adds nothing to the sum
    const V::fvec v = V::load(sb);
    acc = V::fmadd(v, v, acc);
  }
  const V::fvec inv = V::set1(1.f / __builtin_sqrtf(V::hsum(acc) / static_cast<float>(H) + eps));
  for (int64_t i = 0; i < full; i += kL) V::store(out + i, V::mul(V::mul(V::load(src + i), inv), V::loadf(w + i)));
  if (tail) {
    float wb[kL] = {};
    std::memcpy(wb, w + full, sizeof(float) * tail);
    T ob[kL];
    V::store(ob, V::mul(V::mul(V::load(sb), inv), V::loadf(wb)));
    std::memcpy(static_cast<void*>(out + full), static_cast<const void*>(ob), sizeof(T) * tail);
  }
}

// out[i] = x1 c - x2 s, out[i + half] = x2 c + x1 s (i < half): the reference's xf * cos + rotate_half(xf) * sin,
// products and sums rounded in the same order (no FMA).
template <typename T>
inline void rotary_step(const T* x1p, const T* x2p, const float* c, const float* s, T* o1, T* o2) {
  const V::fvec x1 = V::load(x1p), x2 = V::load(x2p), cv = V::loadf(c), sv = V::loadf(s);
  V::store(o1, V::sub(V::mul(x1, cv), V::mul(x2, sv)));
  V::store(o2, V::add(V::mul(x2, cv), V::mul(x1, sv)));
}

template <typename T>
void rotary_row(const T* x, T* out, const float* cos, const float* sin, int64_t half) {
  const int64_t full = half - half % kL, tail = half - full;
  for (int64_t i = 0; i < full; i += kL) rotary_step(x + i, x + half + i, cos + i, sin + i, out + i, out + half + i);
  if (tail) {
    T x1[kL], x2[kL], o1[kL], o2[kL];
    float c[kL] = {}, s[kL] = {};
    copy_in(x1, x + full, tail), copy_in(x2, x + half + full, tail);
    std::memcpy(c, cos + full, sizeof(float) * tail), std::memcpy(s, sin + full, sizeof(float) * tail);
    rotary_step(x1, x2, c, s, o1, o2);
    std::memcpy(static_cast<void*>(out + full), static_cast<const void*>(o1), sizeof(T) * tail);
    std::memcpy(static_cast<void*>(out + half + full), static_cast<const void*>(o2), sizeof(T) * tail);
  }
}

// silu(g) * u = g * sigmoid(g) * u, sigmoid from e = exp(-|g|) <= 1 (never overflows): 1 / (1 + e) for g >= 0,
// e / (1 + e) below. NaN gates give NaN (exp2v's 0 times NaN), -inf gives NaN as the reference's -inf * 0.
inline V::fvec silu_mul_vec(V::fvec g, V::fvec u) {
  const V::fvec abs_g = _mm256_andnot_ps(V::set1(-0.f), g);
  const V::fvec e = exp2v(V::mul(abs_g, V::set1(-1.4426950408889634f)));
  const V::fvec num = _mm256_blendv_ps(V::set1(1.f), e, _mm256_cmp_ps(g, V::zero(), _CMP_LT_OQ));
  const V::fvec sig = _mm256_div_ps(num, V::add(V::set1(1.f), e));
  return V::mul(V::mul(g, sig), u);
}

template <typename T>
void silu_mul_row(const T* g, const T* u, T* out, int64_t n) {
  const int64_t full = n - n % kL, tail = n - full;
  for (int64_t i = 0; i < full; i += kL) V::store(out + i, silu_mul_vec(V::load(g + i), V::load(u + i)));
  if (tail) {
    T gb[kL], ub[kL], ob[kL];
    copy_in(gb, g + full, tail), copy_in(ub, u + full, tail);
    V::store(ob, silu_mul_vec(V::load(gb), V::load(ub)));
    std::memcpy(static_cast<void*>(out + full), static_cast<const void*>(ob), sizeof(T) * tail);
  }
}
}  // namespace avx2
FLASHQUANT_TARGET_POP
#endif  // FLASHQUANT_X86

bool use_avx2() {
#ifdef FLASHQUANT_X86
  return simd_level_enabled() >= SimdLevel::kAvx2;
#else
  return false;
#endif
}

#ifdef FLASHQUANT_X86
#define FQ_ROW_CALL(simd, fn, T, ...) ((simd) ? avx2::fn<T>(__VA_ARGS__) : portable::fn<T>(__VA_ARGS__))
#else
#define FQ_ROW_CALL(simd, fn, T, ...) portable::fn<T>(__VA_ARGS__)
#endif

// The (rows, cols) tensors these ops take: 2-D with unit stride along the row; any row stride.
void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1) && t.device().is_cpu(), op, ": ", name,
              " must be a 2-D CPU tensor (rows, cols) with unit stride along a row, got sizes ", t.sizes(),
              ", strides ", t.strides(), " on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
              ": ", name, " must be fp32, fp16 or bf16, got ", t.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_rows_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& residual, double eps) {
  check_rows("rms_norm_rows", "x", x);
  const int64_t rows = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.device().is_cpu(),
              "rms_norm_rows: weight must be a CPU tensor (H=", H, ",), got ", weight.sizes());
  if (residual) {
    check_rows("rms_norm_rows", "residual", *residual);
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm_rows: residual must have x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
                residual->sizes(), " ", residual->scalar_type());
  }
  TORCH_CHECK(eps >= 0, "rms_norm_rows: eps must be >= 0, got ", eps);
  const at::Tensor w = weight.to(at::kFloat).contiguous();  // (H,) fp32, read by every row
  at::Tensor out = at::empty({rows, H}, x.options());
  at::Tensor h = residual ? at::empty({rows, H}, x.options()) : at::empty({0}, x.options());
  const float* wp = w.data_ptr<float>();
  [[maybe_unused]] const bool simd = use_avx2();  // read once: FLASHQUANT_CPU_SIMD is an environment variable
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* hp = residual ? h.data_ptr<scalar_t>() : nullptr;
    const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
    at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i)
        FQ_ROW_CALL(simd, rms_row, scalar_t, xp + i * xs, rp ? rp + i * rs : nullptr, op + i * H,
                    hp ? hp + i * H : nullptr, wp, H, static_cast<float>(eps));
    });
  });
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor> rotary_qk_cpu(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& positions, const at::Tensor& inv_freq) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(3) == k.size(3) && q.size(3) % 2 == 0,
              "rotary_qk: q (B, S, Hq, D) and k (B, S, Hk, D) must share B, S and an even D, got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf ||
                                                     q.scalar_type() == at::kBFloat16),
              "rotary_qk: q and k must share one dtype of fp32, fp16, bf16, got ", q.scalar_type(), " and ",
              k.scalar_type());
  TORCH_CHECK((q.stride(3) == 1 || q.size(3) <= 1) && (k.stride(3) == 1 || k.size(3) <= 1),
              "rotary_qk: q and k need unit stride in head_dim");
  const int64_t B = q.size(0), S = q.size(1), D = q.size(3), half = D / 2;
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == S &&
                  (positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong),
              "rotary_qk: positions must be int32/int64 (B=", B, ", S=", S, "), got ", positions.scalar_type(), " ",
              positions.sizes());
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == half, "rotary_qk: inv_freq must be (D/2=", half, ",), got ",
              inv_freq.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && positions.device().is_cpu() && inv_freq.device().is_cpu(),
              "rotary_qk: all tensors must be on the CPU");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor freq = inv_freq.to(at::kFloat).contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  if (q.numel() == 0 && k.numel() == 0) return {q_out, k_out};
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* fp = freq.data_ptr<float>();
  const int64_t Hq = q.size(2), Hk = k.size(2);
  [[maybe_unused]] const bool simd = use_avx2();  // read once: FLASHQUANT_CPU_SIMD is an environment variable
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* qo = q_out.data_ptr<scalar_t>();
    scalar_t* ko = k_out.data_ptr<scalar_t>();
    at::parallel_for(0, B * S, row_grain((Hq + Hk) * D), [&](int64_t t0, int64_t t1) {
      std::vector<float> cs(2 * half);  // cos, then sin, of this token's angles (fp32, as the reference)
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / S, s = t % S;
        const float p = static_cast<float>(pp[t]);
        for (int64_t i = 0; i < half; ++i) {
          const float a = p * fp[i];
          cs[i] = std::cos(a), cs[half + i] = std::sin(a);
        }
        for (int64_t h = 0; h < Hq; ++h)
          FQ_ROW_CALL(simd, rotary_row, scalar_t, qp + b * q.stride(0) + s * q.stride(1) + h * q.stride(2),
                      qo + ((t * Hq) + h) * D, cs.data(), cs.data() + half, half);
        for (int64_t h = 0; h < Hk; ++h)
          FQ_ROW_CALL(simd, rotary_row, scalar_t, kp + b * k.stride(0) + s * k.stride(1) + h * k.stride(2),
                      ko + ((t * Hk) + h) * D, cs.data(), cs.data() + half, half);
      }
    });
  });
  return {q_out, k_out};
}

at::Tensor silu_mul_rows_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_rows("silu_mul_rows", "gate", gate);
  check_rows("silu_mul_rows", "up", up);
  TORCH_CHECK(up.sizes() == gate.sizes() && up.scalar_type() == gate.scalar_type(),
              "silu_mul_rows: up must have gate's shape ", gate.sizes(), " and dtype ", gate.scalar_type(), ", got ",
              up.sizes(), " ", up.scalar_type());
  const int64_t rows = gate.size(0), n = gate.size(1);
  at::Tensor out = at::empty({rows, n}, gate.options());
  [[maybe_unused]] const bool simd = use_avx2();  // read once: FLASHQUANT_CPU_SIMD is an environment variable
  dispatch_float(gate.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    const scalar_t* up_ = up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t gs = gate.stride(0), us = up.stride(0);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i)
        FQ_ROW_CALL(simd, silu_mul_row, scalar_t, gp + i * gs, up_ + i * us, op + i * n, n);
    });
  });
  return out;
}

}  // namespace flashquant::cpu
