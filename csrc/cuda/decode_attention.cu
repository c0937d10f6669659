// Launchers of the GQA flash-decoding kernels (decode_attention_kernels.cuh).
#include "cuda/decode_attention_kernels.cuh"
#include "cuda/launchers.h"

namespace flashquant::cuda {
namespace {

struct Launch {
  const DecodeParams& p;
  cudaStream_t stream;

  template <typename T, int D>
  cudaError_t operator()() const {
    const size_t smem = decode::smem_bytes<T>(p.Hq / p.Hkv, D);
    auto kernel = decode::decode_kernel<T, D>;
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    kernel<<<dim3(p.num_splits, p.B * p.Hkv), decode::kThreads, smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess || p.num_splits == 1) return err;
    decode::combine_kernel<T, D><<<p.B * p.Hq, D, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t decode_attention(const DecodeParams& p, cudaStream_t stream) {
  if (!decode::supported(p)) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
  return decode::dispatch(p, Launch{p, stream});
}

}  // namespace flashquant::cuda
