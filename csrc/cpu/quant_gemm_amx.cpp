// int4/int8 weight-only matmul on AMX tiles, for bf16 activations (Sapphire Rapids and later Xeons).
//
// Why: the VNNI tile (quant_gemv_tile.inc) does 32 int16 products per instruction; at M = 16 it is bound by that
// instruction's throughput, not by memory (14336x4096 int4: 8.4 ms, while torch's bf16 F.linear on AMX takes 5.2 ms
// with 4x the bytes). One AMX tdpbf16ps does 16x16x32 products.
//
// Exactness: weights enter the tiles as their integer codes (exact in bf16: int4 codes as 128 + code, int8 codes
// converted exactly), activations as the caller's bf16 values, so every product is exact and sums are fp32, as
// in the reference; the group scale and zero point are applied per group to the fp32 tile sums:
//     out[m, n] = sum_g s[n, g] * (C_g[n, m] - z'[n, g] * xsum[m, g]),   C_g = sum_{k in g} w'[n, k] * x[m, k]
// where w' is the code as it sits in the tile (128 + code for int4: the magic-number decode needs no int->float
// conversion) and z' the zero point shifted the same way. Only bf16 activations take this path: fp16 / fp32
// ones would be rounded to bf16 on the way in, so they stay on the int16 VNNI path (2^-16 of the group's max).
//
// Layout: C = W x^T. A tiles: 16 weight rows x 32 codes (bf16), decoded per chunk of k into a buffer that stays
// in L1/L2. B tiles: 16 k-pairs x 16 activation rows x 2 (the "VNNI" pair layout tdpbf16ps wants), built once per
// call from x. C tiles: 16 weight rows x 16 activation rows, fp32. Per thread, blocks of 32 weight rows
// (2 A tiles) against pairs of 16-row activation blocks (2 B tiles): 4 C tiles, 4 products per 4 tile loads.
#include "cpu/quant_gemm_amx.h"
#include "cpu/amx.h"
#include "cpu/simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace flashquant::cpu {

#ifdef FLASHQUANT_AMX

namespace {

constexpr int64_t kRowsPerBlock = 32;   // weight rows per block: two A tiles
constexpr int64_t kTileRows = 16;       // activation rows per B tile, weight rows per A tile
constexpr int64_t kTileK = 32;          // k per tile product (16 bf16 pairs)
constexpr int64_t kMaxChunk = 512;      // k decoded at a time: 32 rows x 512 bf16 = 32 KB, within L1/L2
// Below this many activation rows the VNNI tile is faster: it reads each weight byte once at memory speed, while
// this path stores every decoded code as bf16 and loads it back into a tile, 4 KB of L1 traffic per 32 rows x 32
// codes, whatever M is (14336x4096, ad-hoc, interleaved: int4 M = 4: 3.2 ms here vs 2.2 ms VNNI; M = 8: 2.5 vs
// 4.4; int8 M = 8: 4.2 vs 4.5; bench/NOTES.md).
constexpr int64_t kAmxMinRows = 8;
constexpr float kInt4Offset = 128.f;    // int4 codes sit in the A tiles as 128 + code (see decode_int4)

// Decoded weights of one chunk: [k-block][half][16 rows][32 codes] bf16 bits, so every A tile is 1 KB contiguous.
inline int64_t wbuf_index(int64_t kb, int64_t row) { return ((kb * 2 + row / 16) * 16 + row % 16) * kTileK; }

struct Problem {
  int64_t M, N, K, G, group_size, bits;
  int64_t m_blocks;      // ceil(M / 16)
  const uint8_t* q;      // packed weights, row n at q + n * row_bytes
  int64_t row_bytes;
  const float* scales;   // (N, G)
  const float* zeros;    // (N, G) or nullptr => default_zero
  float default_zero;
  const uint32_t* xb;    // activations, [m_block][K / 2][16 rows] bf16 pairs (zero rows past M)
  const float* xsum_t;   // (G, m_blocks * 16): per group sums of the activations, transposed
  float* out;            // (M, N) fp32
};

// 32 int4 codes (16 bytes; k = 2j in byte j's low nibble, 2j+1 in its high one) -> 32 bf16 in k order. Each 32-bit
// lane gets one byte b: (b | b << 12) & 0x000F000F puts the low nibble in bits 0-3 and the high one in bits 16-19,
// and OR-ing 0x4300 into each half makes the bf16 of 128 + code (exponent of 128, code in the 7 mantissa bits).
FLASHQUANT_AMX_TARGET inline void decode_int4(const uint8_t* src, uint16_t* dst) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512i nibbles = _mm512_and_si512(_mm512_or_si512(b, _mm512_slli_epi32(b, 12)), _mm512_set1_epi32(0x000F000F));
  _mm512_store_si512(dst, _mm512_or_si512(nibbles, _mm512_set1_epi32(0x43004300)));
}

