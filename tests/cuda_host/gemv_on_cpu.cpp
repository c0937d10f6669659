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
    cuda_on_cpu::launch(dim3(c.blocks_n, p.split_k), dim3(gemv::kWarpsPerBlock * 32),
                        gemv::quant_gemv_kernel<T, BITS, M_TILES, ASYM>, static_cast<const T*>(p.x), p.qdata,
                        static_cast<const T*>(p.scales), p.zeros, p.out, p.M, p.N, p.K, p.G, p.group_size,
                        c.group_shift, c.k_per_split);
    return 0;
  }
};
}  // namespace

// out: (M, N) in the dtype when split_k == 1, else fp32 partials (split_k, M, N) for the caller to sum.
extern "C" int fq_gemv_on_cpu(int is_bf16, int bits, const void* x, const uint8_t* qdata, const void* scales,
                              const uint8_t* zeros, void* out, int M, int N, int K, int G, int group_size,
                              int split_k) {
  const QuantGemvParams p{x, qdata, scales, zeros, out, M, N, K, G, group_size, bits, split_k,
                          is_bf16 ? DType::kBFloat16 : DType::kHalf};
  return gemv::supported(p) ? gemv::dispatch(p, Run{p}) : 1;
}
