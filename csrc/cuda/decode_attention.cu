// Launcher of the GQA flash-decoding kernel (decode_attention_kernels.cuh).
#include "cuda/decode_attention_kernels.cuh"
#include "cuda/launchers.h"

namespace flashquant::cuda {
namespace {

struct Launch {
  const DecodeParams& p;
  cudaStream_t stream;

  template <typename T, int D, int HEAD_TILES>
  cudaError_t operator()() const {
    // At most 33 KB of shared memory (decode::smem_bytes): within the 48 KB a launch gets without opting in.
    const size_t smem = decode::smem_bytes(p.Hq / p.Hkv, D);
    decode::decode_kernel<T, D, HEAD_TILES><<<decode::grid(p), decode::kThreads, smem, stream>>>(p);
    cudaError_t err = cudaGetLastError();
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
