// Run CUDA kernel bodies on the CPU, for tests on machines without a GPU.
//
// A block's threads are std::threads; __syncthreads is a block-wide std::barrier and __shfl_xor_sync a
// per-warp exchange between two warp-wide barriers. Blocks run one after another, so `extern __shared__`
// arrays can be a global buffer that the harness defines. This executes the kernels' C++ (indexing, loop
// bounds, synchronisation, the online softmax, the merge), with IEEE fp32 math on the host instead of the GPU's
// instructions; it cannot run inline PTX and models no memory-system behaviour. Kernel headers included after
// this one must use only what is defined here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

using std::max;
using std::min;
inline float __expf(float x) { return std::exp(x); }

namespace cuda_on_cpu {
constexpr int kMaxWarps = 32;
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::unique_ptr<std::barrier<>> warp_barrier[kMaxWarps];
inline float warp_exchange[kMaxWarps][32];

// Runs kernel(args...) over the grid: every block with block.x threads (block.y = block.z = 1, a multiple of 32).
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  const unsigned n = block.x;
  block_barrier = std::make_unique<std::barrier<>>(n);
  for (unsigned w = 0; w < n / 32; ++w) warp_barrier[w] = std::make_unique<std::barrier<>>(32);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t) {
          threads.emplace_back([=] {
            threadIdx = make_uint3(t, 0, 0);
            blockIdx = make_uint3(x, y, z);
            blockDim = block;
            gridDim = grid;
            kernel(args...);
          });
        }
        for (auto& th : threads) th.join();
      }
    }
  }
}
}  // namespace cuda_on_cpu

inline void __syncthreads() { cuda_on_cpu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask: the kernels shuffle with full, converged warps*/, float v, int lane_mask) {
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  cuda_on_cpu::warp_exchange[w][lane] = v;
  cuda_on_cpu::warp_barrier[w]->arrive_and_wait();
  const float other = cuda_on_cpu::warp_exchange[w][lane ^ lane_mask];
  cuda_on_cpu::warp_barrier[w]->arrive_and_wait();
  return other;
}
