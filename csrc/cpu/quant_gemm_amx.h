// The AMX path of the CPU quant_matmul (quant_gemm_amx.cpp): bf16 activations on AMX tiles.
#pragma once
#include <ATen/core/Tensor.h>

namespace flashquant::cpu {

// Whether this build, CPU and FLASHQUANT_CPU_SIMD cap run the AMX path for x: bf16, at least 8 rows (below that the
// VNNI tile is faster), and a group size that is a multiple of 32.
bool amx_takes(const at::Tensor& x, int64_t group_size);

// out (M, N) fp32 = x (M, K) bf16 @ dequant(qdata)^T. scales / zeros: (N, K / group_size) fp32, contiguous; zeros
// null => 2^(bits-1). qdata as quant_matmul_cpu documents. Call only when amx_takes(x, group_size).
void quant_matmul_amx_bf16(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                           const at::Tensor* zeros, int64_t bits, int64_t group_size, at::Tensor& out);

}  // namespace flashquant::cpu
