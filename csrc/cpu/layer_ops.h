// The small ops between a decoder layer's matmuls on the CPU: declarations shared by ops.cpp and layer_ops.cpp.
// Each computes in fp32 and rounds once to its input dtype (fp32, fp16 or bf16), as flashquant.reference.layers.
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace flashquant::cpu {

// x (rows, H), unit stride along a row; weight (H,) any float dtype; residual like x or nullopt. Returns
// (x * rsqrt(mean(x^2) + eps) * weight, empty) or, with residual, (rms_norm(h), h) for h = x + residual rounded to
// x's dtype. Outputs are contiguous.
std::tuple<at::Tensor, at::Tensor> rms_norm_rows_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& residual, double eps);

// q (B, S, Hq, D), k (B, S, Hk, D), unit stride in D, D even; positions int32/int64 (B, S); inv_freq (D/2,).
// Rotary embedding ("rotate half": dims i and i + D/2 rotated by positions[b, s] * inv_freq[i]); contiguous outputs.
std::tuple<at::Tensor, at::Tensor> rotary_qk_cpu(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& positions, const at::Tensor& inv_freq);

// gate, up (rows, F), unit stride along a row -> silu(gate) * up, contiguous (rows, F).
at::Tensor silu_mul_rows_cpu(const at::Tensor& gate, const at::Tensor& up);

}  // namespace flashquant::cpu
