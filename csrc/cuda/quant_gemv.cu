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
    if (p.split_k > 1) {  // the kernel counts the slices of each 64-channel tile that have finished
      const cudaError_t err = cudaMemsetAsync(p.tile_counters, 0, c.blocks_n * sizeof(int), stream);
      if (err != cudaSuccess) return err;
    }
    gemv::quant_gemv_kernel<T, BITS, M_TILES, ASYM><<<dim3(c.blocks_n, p.split_k), gemv::kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(p.x), p.qdata, static_cast<const T*>(p.scales), p.zeros,
        static_cast<const T*>(p.bias), static_cast<T*>(p.out), p.partials, p.tile_counters, p.M, p.N, p.K, p.G,
        c.group_div, c.k_per_split);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t quant_gemv(const QuantGemvParams& p, cudaStream_t stream) {
  return gemv::supported(p) ? gemv::dispatch(p, Launch{p, stream}) : cudaErrorInvalidValue;
}

}  // namespace flashquant::cuda
