// Weight-only int4/int8 dequant-matmul on the CPU: declarations shared by ops.cpp, quant_gemv.cpp and dequantize.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <optional>

namespace flashquant::cpu {

// out (M, N) = x (M, K) @ dequant(qdata)^T, accumulated in fp32, returned in x's dtype.
// qdata: uint8, (N, K/2) for bits=4 (k=2j in the low nibble of byte j, k=2j+1 in the high one) or (N, K)
// for bits=8. scales: (N, K/group_size) fp32/fp16/bf16. zeros: uint8 (N, K/group_size) or nullopt, in
// which case the zero point is 2^(bits-1). Dequantized weight: (q - zero) * scale. bias: (N,) fp32/fp16/bf16 or
// nullopt, added to the fp32 sums before the one rounding to x's dtype.
at::Tensor quant_matmul_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                            const std::optional<at::Tensor>& bias);

// Code k (0 <= k < K) of one packed weight row: a byte for int8; for int4, k = 2j is the low nibble of byte j and
// k = 2j + 1 the high one.
template <int BITS>
inline int code_at(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 8) {
    return row[k];
  } else {
    const uint8_t b = row[k >> 1];
    return (k & 1) ? (b >> 4) : (b & 0xF);
  }
}

// Checks a packed weight (the layout quant_matmul_cpu documents) for the op named `op`; returns its K.
int64_t check_packed_weight(const char* op, const at::Tensor& qdata, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size);

// Checks an optional bias of the op named `op`: (N,), floating point, on the CPU.
void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N);

// (N, K) dense weight (q - zero) * scale in dtype (fp32 / fp16 / bf16), bit for bit the reference's dequantize
// rounded once to dtype; qdata / scales / zeros as quant_matmul_cpu documents (dequantize.cpp).
at::Tensor dequantize_cpu(const at::Tensor& qdata, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                          int64_t bits, int64_t group_size, at::ScalarType dtype);

// out (M, N) = x (M, K) @ dequant(qdata)^T in x's dtype (fp32 / fp16 / bf16): the weight dequantized (as
// dequantize_cpu) chunk_elements at a time into a per-thread buffer kept between calls, each chunk multiplied by
// at::mm (torch's BLAS). For prefill-sized M, where this beats the fused kernel (flashquant/quant.py). bias: (N,)
// or nullopt, in x's dtype as F.linear takes it (converted if not), added by the BLAS call (at::addmm).
at::Tensor dequant_matmul_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                              int64_t chunk_elements, const std::optional<at::Tensor>& bias);

// The instruction-set path the CPU kernels take now: "avx512_vnni", "avx_vnni", "avx2" or "scalar" (simd.h).
// FLASHQUANT_CPU_SIMD in the environment caps it (a level name, or "0" for the portable path; the tests run every
// path the CPU has).
const char* simd_level();

}  // namespace flashquant::cpu