// 32 int8 codes (0..255) -> 32 bf16, exactly (8 significant bits).
FLASHQUANT_AMX_TARGET inline void decode_int8(const uint8_t* src, uint16_t* dst) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
  _mm512_store_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

// Weight rows n0 .. n0+31 (rows past N as zeros), codes [k0, k0 + chunk) -> wbuf.
FLASHQUANT_AMX_TARGET void decode_chunk(const Problem& p, int64_t n0, int64_t k0, int64_t chunk, uint16_t* wbuf) {
  for (int64_t row = 0; row < kRowsPerBlock; ++row) {
    const int64_t n = n0 + row;
    if (n >= p.N) {
      for (int64_t kb = 0; kb < chunk / kTileK; ++kb) std::memset(wbuf + wbuf_index(kb, row), 0, kTileK * 2);
      continue;
    }
    const uint8_t* src = p.q + n * p.row_bytes + ((k0 * p.bits) >> 3);
    // the same bytes of the next block's row (this thread's next block), into L2
    const uint8_t* ahead = src + kRowsPerBlock * p.row_bytes;
    for (int64_t b = 0; b < ((chunk * p.bits) >> 3); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T1);
    for (int64_t kb = 0; kb < chunk / kTileK; ++kb) {
      if (p.bits == 4)
        decode_int4(src + kb * (kTileK / 2), wbuf + wbuf_index(kb, row));
      else
        decode_int8(src + kb * kTileK, wbuf + wbuf_index(kb, row));
    }
  }
}

// Fold one finished group's tile sums (cpart: [half][16 n][16 m] fp32) into acc ([32 n][16 m] fp32) for the
// activation block mb: acc[n] += s[n, g] * (C[n] - z'[n, g] * xsum[g, m]).
FLASHQUANT_AMX_TARGET void fold_group(const Problem& p, int64_t n0, int64_t g, int64_t mb, const float* cpart,
                                      float* acc) {
  // locals, so that the stores to acc do not make the compiler reload p's fields every row
  const int64_t G = p.G, rows = p.N - n0 < kRowsPerBlock ? p.N - n0 : kRowsPerBlock;
  const float* scales = p.scales + n0 * G + g;
  const float* zeros = p.zeros ? p.zeros + n0 * G + g : nullptr;
  const float offset = p.bits == 4 ? kInt4Offset : 0.f, default_zero = p.default_zero + offset;
  const __m512 xs = _mm512_loadu_ps(p.xsum_t + g * p.m_blocks * kTileRows + mb * kTileRows);
  for (int64_t row = 0; row < rows; ++row) {
    const __m512 z = _mm512_set1_ps(zeros ? zeros[row * G] + offset : default_zero);
    const __m512 c = _mm512_fnmadd_ps(z, xs, _mm512_load_ps(cpart + row * kTileRows));
    _mm512_store_ps(acc + row * kTileRows,
                    _mm512_fmadd_ps(_mm512_set1_ps(scales[row * G]), c, _mm512_load_ps(acc + row * kTileRows)));
  }
}

