// The CUDA flash-decoding kernel (csrc/cuda/decode_attention_kernels.cuh) compiled for the CPU, behind a C
// entry point that tests/test_cuda_on_cpu.py calls through ctypes, dispatched like decode_attention.cu.
#include "cuda_on_cpu.h"
// (the shim must come first)
#include "cuda/decode_attention_kernels.cuh"

namespace flashquant::cuda::decode {
alignas(128) float smem[1 << 16];  // the kernels' `extern __shared__ float smem[]`: 256 KB, blocks run in turn
}

namespace {
using namespace flashquant::cuda;

struct Run {  // decode_attention.cu's Launch, launching on the CPU
  const DecodeParams& p;

  template <typename T, int D, int HEAD_TILES>
  int operator()() const {
    if (decode::smem_bytes(p.Hq / p.Hkv, D) > sizeof(decode::smem)) return 2;
    cuda_on_cpu::launch(decode::grid(p), dim3(decode::kThreads), decode::decode_kernel<T, D, HEAD_TILES>, p);
    if (p.num_splits > 1) cuda_on_cpu::launch(dim3(p.B * p.Hq), dim3(D), decode::combine_kernel<T, D>, p);
    return 0;
  }
};
}  // namespace

extern "C" int fq_decode_on_cpu(int is_bf16, const void* q, const void* k_cache, const void* v_cache,
                                const int32_t* seqlens_k, const int32_t* block_table, void* out, float* out_partial,
                                float* lse_partial, const int64_t* k_strides, const int64_t* v_strides, int B, int Hq,
                                int Hkv, int D, int block_size, int max_blocks, int split_len, int num_splits,
                                int capacity, float softmax_scale) {
  DecodeParams p{q, k_cache, v_cache, seqlens_k, block_table, out, out_partial, lse_partial,
                 k_strides[0], k_strides[1], k_strides[2], v_strides[0], v_strides[1], v_strides[2],
                 B, Hq, Hkv, D, block_size, max_blocks, split_len, num_splits, capacity, softmax_scale,
                 is_bf16 ? DType::kBFloat16 : DType::kHalf};
  if (!decode::supported(p)) return 1;
  return p.B == 0 ? 0 : decode::dispatch(p, Run{p});
}

// decode_attention.cu's launch configuration for B sequences, Hkv KV heads and num_splits splits: writes the
// kernel's grid to grid_xyz and returns whether a GPU would take it.
extern "C" int fq_decode_grid_on_cpu(int B, int Hkv, int num_splits, unsigned* grid_xyz) {
  DecodeParams p{};
  p.B = B;
  p.Hkv = Hkv;
  p.num_splits = num_splits;
  const dim3 g = decode::grid(p);
  grid_xyz[0] = g.x;
  grid_xyz[1] = g.y;
  grid_xyz[2] = g.z;
  return cuda_on_cpu::launch_fits(g, dim3(decode::kThreads));
}
