// Launchers of the int4/int8 tensor-core GEMV (quant_gemv_kernels.cuh).
#include "cuda/launchers.h"
#include "cuda/quant_gemv_kernels.cuh"

namespace flashquant::cuda {
namespace {
using gemv::kMaxM;
using gemv::kWarpsPerBlock;

template <typename T, int BITS, int M_TILES, bool ASYM>
cudaError_t launch(const QuantGemvParams& p, cudaStream_t stream) {
  const gemv::LaunchConfig c = gemv::launch_config<BITS>(p);
  gemv::quant_gemv_kernel<T, BITS, M_TILES, ASYM><<<dim3(c.blocks_n, c.split_k), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(p.x), p.qdata, static_cast<const T*>(p.scales), p.zeros, p.out, p.M, p.N, p.K, p.G,
      p.group_size, c.group_shift, c.k_per_split);
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t launch_bits(const QuantGemvParams& p, cudaStream_t stream) {
  // Template arguments keep each instantiation branch-free: one n8 tile or two, zero points or none.
  if (p.zeros) return p.M <= 8 ? launch<T, BITS, 1, true>(p, stream) : launch<T, BITS, 2, true>(p, stream);
  return p.M <= 8 ? launch<T, BITS, 1, false>(p, stream) : launch<T, BITS, 2, false>(p, stream);
}

}  // namespace

cudaError_t quant_gemv(const QuantGemvParams& p, cudaStream_t stream) {
  if (p.M < 1 || p.M > kMaxM || p.K % 32 || p.group_size % 32 || (p.bits != 4 && p.bits != 8) ||
      p.split_k < 1 || reinterpret_cast<uintptr_t>(p.x) % 16 || reinterpret_cast<uintptr_t>(p.qdata) % 16) {
    return cudaErrorInvalidValue;
  }
  if (p.dtype == DType::kHalf) return p.bits == 4 ? launch_bits<__half, 4>(p, stream) : launch_bits<__half, 8>(p, stream);
  return p.bits == 4 ? launch_bits<__nv_bfloat16, 4>(p, stream) : launch_bits<__nv_bfloat16, 8>(p, stream);
}

}  // namespace flashquant::cuda