// One 32-code step: A tiles (tmm0/1) = 32 decoded weight rows from `a` ([2][16 rows][32] bf16), B tiles = the
// k-pairs of activation blocks from b0 (tmm2) and, when `pair`, b1 (tmm3); tmm4-7 accumulate their products.
FLASHQUANT_AMX_TARGET inline void tile_step(const uint16_t* a, const uint32_t* b0, const uint32_t* b1, bool pair) {
  constexpr int64_t kStride = 64;
  _tile_loadd(0, a, kStride);
  _tile_loadd(1, a + kTileRows * kTileK, kStride);
  _tile_loadd(2, b0, kStride);
  _tile_dpbf16ps(4, 0, 2);
  _tile_dpbf16ps(5, 1, 2);
  if (pair) {
    _tile_loadd(3, b1, kStride);
    _tile_dpbf16ps(6, 0, 3);
    _tile_dpbf16ps(7, 1, 3);
  }
}

// The tile products of one piece of a group, k-blocks [kb0, kb1) of the decoded chunk, for activation blocks mb
// (and mb + 1 when `pair`), into tmm4-7. `first`: the piece starts its group (tiles start at zero, else they
// continue from cpart). `last`: it ends the group (tiles are folded into acc, else parked in cpart).
FLASHQUANT_AMX_TARGET void piece(const Problem& p, int64_t n0, int64_t g, int64_t k0, int64_t kb0, int64_t kb1,
                                 int64_t mb, bool pair, bool first, bool last, const uint16_t* wbuf, float* cpart,
                                 float* acc) {
  constexpr int64_t kStride = 64;  // bytes per tile row everywhere
  float* c0 = cpart + mb * 2 * kTileRows * kTileRows;  // [half][16][16] per activation block
  float* c1 = c0 + 2 * kTileRows * kTileRows;
  if (first) {
    _tile_zero(4);
    _tile_zero(5);
    if (pair) {
      _tile_zero(6);
      _tile_zero(7);
    }
  } else {
    _tile_loadd(4, c0, kStride);
    _tile_loadd(5, c0 + kTileRows * kTileRows, kStride);
    if (pair) {
      _tile_loadd(6, c1, kStride);
      _tile_loadd(7, c1 + kTileRows * kTileRows, kStride);
    }
  }
  const uint32_t* x0 = p.xb + mb * (p.K / 2) * kTileRows;
  const uint32_t* x1 = x0 + (p.K / 2) * kTileRows;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t pair_row = (k0 + kb * kTileK) / 2;  // first k-pair of this block
    tile_step(wbuf + wbuf_index(kb, 0), x0 + pair_row * kTileRows, x1 + pair_row * kTileRows, pair);
  }
  _tile_stored(4, c0, kStride);
  _tile_stored(5, c0 + kTileRows * kTileRows, kStride);
  if (pair) {
    _tile_stored(6, c1, kStride);
    _tile_stored(7, c1 + kTileRows * kTileRows, kStride);
  }
  if (last) {
    fold_group(p, n0, g, mb, c0, acc + mb * kRowsPerBlock * kTileRows);
    if (pair) fold_group(p, n0, g, mb + 1, c1, acc + (mb + 1) * kRowsPerBlock * kTileRows);
  }
}

// fold_group for the one or two activation blocks of block_streaming; c: [block][half][16][16].
FLASHQUANT_AMX_TARGET inline void fold_streaming(const Problem& p, int64_t n0, int64_t g, bool pair, const float* c,
                                                 float* acc) {
  fold_group(p, n0, g, 0, c, acc);
  if (pair) fold_group(p, n0, g, 1, c + 2 * kTileRows * kTileRows, acc + kRowsPerBlock * kTileRows);
}

