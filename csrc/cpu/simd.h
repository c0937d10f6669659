// Runtime choice between the AVX2 and the portable paths of the CPU kernels.
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FLASHQUANT_X86 1
#endif

namespace flashquant::cpu {

// True when the AVX2 + FMA + F16C paths may run: this CPU has them (checked once) and FLASHQUANT_CPU_SIMD is not
// "0" in the environment (the tests set it to run the portable paths). The kernels are compiled with
// target("avx2,fma,f16c") attributes, so the library itself needs no -mavx2 and loads on any x86-64.
inline bool simd_enabled() {
  const char* env = std::getenv("FLASHQUANT_CPU_SIMD");
  if (env && std::strcmp(env, "0") == 0) return false;
#ifdef FLASHQUANT_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace flashquant::cpu
