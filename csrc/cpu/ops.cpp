// The flashquant op schemas (defined once, here) and their CPU implementations.
// CUDA implementations of the same schemas live in csrc/cuda/ops_cuda.cpp (TORCH_LIBRARY_IMPL(..., CUDA)).
#include <Python.h>
#include <torch/library.h>

#include "cpu/kvcache_attention.h"
#include "cpu/layer_ops.h"
#include "cpu/mse_clip.h"
#include "cpu/quant_gemv.h"

namespace {
std::string cpu_simd_level() { return flashquant::cpu::simd_level(); }
}  // namespace

TORCH_LIBRARY(flashquant, m) {
  // x @ dequant(W)^T (+ bias), accumulated in fp32, rounded once to x's dtype; CPU and CUDA (M <= 16).
  m.def("quant_matmul_packed(Tensor x, Tensor qdata, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "Tensor? bias=None) -> Tensor");
  // The packed weight dequantized to a dense (N, K) tensor of `dtype`; CPU only (the GPU's is a Triton kernel).
  m.def("dequantize_packed(Tensor qdata, Tensor scales, Tensor? zeros, int bits, int group_size, ScalarType dtype) "
        "-> Tensor");
  // x @ dequant(W)^T by dequantizing chunk_elements weights at a time and calling torch's BLAS; CPU only.
  m.def("dequant_matmul_packed(Tensor x, Tensor qdata, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "int chunk_elements, Tensor? bias=None) -> Tensor");
  // Flash-decoding (Sq = 1) over a contiguous or paged KV cache; CUDA only (see csrc/cuda).
  m.def(
      "decode_attention_packed(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor? block_table, "
      "float softmax_scale, int num_splits) -> Tensor");
  // A few new query tokens against a contiguous or paged KV cache, every attention_with_kvcache option; CPU only
  // (csrc/cpu/kvcache_attention.h has the semantics).
  m.def(
      "kvcache_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor? block_table, "
      "float softmax_scale, bool causal, int window_left, int window_right, float softcap, int num_splits, "
      "Tensor? seqstart_k=None) -> (Tensor, Tensor)");
  // attention_varlen's packed batch of variable-length sequences, with the same kernel; CPU only.
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, float softmax_scale, "
      "bool causal, int window_left, int window_right, float softcap, int num_splits) -> (Tensor, Tensor)");
  // New tokens written into a contiguous or paged KV cache in place (flashquant.append_kv); CPU only (the GPU's
  // is a Triton kernel).
  m.def(
      "kvcache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor k, Tensor v, "
      "Tensor? block_table) -> ()");
  // The layer ops of flashquant.rms_norm / rotary_embedding / silu_mul, in fp32 rounded once; CPU only (the GPU's
  // are Triton kernels). csrc/cpu/layer_ops.h has the shapes.
  m.def("rms_norm_rows(Tensor x, Tensor weight, Tensor? residual, float eps) -> (Tensor, Tensor)");
  m.def("rotary_qk(Tensor q, Tensor k, Tensor positions, Tensor inv_freq) -> (Tensor, Tensor)");
  m.def("silu_mul_rows(Tensor gate, Tensor up) -> Tensor");
  // Per group of w (N, K), the ratio of `ratios` whose clipped quantization is closest to w: fp32 (N, K // group_size).
  // reference.quant.mse_clip_ratios is the definition; CPU only (elsewhere the reference runs).
  m.def("mse_clip_search(Tensor w, int bits, int group_size, bool symmetric, float[] ratios) -> Tensor");
  m.def("cpu_simd_level() -> str", &cpu_simd_level);
}

TORCH_LIBRARY_IMPL(flashquant, CPU, m) {
  m.impl("quant_matmul_packed", &flashquant::cpu::quant_matmul_cpu);
  m.impl("dequantize_packed", &flashquant::cpu::dequantize_cpu);
  m.impl("dequant_matmul_packed", &flashquant::cpu::dequant_matmul_cpu);
  m.impl("kvcache_attention", &flashquant::cpu::kvcache_attention_cpu);
  m.impl("varlen_attention", &flashquant::cpu::varlen_attention_cpu);
  m.impl("kvcache_append", &flashquant::cpu::kvcache_append_cpu);
  m.impl("rms_norm_rows", &flashquant::cpu::rms_norm_rows_cpu);
  m.impl("rotary_qk", &flashquant::cpu::rotary_qk_cpu);
  m.impl("silu_mul_rows", &flashquant::cpu::silu_mul_rows_cpu);
  m.impl("mse_clip_search", &flashquant::cpu::mse_clip_search_cpu);
}

// Importable as flashquant._C: loading it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "flashquant C++ ops (torch.ops.flashquant)", -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
