// The CUDA int4/int8 GEMV (csrc/cuda/quant_gemv_kernels.cuh) compiled for the CPU, behind a C entry point that
// tests/test_cuda_on_cpu.py calls through ctypes.
#include "cuda_on_cpu.h"
// (the shim must come first)
#include "cuda/quant_gemv_kernels.cuh"

namespace {
using namespace flashquant::cuda;

struct Run {  // quant_gemv.cu's Launch, launching on the CPU
  const QuantGemvParams& p;

  template <typename T, int BITS, int M_TILES, bool ASYM>
  int operator()() const {
    const gemv::LaunchConfig c = gemv::launch_config<BITS>(p);
    if (p.split_k > 1) std::memset(p.tile_counters, 0, c.blocks_n * sizeof(int));  // quant_gemv.cu's memset
    cuda_on_cpu::launch(dim3(c.blocks_n, p.split_k), dim3(gemv::kWarpsPerBlock * 32),
                        gemv::quant_gemv_kernel<T, BITS, M_TILES, ASYM>, static_cast<const T*>(p.x), p.qdata,
                        static_cast<const T*>(p.scales), p.zeros, static_cast<const T*>(p.bias),
                        static_cast<T*>(p.out), p.partials, p.tile_counters, p.M, p.N, p.K, p.G, c.group_div,
                        c.k_per_split);
    return 0;
  }
};
}  // namespace

// bias: (N,) in the dtype or null; out: (M, N) in the dtype; with split_k > 1, partials (split_k, M, N) fp32 and tile_counters (ceil(N / 64),)
// int32 are the kernel's workspace.
extern "C" int fq_gemv_on_cpu(int is_bf16, int bits, const void* x, const uint8_t* qdata, const void* scales,
                              const uint8_t* zeros, const void* bias, void* out, float* partials,
                              int* tile_counters, int M, int N, int K, int G, int group_size, int split_k) {
  const QuantGemvParams p{x,     qdata, scales, zeros,      bias, out,  partials, tile_counters, M,
                          N,     K,     G,      group_size, bits, split_k,
                          is_bf16 ? DType::kBFloat16 : DType::kHalf};
  return gemv::supported(p) ? gemv::dispatch(p, Run{p}) : 1;
}

// gemv::group_of(k, group_divisor(d)) for each of n values of k: the multiply-high division, checked against k / d.
extern "C" void fq_group_of_on_cpu(const int32_t* k, int n, int d, int32_t* out) {
  const gemv::GroupDivisor div = gemv::group_divisor(d);
  for (int i = 0; i < n; ++i) out[i] = gemv::group_of(k[i], div);
}
