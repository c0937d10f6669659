// The "mse" clip search of quantize(method="mse") on the CPU (mse_clip.cpp has the why and the arithmetic).
#pragma once
#include <ATen/ATen.h>

namespace flashquant::cpu {

// w (N, K) fp32/fp16/bf16 -> fp32 (N, K / group_size): per group, the first ratio with the smallest squared error of
// the group quantized to `bits` on its clipped grid (reference.quant.mse_clip_ratios). group_size -1: one group per row.
at::Tensor mse_clip_search_cpu(const at::Tensor& w, int64_t bits, int64_t group_size, bool symmetric,
                               at::ArrayRef<double> ratios);

}  // namespace flashquant::cpu
