// Run CUDA kernel bodies on the CPU, for tests on machines without a GPU.
//
// A block's threads are std::threads; __syncthreads is a block-wide std::barrier and __shfl_xor_sync a
// per-warp exchange between two warp-wide barriers. Blocks run one after another, so `extern __shared__`
// arrays can be a global buffer that the harness defines. mma_m16n8k16 is the warp-collective tensor-core
// MMA, each lane's fragments placed by the PTX ISA's tables for .m16n8k16 with .f16/.bf16 inputs and .f32
// accumulators (exact products, fp32 sums; the hardware's summation order is unspecified).
// This executes the kernels' C++ (indexing, loop bounds, synchronisation, bit tricks, fragment placement), with
// IEEE fp32 math on the host instead of the GPU's instructions; it cannot run inline PTX, so it defines
// FLASHQUANT_CUDA_ON_CPU and the host versions of the three wrappers in csrc/cuda/ptx.cuh, the kernels' only
// PTX; it models no memory system.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
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

// Whether a GPU would take this launch configuration: CUDA caps grid.y and grid.z at 65535 blocks (grid.x at
// 2^31 - 1) and a block at 1024 threads; the emulator takes block.x threads only, a multiple of 32.
inline bool launch_fits(dim3 grid, dim3 block) {
  return grid.x >= 1 && grid.x <= 0x7FFFFFFFu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 &&
         block.x >= 32 && block.x <= 1024 && block.x % 32 == 0 && block.y == 1 && block.z == 1;
}

// Runs kernel(args...) over the grid, one block after another; aborts (as a GPU would fail the launch) where
// !launch_fits(grid, block).
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  if (!launch_fits(grid, block)) {
    std::fprintf(stderr, "cuda_on_cpu: invalid launch: grid (%u, %u, %u), block (%u, %u, %u)\n", grid.x, grid.y,
                 grid.z, block.x, block.y, block.z);
    std::abort();
  }
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

namespace cuda_on_cpu {
inline std::atomic<int> sync_or_flag{0};
}
// Non-zero if pred is non-zero on any thread of the block; a barrier like __syncthreads. The flag is cleared
// between two more barriers, so that no thread can set it for the next call before every thread has read it.
inline int __syncthreads_or(int pred) {
  if (pred) cuda_on_cpu::sync_or_flag.store(1);
  cuda_on_cpu::block_barrier->arrive_and_wait();
  const int any = cuda_on_cpu::sync_or_flag.load();
  cuda_on_cpu::block_barrier->arrive_and_wait();
  if (threadIdx.x == 0) cuda_on_cpu::sync_or_flag.store(0);
  cuda_on_cpu::block_barrier->arrive_and_wait();
  return any;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

inline unsigned __byte_perm(unsigned x, unsigned y, unsigned selector) {
  const uint64_t pool = (static_cast<uint64_t>(y) << 32) | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) out |= static_cast<unsigned>((pool >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return out;
}
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace cuda_on_cpu {
inline uint32_t mma_a[kMaxWarps][32][4], mma_b[kMaxWarps][32][2];

template <typename T>  // __half or __nv_bfloat16
float element(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xFFFF);
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  } else {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
}

// D = A (16x16) . B (16x8) + C for the calling lane's C fragment; every lane of the warp must call it.
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = 0; r < 4; ++r) mma_a[w][lane][r] = a[r];
  for (int r = 0; r < 2; ++r) mma_b[w][lane][r] = b[r];
  warp_barrier[w]->arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);  // C: c0, c1 at row g; c2, c3 at g + 8
    float acc = c[i];
    for (int k = 0; k < 16; ++k) {
      // A: a0..a7 of lane (row % 8) * 4 + (k % 8) / 2; register (k >= 8) * 2 + (row >= 8), half k & 1.
      const uint32_t a_reg = mma_a[w][(row % 8) * 4 + (k % 8) / 2][(k >= 8 ? 2 : 0) + (row >= 8 ? 1 : 0)];
      // B: b0..b3 of lane col * 4 + (k % 8) / 2; register k >= 8, half k & 1.
      const uint32_t b_reg = mma_b[w][col * 4 + (k % 8) / 2][k >= 8 ? 1 : 0];
      acc += element<T>(a_reg, k & 1) * element<T>(b_reg, k & 1);
    }
    c[i] = acc;
  }
  warp_barrier[w]->arrive_and_wait();  // the exchange buffers are reused by the next MMA
}
}  // namespace cuda_on_cpu

// The value of lane src_lane (every lane of the warp must call it).
inline float __shfl_sync(unsigned /*mask: full, converged warps*/, float v, int src_lane) {
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  cuda_on_cpu::warp_exchange[w][lane] = v;
  cuda_on_cpu::warp_barrier[w]->arrive_and_wait();
  const float other = cuda_on_cpu::warp_exchange[w][src_lane & 31];
  cuda_on_cpu::warp_barrier[w]->arrive_and_wait();
  return other;
}

inline float __shfl_xor_sync(unsigned /*mask: the kernels shuffle with full, converged warps*/, float v, int lane_mask) {
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  cuda_on_cpu::warp_exchange[w][lane] = v;
  cuda_on_cpu::warp_barrier[w]->arrive_and_wait();
  const float other = cuda_on_cpu::warp_exchange[w][lane ^ lane_mask];
  cuda_on_cpu::warp_barrier[w]->arrive_and_wait();
  return other;
}

// Host versions of csrc/cuda/ptx.cuh's PTX wrappers.
#define FLASHQUANT_CUDA_ON_CPU
namespace flashquant::cuda {
inline uint4 load_streaming(const void* p) { return *static_cast<const uint4*>(p); }
inline uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }
template <typename T>
inline void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  cuda_on_cpu::mma_m16n8k16<T>(c, {a0, a1, a2, a3}, {b0, b1});
}
}  // namespace flashquant::cuda
