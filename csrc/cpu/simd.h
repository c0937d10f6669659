// Runtime choice between the SIMD and the portable paths of the CPU kernels.
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define FLASHQUANT_X86 1
#endif

namespace flashquant::cpu {

// Instruction-set levels, each including the one below it.
//   kAvx2:       AVX2 + FMA + F16C (Haswell / Zen 1 and later).
//   kAvx512Vnni: AVX-512 F/BW/VL + VNNI (Ice Lake / Sapphire Rapids servers, Zen 4 and later): the GEMV's
//                vpdpwssd multiplies and accumulates 32 int16 pairs in one instruction.
enum class SimdLevel { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

// The best level this CPU (and OS: libgcc's check includes the XSAVE state) supports, detected once.
inline SimdLevel cpu_simd_level_supported() {
#ifdef FLASHQUANT_X86
  static const SimdLevel level = [] {
    __builtin_cpu_init();
    // F16C via CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does not know "f16c". AVX2 implies the
    // OS saves ymm state, which the builtin checks.
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29));
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)) return SimdLevel::kScalar;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return SimdLevel::kAvx512Vnni;
    return SimdLevel::kAvx2;
  }();
  return level;
#else
  return SimdLevel::kScalar;
#endif
}

// The level the kernels use now: the supported one, capped by FLASHQUANT_CPU_SIMD in the environment ("0" or
// "scalar": the portable paths; "avx2": no AVX-512; anything else, or unset: no cap). Read on every call so that
// tests (and benchmarks) can compare the paths in one process. The kernels are compiled with target attributes /
// pragmas, so the library itself needs no -mavx2 and loads on any x86-64.
inline SimdLevel simd_level_enabled() {
  const SimdLevel supported = cpu_simd_level_supported();
  const char* env = std::getenv("FLASHQUANT_CPU_SIMD");
  if (env && (std::strcmp(env, "0") == 0 || std::strcmp(env, "scalar") == 0)) return SimdLevel::kScalar;
  if (env && std::strcmp(env, "avx2") == 0 && supported > SimdLevel::kAvx2) return SimdLevel::kAvx2;
  return supported;
}

// True when the AVX2 + FMA + F16C paths may run.
inline bool simd_enabled() { return simd_level_enabled() >= SimdLevel::kAvx2; }

inline const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512Vnni: return "avx512_vnni";
    case SimdLevel::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace flashquant::cpu
