// Runtime choice between the SIMD and the portable paths of the CPU kernels.
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define FLASHQUANT_X86 1
// gcc <= 12 warns "'__Y' (may be) used uninitialized" inside its own AVX-512 headers for every zero-extending,
// converting or reducing intrinsic (the _mm512_undefined_* idiom, gcc bug 105593): ~180 false warnings that would
// bury real ones.
#if !defined(__clang__) && defined(__GNUC__) && __GNUC__ <= 12
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
// AMX tiles: gcc >= 11 / clang >= 12 have the intrinsics; Linux >= 5.16 hands the tile state to a process that asks
// for it (arch_prctl), which is how this file checks that the OS supports it.
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                           (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#include <sys/syscall.h>
#include <unistd.h>
#define FLASHQUANT_AMX 1
#endif
#endif

// FLASHQUANT_TARGET_PUSH("avx2,fma") ... FLASHQUANT_TARGET_POP: every function defined between them is compiled for
// that instruction set (gcc's target pragma, clang's attribute push). A kernel written once in an .inc file is
// included between them once per instruction set, inside one namespace per set.
#define FLASHQUANT_DO_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define FLASHQUANT_TARGET_PUSH(T) \
  FLASHQUANT_DO_PRAGMA(clang attribute push(__attribute__((target(T))), apply_to = function))
#define FLASHQUANT_TARGET_POP _Pragma("clang attribute pop")
#else
#define FLASHQUANT_TARGET_PUSH(T) _Pragma("GCC push_options") FLASHQUANT_DO_PRAGMA(GCC target(T))
#define FLASHQUANT_TARGET_POP _Pragma("GCC pop_options")
#endif

namespace flashquant::cpu {

// Instruction-set levels, in order of preference.
//   kAvx2:       AVX2 + FMA + F16C (Haswell / Zen 1 and later).
//   kAvxVnni:    kAvx2 + AVX-VNNI (VEX-encoded vpdpwssd on ymm: Alder Lake and later client cores, which have no
//                AVX-512): the GEMV multiplies and accumulates 16 int16 pairs in one instruction.
//   kAvx512Vnni: AVX-512 F/BW/VL + VNNI (Ice Lake / Sapphire Rapids servers, Zen 4 and later): 32 pairs per
//                instruction on zmm.
//   kAmxBf16:    kAvx512Vnni + AVX512-BF16 + AMX-TILE/AMX-BF16, with the OS's permission to use the tiles (Sapphire
//                Rapids and later Xeons): bf16 activations at M >= a few rows run on 16x16x32 tile multiplies
//                (quant_gemm_amx.cpp); everything else takes the kAvx512Vnni paths.
// A CPU may have kAvx512Vnni without kAvxVnni (Zen 4) or the reverse (Alder Lake), so support is per level.
enum class SimdLevel { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmxBf16 = 4 };

#ifdef FLASHQUANT_AMX
// CPUID leaf 7 sub-leaf 0 EDX bits 22 (AMX-BF16) and 24 (AMX-TILE), AVX512-BF16, XCR0 bits 17-18 (the OS enables the tile
// state), then the per-process permission Linux requires before the first tile instruction (without it that
// instruction faults): arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). Asked once; granting it twice is harmless
// (torch asks too when it uses AMX).
inline bool amx_bf16_os_ready() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return false;
  // AVX512-BF16 (vcvtne2ps2bf16, for the int8 decode): leaf 7 sub-leaf 1, EAX bit 5
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) return false;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

// Whether this CPU (and OS: libgcc's check includes the XSAVE state) runs `level`, detected once.
inline bool cpu_supports(SimdLevel level) {
#ifdef FLASHQUANT_X86
  static const bool avx2 = [] {
    __builtin_cpu_init();
    // F16C via CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does not know "f16c". AVX2 implies the
    // OS saves ymm state, which the builtin checks.
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29));
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  }();
  static const bool avx_vnni = [] {
    // AVX-VNNI: CPUID leaf 7 sub-leaf 1, EAX bit 4 (older compilers' __builtin_cpu_supports lack the name).
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return avx2 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 4));
  }();
  static const bool avx512_vnni = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#ifdef FLASHQUANT_AMX
  static const bool amx_bf16 = avx512_vnni && amx_bf16_os_ready();
#else
  static const bool amx_bf16 = false;
#endif
  switch (level) {
    case SimdLevel::kScalar: return true;
    case SimdLevel::kAvx2: return avx2;
    case SimdLevel::kAvxVnni: return avx_vnni;
    case SimdLevel::kAvx512Vnni: return avx512_vnni;
    case SimdLevel::kAmxBf16: return amx_bf16;
  }
  return false;
#else
  return level == SimdLevel::kScalar;
#endif
}

inline const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAmxBf16: return "amx_bf16";
    case SimdLevel::kAvx512Vnni: return "avx512_vnni";
    case SimdLevel::kAvxVnni: return "avx_vnni";
    case SimdLevel::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// AVX512-BF16 (vdpbf16ps: 32 bf16 products summed pairwise into 16 fp32 lanes; Cooper Lake, Sapphire Rapids and
// later Xeons, Zen 4 and later) on top of kAvx512Vnni: CPUID leaf 7 sub-leaf 1, EAX bit 5. Ice Lake servers have
// kAvx512Vnni without it.
inline bool cpu_has_avx512_bf16() {
#ifdef FLASHQUANT_X86
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return cpu_supports(SimdLevel::kAvx512Vnni) && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) &&
           (eax & (1u << 5));
  }();
  return ok;
#else
  return false;
#endif
}

// The level the kernels use now: the best one this CPU supports, at most FLASHQUANT_CPU_SIMD when that names a
// level ("0" or "scalar": the portable paths; "avx2", "avx_vnni", "avx512_vnni", "amx_bf16"; anything else, or unset:
// no cap).
// Read on every call so that tests (and benchmarks) can compare the paths in one process. The kernels are
// compiled with target attributes / pragmas, so the library itself needs no -mavx2 and loads on any x86-64.
inline SimdLevel simd_level_enabled() {
  SimdLevel cap = SimdLevel::kAmxBf16;
  if (const char* env = std::getenv("FLASHQUANT_CPU_SIMD")) {
    if (std::strcmp(env, "0") == 0) cap = SimdLevel::kScalar;
    for (SimdLevel l :
         {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvxVnni, SimdLevel::kAvx512Vnni, SimdLevel::kAmxBf16})
      if (std::strcmp(env, simd_level_name(l)) == 0) cap = l;
  }
  for (int l = static_cast<int>(cap); l > 0; --l)
    if (cpu_supports(static_cast<SimdLevel>(l))) return static_cast<SimdLevel>(l);
  return SimdLevel::kScalar;
}

// True when the AVX2 + FMA + F16C paths may run.
inline bool simd_enabled() { return simd_level_enabled() >= SimdLevel::kAvx2; }

}  // namespace flashquant::cpu
