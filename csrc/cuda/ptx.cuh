// The inline PTX of the CUDA kernels (quant_gemv_kernels.cuh, decode_attention_kernels.cuh), and the bit-cast
// helpers that go with it. tests/cuda_host/cuda_on_cpu.h defines FLASHQUANT_CUDA_ON_CPU and provides host
// versions of the three wrappers (the MMA as a warp-collective exchange following the PTX fragment tables), so
// the kernels also compile with g++ and run on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace flashquant::cuda {

template <typename T2>
__device__ __forceinline__ T2 bits_to(uint32_t v) {
  T2 out;
  static_assert(sizeof(T2) == sizeof(uint32_t));
  __builtin_memcpy(static_cast<void*>(&out), &v, sizeof(out));
  return out;
}
template <typename T2>
__device__ __forceinline__ uint32_t to_bits(T2 v) {
  uint32_t out;
  __builtin_memcpy(static_cast<void*>(&out), &v, sizeof(out));
  return out;
}

#ifndef FLASHQUANT_CUDA_ON_CPU
// Data read once (packed weights, the KV cache): 128-bit loads that do not allocate in L1, so they do not
// evict what the block re-reads.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// (a & b) | c in one instruction: with two constants, the compiler would otherwise emit two LOP3s.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// D += A (16x16, row) . B (16x8, col), fp32 accumulators; T is __half or __nv_bfloat16. Fragments (PTX ISA,
// m16n8k16), lane = 4 * g + t: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
// a3 = A[g+8][2t+8, 2t+9]; b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; c = C[g][2t, 2t+1], C[g+8][2t, 2t+1]
// (the lower k in the lower 16 bits).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}
#endif  // FLASHQUANT_CUDA_ON_CPU

}  // namespace flashquant::cuda