// Codes [k, k + KB * 32) of `rows` weight rows (row r at src + r * row_bytes) -> KB A buffers of 32 rows x 32 codes
// (2 KB each, consecutive).
template <int BITS, int KB>
FLASHQUANT_AMX_TARGET inline void decode_rows(const uint8_t* src, int64_t row_bytes, int64_t rows, uint16_t* buf) {
  constexpr int64_t kBytes = kTileK * BITS / 8, kBuf = kRowsPerBlock * kTileK;
  for (int64_t r = 0; r < rows; ++r, src += row_bytes, buf += kTileK)
    for (int j = 0; j < KB; ++j) {
      if constexpr (BITS == 4)
        decode_int4(src + j * kBytes, buf + j * kBuf);
      else
        decode_int8(src + j * kBytes, buf + j * kBuf);
    }
}

// M <= 32 (one or two activation blocks): one pass over k. Each step's codes of the 32 rows (KB k-blocks: 2 when
// the group has an even number of them) are decoded right before their tile products, into one of two sets of A
// buffers, so the decode (vector ports) of one step overlaps the tile products (AMX unit) of the one before, and
// the A tiles come from L1. (Decoding a whole chunk first, then multiplying, ran the two one after the other.)
template <int BITS, int KB>
FLASHQUANT_AMX_TARGET void block_streaming(const Problem& p, int64_t n0, uint16_t* abuf, float* cpart, float* acc) {
  constexpr int64_t kStride = 64, kBuf = kRowsPerBlock * kTileK;
  std::memset(acc, 0, p.m_blocks * kRowsPerBlock * kTileRows * sizeof(float));
  const bool pair = p.m_blocks == 2;
  const int64_t rows = p.N - n0 < kRowsPerBlock ? p.N - n0 : kRowsPerBlock;
  const int64_t row_bytes = p.row_bytes, blocks_per_group = p.group_size / kTileK, G = p.G;
  // rows past N stay zero in every buffer
  std::memset(abuf, 0, 2 * KB * kBuf * sizeof(uint16_t));
  const uint8_t* row0 = p.q + n0 * row_bytes;
  // This thread's next block (contiguous: 32 rows of row_bytes) is prefetched into L2 in address order, an equal
  // slice per step, so the L2 streamer sees one linear stream.
  const uint8_t* ahead = row0 + kRowsPerBlock * row_bytes;
  const int64_t steps = p.K / (KB * kTileK);
  const int64_t slice = ((kRowsPerBlock * row_bytes + steps - 1) / steps + 63) & ~int64_t(63);
  const uint32_t* x0 = p.xb;
  const uint32_t* x1 = p.xb + (p.K / 2) * kTileRows;
  int64_t step = 0;
  for (int64_t g = 0; g < G; ++g) {
    _tile_zero(4);
    _tile_zero(5);
    if (pair) {
      _tile_zero(6);
      _tile_zero(7);
    }
    for (int64_t j = 0; j < blocks_per_group; j += KB, ++step) {
      const int64_t k = (g * blocks_per_group + j) * kTileK;
      uint16_t* buf = abuf + (step & 1) * KB * kBuf;
      for (int64_t b = 0; b < slice; b += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T1);
      ahead += slice;
      decode_rows<BITS, KB>(row0 + ((k * BITS) >> 3), row_bytes, rows, buf);
      for (int t = 0; t < KB; ++t) {
        const int64_t pair_row = k / 2 + t * (kTileK / 2);
        tile_step(buf + t * kBuf, x0 + pair_row * kTileRows, x1 + pair_row * kTileRows, pair);
      }
    }
    // Group g's sums are parked in one half of cpart and folded after group g + 1's products are issued (a
    // vector load right behind a tile store of the same bytes waits for the store).
    float* c = cpart + (g & 1) * 4 * kTileRows * kTileRows;
    _tile_stored(4, c, kStride);
    _tile_stored(5, c + kTileRows * kTileRows, kStride);
    if (pair) {
      _tile_stored(6, c + 2 * kTileRows * kTileRows, kStride);
      _tile_stored(7, c + 3 * kTileRows * kTileRows, kStride);
    }
    if (g > 0) fold_streaming(p, n0, g - 1, pair, cpart + ((g - 1) & 1) * 4 * kTileRows * kTileRows, acc);
  }
  fold_streaming(p, n0, G - 1, pair, cpart + ((G - 1) & 1) * 4 * kTileRows * kTileRows, acc);
}

