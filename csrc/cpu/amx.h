// AMX tile set-up shared by the CPU kernels that multiply on tiles (quant_gemm_amx.cpp, kvcache_attention.cpp).
// Only under FLASHQUANT_AMX (simd.h); callers run tile code only where cpu_supports(SimdLevel::kAmxBf16).
#pragma once
#include "cpu/simd.h"

#ifdef FLASHQUANT_AMX
#include <cstdint>

// Functions that issue tile instructions (and the AVX-512 BF16 conversions around them) carry this attribute.
#define FLASHQUANT_AMX_TARGET \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

namespace flashquant::cpu {

// 64-byte tile configuration (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Configures tmm0-7 as 16 rows x 64 bytes each, on the calling thread; pair with release_tiles() on that thread.
FLASHQUANT_AMX_TARGET inline void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  // gcc 12's _tile_loadconfig declares an 8-byte memory operand, so without this barrier the stores above may be
  // dropped as dead (the tiles then stay unconfigured and the first tile instruction faults with SIGILL)
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

FLASHQUANT_AMX_TARGET inline void release_tiles() { _tile_release(); }

}  // namespace flashquant::cpu
#endif  // FLASHQUANT_AMX
