// Launchers of the int4/int8 tensor-core GEMV (quant_gemv_kernels.cuh).
#include "cuda/launchers.h"
#include "cuda/quant_gemv_kernels.cuh"

namespace flashquant::cuda {
namespace {

struct Launch {
  const QuantGemvParams& p;
  cudaStream_t stream;

  template <typename T, int BITS, int M_TILES, bool ASYM>
  cudaError_t operator()() const {
    const gemv::LaunchConfig c = gemv::launch_config<BITS>(p);
    gemv::quant_gemv_kernel<T, BITS, M_TILES, ASYM>
        <<<dim3(c.blocks_n, p.split_k), gemv::kWarpsPerBlock * 32, 0, stream>>>(
            static_cast<const T*>(p.x), p.qdata, static_cast<const T*>(p.scales), p.zeros, p.out, p.M, p.N, p.K,
            p.G, p.group_size, c.group_shift, c.k_per_split);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t quant_gemv(const QuantGemvParams& p, cudaStream_t stream) {
  return gemv::supported(p) ? gemv::dispatch(p, Launch{p, stream}) : cudaErrorInvalidValue;
}

}  // namespace flashquant::cuda
