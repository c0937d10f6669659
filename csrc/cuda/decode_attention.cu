// Launchers of the GQA flash-decoding kernels (decode_attention_kernels.cuh).
#include "cuda/decode_attention_kernels.cuh"
#include "cuda/launchers.h"

namespace flashquant::cuda {
namespace {

template <typename T, int D>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  const int G = p.Hq / p.Hkv;
  const size_t smem = decode::smem_bytes<T>(G, D);
  auto kernel = decode::decode_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(p.num_splits, p.B * p.Hkv), decode::kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  decode::combine_kernel<T, D><<<p.B * p.Hq, D, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const DecodeParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    case 256: return launch<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t decode_attention(const DecodeParams& p, cudaStream_t stream) {
  const int G = p.Hkv > 0 ? p.Hq / p.Hkv : 0;
  if (G < 1 || G > decode::kMaxGroup || p.Hq % p.Hkv || p.split_len % decode::kTile || p.num_splits < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.B == 0) return cudaSuccess;
  return p.dtype == DType::kHalf ? launch_dtype<__half>(p, stream) : launch_dtype<__nv_bfloat16>(p, stream);
}

}  // namespace flashquant::cuda
