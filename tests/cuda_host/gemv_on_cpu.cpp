// The CUDA int4/int8 GEMV (csrc/cuda/quant_gemv_kernels.cuh) compiled for the CPU, behind a C entry point that
// tests/test_cuda_on_cpu.py calls through ctypes. The kernel header's three PTX wrappers get host versions here.
#include "cuda_on_cpu.h"
// (the shim must come first)
#define FLASHQUANT_CUDA_ON_CPU
namespace flashquant::cuda::gemv {
inline uint4 load_streaming(const void* p) { return *static_cast<const uint4*>(p); }
inline uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }
template <typename T>
inline void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  cuda_on_cpu::mma_m16n8k16<T>(c, {a0, a1, a2, a3}, {b0, b1});
}
}  // namespace flashquant::cuda::gemv
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
