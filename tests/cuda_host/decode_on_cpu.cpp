// The CUDA flash-decoding kernels (csrc/cuda/decode_attention_kernels.cuh) compiled for the CPU, behind a C
// entry point that tests/test_cuda_on_cpu.py calls through ctypes. Mirrors decode_attention.cu's dispatch.
#include "cuda_on_cpu.h"
// (the shim must come first)
#include "cuda/decode_attention_kernels.cuh"

namespace flashquant::cuda::decode {
alignas(128) float smem[1 << 16];  // the kernels' `extern __shared__ float smem[]`: 256 KB, blocks run in turn
}

namespace {
using namespace flashquant::cuda;

template <typename T, int D>
int run(const DecodeParams& p) {
  if (decode::smem_bytes<T>(p.Hq / p.Hkv, D) > sizeof(decode::smem)) return 2;
  if (reinterpret_cast<uintptr_t>(decode::smem + decode::float_words(p.Hq / p.Hkv, D)) % 16) return 3;
  cuda_on_cpu::launch(dim3(p.num_splits, p.B * p.Hkv), dim3(decode::kThreads), decode::decode_kernel<T, D>, p);
  if (p.num_splits > 1) cuda_on_cpu::launch(dim3(p.B * p.Hq), dim3(D), decode::combine_kernel<T, D>, p);
  return 0;
}

template <typename T>
int run_dtype(const DecodeParams& p) {
  switch (p.D) {
    case 64: return run<T, 64>(p);
    case 128: return run<T, 128>(p);
    case 256: return run<T, 256>(p);
    default: return 1;
  }
}
}  // namespace

extern "C" int fq_decode_on_cpu(int is_bf16, const void* q, const void* k_cache, const void* v_cache,
                                const int32_t* seqlens_k, const int32_t* block_table, void* out, float* out_partial,
                                float* lse_partial, const int64_t* k_strides, const int64_t* v_strides, int B, int Hq,
                                int Hkv, int D, int block_size, int max_blocks, int split_len, int num_splits,
                                float softmax_scale) {
  DecodeParams p{q, k_cache, v_cache, seqlens_k, block_table, out, out_partial, lse_partial,
                 k_strides[0], k_strides[1], k_strides[2], v_strides[0], v_strides[1], v_strides[2],
                 B, Hq, Hkv, D, block_size, max_blocks, split_len, num_splits, softmax_scale,
                 is_bf16 ? DType::kBFloat16 : DType::kHalf};
  const int G = Hkv > 0 ? Hq / Hkv : 0;
  if (G < 1 || G > decode::kMaxGroup || Hq % Hkv || split_len % decode::kTile || num_splits < 1) return 1;
  return is_bf16 ? run_dtype<__nv_bfloat16>(p) : run_dtype<__half>(p);
}