// Weight rows [n0, n0 + 32) against every activation row. cpart and acc hold m_blocks x 32 x 16 floats each.
FLASHQUANT_AMX_TARGET void block(const Problem& p, int64_t n0, int64_t chunk, uint16_t* wbuf, float* cpart,
                                 float* acc) {
  std::memset(acc, 0, p.m_blocks * kRowsPerBlock * kTileRows * sizeof(float));
  for (int64_t k0 = 0; k0 < p.K; k0 += chunk) {
    decode_chunk(p, n0, k0, chunk, wbuf);
    for (int64_t mb = 0; mb < p.m_blocks; mb += 2) {
      const bool pair = mb + 1 < p.m_blocks;
      // the chunk is a whole number of groups, or a whole number of chunks make one group
      for (int64_t k = k0; k < k0 + chunk;) {
        const int64_t g = k / p.group_size, group_end = (g + 1) * p.group_size;
        const int64_t piece_end = group_end < k0 + chunk ? group_end : k0 + chunk;
        piece(p, n0, g, k0, (k - k0) / kTileK, (piece_end - k0) / kTileK, mb, pair, k == g * p.group_size,
              piece_end == group_end, wbuf, cpart, acc);
        k = piece_end;
      }
    }
  }
}

// acc[mb][row][m % 16] -> out[m][n0 + row]
void write_block(const Problem& p, int64_t n0, const float* acc) {
  const int64_t rows = p.N - n0 < kRowsPerBlock ? p.N - n0 : kRowsPerBlock;
  for (int64_t m = 0; m < p.M; ++m) {
    const float* a = acc + (m / kTileRows) * kRowsPerBlock * kTileRows + m % kTileRows;
    for (int64_t row = 0; row < rows; ++row) p.out[m * p.N + n0 + row] = a[row * kTileRows];
  }
}

// x (M, K) bf16 -> [m_block][K / 2][16] pairs (rows past M are zero): every 64-byte B-tile row is one masked
// gather of a k-pair from the block's rows.
FLASHQUANT_AMX_TARGET void pack_pairs(const uint32_t* pairs, int64_t M, int64_t K, int64_t mb, int64_t i0,
                                      int64_t i1, uint32_t* xb) {
  const int64_t valid = M - mb * kTileRows < kTileRows ? M - mb * kTileRows : kTileRows;
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(K / 2)));
  const uint32_t* src = pairs + mb * kTileRows * (K / 2);
  uint32_t* dst = xb + mb * (K / 2) * kTileRows;
  for (int64_t i = i0; i < i1; ++i)
    _mm512_store_si512(dst + i * kTileRows,
                       _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, offsets, src + i, 4));
}

// The sum of each group of bf16 activations of row x, in fp32 (bf16 -> fp32 is a 16-bit shift).
FLASHQUANT_AMX_TARGET float group_sum(const uint16_t* x, int64_t group_size) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < group_size; k += 16) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)));
    acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
  return _mm512_reduce_add_ps(acc);
}

void pack_activations(const at::Tensor& x, int64_t group_size, int64_t m_blocks, uint32_t* xb, float* xsum_t) {
  const int64_t M = x.size(0), K = x.size(1), G = K / group_size, mp = m_blocks * kTileRows;
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* xv = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  // (m_block, 256 k-pairs) per task
  constexpr int64_t kPairsPerTask = 256;
  const int64_t tasks_per_block = (K / 2 + kPairsPerTask - 1) / kPairsPerTask;
  at::parallel_for(0, m_blocks * tasks_per_block, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mb = t / tasks_per_block, i0 = (t % tasks_per_block) * kPairsPerTask;
      pack_pairs(pairs, M, K, mb, i0, i0 + kPairsPerTask < K / 2 ? i0 + kPairsPerTask : K / 2, xb);
    }
  });
  std::memset(xsum_t, 0, G * mp * sizeof(float));
  at::parallel_for(0, M * G, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / G, g = i % G;
      xsum_t[g * mp + m] = group_sum(xv + m * K + g * group_size, group_size);
    }
  });
}

}  // namespace

bool amx_takes(const at::Tensor& x, int64_t group_size) {
  return x.scalar_type() == at::kBFloat16 && x.size(0) >= kAmxMinRows && group_size % kTileK == 0 &&
         simd_level_enabled() >= SimdLevel::kAmxBf16;
}

void quant_matmul_amx_bf16(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                           const at::Tensor* zeros, int64_t bits, int64_t group_size, at::Tensor& out) {
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = qdata.size(0), G = K / group_size;
  const int64_t m_blocks = (M + kTileRows - 1) / kTileRows;
  at::Tensor xb = at::empty({m_blocks * (K / 2) * kTileRows}, x.options().dtype(at::kInt));
  at::Tensor xsum_t = at::empty({G, m_blocks * kTileRows}, x.options().dtype(at::kFloat));
  pack_activations(xc, group_size, m_blocks, reinterpret_cast<uint32_t*>(xb.data_ptr<int32_t>()),
                   xsum_t.data_ptr<float>());

  Problem p{};
  p.M = M, p.N = N, p.K = K, p.G = G, p.group_size = group_size, p.bits = bits, p.m_blocks = m_blocks;
  p.q = qdata.data_ptr<uint8_t>(), p.row_bytes = qdata.size(1);
  p.scales = scales.data_ptr<float>(), p.zeros = zeros ? zeros->data_ptr<float>() : nullptr;
  p.default_zero = static_cast<float>(1 << (bits - 1));
  p.xb = reinterpret_cast<const uint32_t*>(xb.data_ptr<int32_t>());
  p.xsum_t = xsum_t.data_ptr<float>();
  p.out = out.data_ptr<float>();
  // Chunk of k decoded at a time: whole groups up to kMaxChunk, or the largest multiple of 32 that divides a
  // bigger group.
  int64_t chunk = group_size;
  if (group_size <= kMaxChunk) {
    chunk = group_size * (kMaxChunk / group_size);
    while (K % chunk) chunk -= group_size;
  } else {
    chunk = kMaxChunk;
    while (group_size % chunk) chunk -= kTileK;
  }

  const bool even = (group_size / kTileK) % 2 == 0;
  const auto streaming = bits == 4 ? (even ? block_streaming<4, 2> : block_streaming<4, 1>)
                                   : (even ? block_streaming<8, 2> : block_streaming<8, 1>);
  const int64_t n_blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    // cpart: m_blocks x [2][16][16] for block(), 2 groups x [4][16][16] for block_streaming
    const int64_t cpart_floats = std::max<int64_t>(m_blocks, 4) * kRowsPerBlock * kTileRows;
    at::Tensor scratch = at::empty({kMaxChunk * kRowsPerBlock / 2 + cpart_floats + m_blocks * kRowsPerBlock * kTileRows + 16},
                                   x.options().dtype(at::kFloat));
    // 64-byte aligned (tile loads and the aligned vector loads want it)
    float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data_ptr<float>()) + 63) & ~uintptr_t(63));
    uint16_t* wbuf = reinterpret_cast<uint16_t*>(base);
    float* cpart = base + kMaxChunk * kRowsPerBlock / 2;
    float* acc = cpart + cpart_floats;
    load_tile_config();
    for (int64_t b = b0; b < b1; ++b) {
      if (p.m_blocks <= 2)
        streaming(p, b * kRowsPerBlock, wbuf, cpart, acc);
      else
        block(p, b * kRowsPerBlock, chunk, wbuf, cpart, acc);
      write_block(p, b * kRowsPerBlock, acc);
    }
    release_tiles();
  });
}

#else  // no AMX support compiled in

bool amx_takes(const at::Tensor&, int64_t) { return false; }

void quant_matmul_amx_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor*, int64_t,
                           int64_t, at::Tensor&) {
  TORCH_CHECK(false, "flashquant was built without AMX support");
}

#endif

}  // namespace flashquant::cpu
