// Attention of a few new query tokens (decode, speculative verification) against a contiguous or paged KV cache,
// on the CPU: backend="cpu" of flashquant.attention_with_kvcache, and of attention / attention_varlen.
//
// Work split: one task per (sequence b, range of keys, range of KV heads); by default a task takes every KV head,
// so it reads the cache's (key, head, dim) rows in memory order and the hardware prefetchers see one stream
// (one task per head, reading 256 B of every 2 KB key row, ran at half the bandwidth). Within a task, each KV
// head h serves the R = Sq * G query rows that share it (G = Hq / Hkv), so each K/V byte is read once and
// never once per query head (K/V are not repeated for GQA). Keys go in blocks (key_block: 8 KB of a head's K):
// the scores of every row (QK^T), an online softmax in base 2, then P @ V into fp32 row accumulators; rows are
// taken kRowTile at a time inside the block, so the block's K and V stay in L1 while every row tile uses them.
// Long sequences have their keys split into pieces of about 1 / (2 x threads) of all the keys of the batch, at least
// 512 (batch 1: four pieces on two threads), and the pieces' partial outputs are merged with their log-sum-exp at the end
// (flash-decoding); heads are split only when the caches are too short to split their keys. Threads take tasks
// costliest first as they finish one, so a batch of ragged lengths (a server's) keeps them equally busy.
// attention_varlen's packed batches run the same tasks, each sequence's queries and keys found from cu_seqlens.
//
// Everything is computed in fp32; K and V are converted as they are loaded (bf16: a shift, fp16: F16C), except
// that bf16 scores on CPUs with AVX512-BF16 multiply q and K as bf16 pairs (vdpbf16ps: each product is exact in
// fp32, the sums are fp32). The SIMD steps (kvcache_attention_tile.inc) are compiled for AVX2 (8 lanes) and for
// AVX-512 (16 lanes, 32 registers; used where the CPU also has AVX512-BF16 and D % 16 == 0); their exp2 is a
// degree-6 polynomial on [-0.5, 0.5] (relative error ~2e-7, about one fp32 ulp). The portable path (other CPUs,
// D % 8 != 0, or FLASHQUANT_CPU_SIMD=0) has the same structure with std::exp2. bf16 caches with amx::kMinRows or
// more rows per KV head run the same walk on AMX tiles where the CPU has them (run_task_amx, "AMX path" below).
#include "cpu/kvcache_attention.h"
#include "cpu/amx.h"
#include "cpu/simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace flashquant::cpu {
namespace {

constexpr int64_t kKeyBlock = 64;  // the most keys per block (score rows are kKeyBlock apart)
constexpr int kRowTile = 8;        // query rows per tile: 8 ymm accumulators
constexpr int64_t kAhead = 16;     // software prefetch distance, in key rows of the walk (heads, then blocks)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Keys per block for key rows of row_bytes (one head): 8 KB of K per head, 16 to kKeyBlock keys (bf16 / fp16 at
// D = 128: 32 keys, fp32: 16). A task walks its heads block by block, so the block sets how far apart in memory
// the rows read back to back are. With the cache in DRAM, against 64-key blocks: bf16 0-4% faster, fp32 7-12%
// faster; 16-key (4 KB) blocks in bf16 were 5-12% slower, the per-block work growing (interleaved A/B runs,
// bench/NOTES.md "Session 17").
constexpr int64_t key_block(int64_t row_bytes) {
  const int64_t keys = (8 << 10) / row_bytes;
  return keys >= kKeyBlock ? kKeyBlock : keys <= 16 ? 16 : keys;
}

struct Problem {
  int64_t B, Sq, Hq, Hkv, D, G, R;  // Sq: the most tokens of a sequence; R = Sq * G: the most rows of a task
  int64_t rows;                     // query tokens in all: B * Sq, or cu_q[B]
  const float* q;                   // (rows, Hq, D) fp32, contiguous
  const int32_t* cu_q;              // (B + 1,) packed (varlen) queries: sequence b is tokens [cu_q[b], cu_q[b+1]);
                                    // nullptr: b * Sq + [0, Sq)
  const int32_t* k_first;           // (B,) contiguous caches: key j of sequence b is position k_first[b] + j of batch
                                    // row b (varlen: cu_k on a cache with batch stride 0; left padding: its length);
                                    // nullptr: position j (of batch row b, or of its blocks)
  float q_scale;                    // softmax_scale * log2(e), or softmax_scale alone when softcap > 0
  float softcap;                    // > 0: score -> softcap * tanh(score / softcap) * log2(e)
  const void* k;
  const void* v;
  int64_t k_stride[3], v_stride[3];  // elements, dims 0..2 of the caches (dim 3 has unit stride)
  const int32_t* seqlens;            // (B,)
  const int32_t* table;              // (B, table_stride) paged block indices, or nullptr: contiguous cache
  int64_t table_stride, block_size;
  int64_t left, right;  // window; right = 0 when causal, -1 = unbounded
  int64_t splits, head_chunks, heads_per_task;  // splits: the most of any sequence (tasks: B x splits x head_chunks)
  const int32_t* seq_splits;                    // (B,): how many pieces sequence b's keys are split into
  const int64_t* task_order;                    // every task, the costliest first (the order threads take them in)
  float* part_out;  // (splits, rows, Hq, D): each split's normalized output
  float* part_lse;  // (splits, rows, Hq): each split's log2-sum-exp2 (-inf: saw no key)
};

// Keys [lo, hi) that query token s of a sequence with sq tokens and len visible keys may see (bottom-right aligned).
inline void row_bounds(const Problem& p, int64_t len, int64_t sq, int64_t s, int64_t& lo, int64_t& hi) {
  const int64_t pos = len - sq + s;
  lo = p.left >= 0 ? std::max<int64_t>(0, pos - p.left) : 0;
  hi = p.right >= 0 ? std::min(len, pos + p.right + 1) : len;
  hi = std::max(hi, lo);
}

// The top half of an fp32 that came from a bf16 (exact): its bf16 bits.
inline uint16_t bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);
}

template <typename T>
inline const T* key_row(const Problem& p, const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t j) {
  int64_t off;
  if (p.table) {
    const int64_t blk = p.table[b * p.table_stride + j / p.block_size];
    off = blk * stride[0] + (j % p.block_size) * stride[1];
  } else {
    off = b * stride[0] + (p.k_first ? p.k_first[b] + j : j) * stride[1];
  }
  return static_cast<const T*>(base) + off + h * stride[2];
}

// ---- portable path ---------------------------------------------------------------------------------
template <typename T>
void scores_scalar(const float* q, int64_t D, int rt, const T* const* kp, int64_t nk, float* sc) {
  for (int r = 0; r < rt; ++r) {
    for (int64_t j = 0; j < nk; ++j) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += q[r * D + d] * static_cast<float>(kp[j][d]);
      sc[r * kKeyBlock + j] = dot;
    }
  }
}

template <typename T>
void pv_scalar(const float* pr, int rt, const T* const* vp, int64_t nk, int64_t D, float* acc) {
  for (int r = 0; r < rt; ++r)
    for (int64_t j = 0; j < nk; ++j) {
      const float w = pr[r * kKeyBlock + j];
      for (int64_t d = 0; d < D; ++d) acc[r * D + d] += w * static_cast<float>(vp[j][d]);
    }
}

void exp2_scalar(float* s, int64_t n, float m, float& sum) {
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp2(s[j] - m);  // exp2(-inf) = 0: masked keys
    sum += s[j];
  }
}

// ---- SIMD paths: kvcache_attention_tile.inc once per instruction set ---------------------------------
// The query rows of a tile as the SIMD steps read them: f, fp32 rows already multiplied by the softmax scale; b, for
// the bf16 dot, the caller's bf16 rows unscaled (b_scale is applied to their dot products).
struct QRows {
  const float* f;
  const uint16_t* b;
  float b_scale;
};

#ifdef FLASHQUANT_X86
// AVX2 + FMA + F16C: 8 fp32 lanes; fp16 converted by F16C, bf16 by a shift (bf16 is the top half of an fp32).
FLASHQUANT_TARGET_PUSH("avx2,fma,f16c")
namespace avx2 {
#include "cpu/vec_avx2.inc"
#include "cpu/kvcache_attention_tile.inc"
}  // namespace avx2
FLASHQUANT_TARGET_POP

// AVX-512 F/BW/VL + BF16 (what run_tasks checks): 16 fp32 lanes in 32 registers; bf16 scores by vdpbf16ps.
FLASHQUANT_TARGET_PUSH("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")
namespace avx512 {
struct V {
  using fvec = __m512;
  using bvec = __m512bh;
  static constexpr int kLanes = 16, kRegisters = 32;
  static constexpr bool kBf16Dot = true;
  static inline fvec zero() { return _mm512_setzero_ps(); }
  static inline fvec set1(float f) { return _mm512_set1_ps(f); }
  static inline fvec loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline fvec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline fvec load(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline fvec load(const at::BFloat16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static inline bvec loadb(const uint16_t* p) { return reinterpret_cast<bvec>(_mm512_loadu_si512(p)); }
  static inline fvec dot_bf16(fvec acc, bvec a, bvec b) { return _mm512_dpbf16_ps(acc, a, b); }
  static inline void store(float* p, fvec v) { _mm512_storeu_ps(p, v); }
  static inline fvec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline fvec add(fvec a, fvec b) { return _mm512_add_ps(a, b); }
  static inline fvec sub(fvec a, fvec b) { return _mm512_sub_ps(a, b); }
  static inline fvec mul(fvec a, fvec b) { return _mm512_mul_ps(a, b); }
  static inline fvec max(fvec a, fvec b) { return _mm512_max_ps(a, b); }
  static inline fvec fmadd(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline fvec round(fvec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline fvec pow2(fvec n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static inline fvec keep_ge(fvec y, fvec x, fvec t) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, t, _CMP_GE_OQ), y);
  }
  static inline float hsum(fvec v) { return _mm512_reduce_add_ps(v); }
  static inline float hmax(fvec v) { return _mm512_reduce_max_ps(v); }
  // Each zmm folded to a ymm (its halves added), then avx2's tree.
  static constexpr int kSumGroup = 8;
  static inline void hsum_group(const fvec* acc, float* out) {
    __m256 half[8];
    for (int i = 0; i < 8; ++i)
      half[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1)));
    avx2::V::hsum_group(half, out);
  }
};
#include "cpu/kvcache_attention_tile.inc"
}  // namespace avx512
FLASHQUANT_TARGET_POP
#endif  // FLASHQUANT_X86

// ---- the steps of one row tile, by path ------------------------------------------------------------
// The portable steps; each SIMD namespace has a Steps<T> with the same interface (kvcache_attention_tile.inc).
// n_ptr >= nk row pointers in kp / vp: the SIMD steps prefetch those past nk.
template <typename T>
struct ScalarSteps {
  static constexpr bool kBf16Q = false;  // whether scores read QRows::b
  static void scores(const QRows& q, int64_t D, int rt, const T* const* kp, int64_t nk, int64_t, float* sc) {
    scores_scalar<T>(q.f, D, rt, kp, nk, sc);
  }
  static void exp2_row(float* s, int64_t n, float m, float& sum) { exp2_scalar(s, n, m, sum); }
  static float row_max(const float* s, int64_t n) {
    float best = kNegInf;
    for (int64_t j = 0; j < n; ++j) best = std::max(best, s[j]);
    return best;
  }
  static void scale_row(float* a, int64_t n, float f) {
    for (int64_t d = 0; d < n; ++d) a[d] *= f;
  }
  static void pv(const float* pr, int rt, const T* const* vp, int64_t nk, int64_t, int64_t D, float* acc) {
    pv_scalar<T>(pr, rt, vp, nk, D, acc);
  }
};

// ---- one task: (sequence b, split of its keys, range of KV heads) -----------------------------------
struct Scratch {
  std::vector<float> q, acc, m, l, sc;
  std::vector<uint16_t> qb;
  std::vector<int64_t> lo, hi;
  std::vector<const void*> kp, vp;
  // the AMX path's (run_task_amx)
  std::vector<uint32_t> qpack, vpack, pack;
  std::vector<uint16_t> kbuf;
  std::vector<int32_t> lo_row, hi_row;
  std::vector<int64_t> tile_lo, tile_hi;
};

// What a task covers: KV heads [h0, h0 + nh) of sequence b (len visible keys; query tokens q0 .. q0 + sq - 1, R =
// sq * G rows per KV head), keys [start, end) (this split's share of the keys any row sees, in whole blocks of
// block_keys). Fills w.lo / w.hi: each token's keys.
struct Task {
  int64_t b, split, h0, nh, len, q0, sq, R, start, end;
};

inline Task task_keys(const Problem& p, int64_t task, int64_t block_keys, Scratch& w) {
  Task t{};
  const int64_t hc = task % p.head_chunks;
  t.split = task / p.head_chunks % p.splits;
  t.b = task / (p.head_chunks * p.splits);
  t.h0 = hc * p.heads_per_task, t.nh = std::min(p.Hkv, t.h0 + p.heads_per_task) - t.h0;
  t.len = p.seqlens[t.b];
  t.q0 = p.cu_q ? p.cu_q[t.b] : t.b * p.Sq;
  t.sq = p.cu_q ? p.cu_q[t.b + 1] - t.q0 : p.Sq;
  t.R = t.sq * p.G;
  w.lo.resize(t.sq), w.hi.resize(t.sq);
  int64_t k_lo = t.len, k_hi = 0;
  for (int64_t s = 0; s < t.sq; ++s) {
    row_bounds(p, t.len, t.sq, s, w.lo[s], w.hi[s]);
    if (w.hi[s] > w.lo[s]) k_lo = std::min(k_lo, w.lo[s]), k_hi = std::max(k_hi, w.hi[s]);
  }
  t.start = t.end = k_hi;
  if (k_hi > k_lo) {
    const int64_t blocks = (k_hi - k_lo + block_keys - 1) / block_keys;
    const int64_t splits = p.seq_splits[t.b];  // a split past them gets no keys: lse -inf, merged as nothing
    const int64_t per = (blocks + splits - 1) / splits * block_keys;
    t.start = std::min(k_hi, k_lo + t.split * per);
    t.end = std::min(k_hi, t.start + per);
  }
  return t;
}

// The task's query row r of KV head h0 + hl: token r / G, query head (h0 + hl) * G + r % G; its fp32 values.
inline const float* q_row(const Problem& p, const Task& t, int64_t hl, int64_t r) {
  return p.q + ((t.q0 + r / p.G) * p.Hq + (t.h0 + hl) * p.G + r % p.G) * p.D;
}

// Normalizes the task's rows and writes them, with their log2-sum-exp2, to this split's partial results. Row r of
// KV head hl sits at hl * row_stride + r in acc (rows of D), m and l.
void write_task(const Problem& p, const Task& t, int64_t row_stride, const float* acc, const float* m,
                const float* l) {
  const int64_t D = p.D, G = p.G;
  for (int64_t hl = 0; hl < t.nh; ++hl)
    for (int64_t r = 0; r < t.R; ++r) {
      const int64_t i = hl * row_stride + r;
      const int64_t out_row = (t.split * p.rows + t.q0 + r / G) * p.Hq + (t.h0 + hl) * G + r % G;
      const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
      for (int64_t d = 0; d < D; ++d) p.part_out[out_row * D + d] = acc[i * D + d] * inv;
      p.part_lse[out_row] = l[i] > 0.f ? m[i] + std::log2(l[i]) : kNegInf;
    }
}

template <typename T, typename Steps>
void run_task(const Problem& p, int64_t task, Scratch& w) {
  const int64_t block_keys = key_block(p.D * static_cast<int64_t>(sizeof(T)));
  const Task t = task_keys(p, task, block_keys, w);
  const int64_t R = t.R, D = p.D, G = p.G, nh = t.nh, b = t.b, h0 = t.h0, len = t.len, start = t.start,
                end = t.end;
  // Rows hl * R + r: KV head h0 + hl, token r / G, query head (h0 + hl) * G + r % G.
  w.q.resize(nh * R * D), w.acc.assign(nh * R * D, 0.f), w.m.assign(nh * R, kNegInf), w.l.assign(nh * R, 0.f);
  w.sc.resize(kRowTile * kKeyBlock);
  w.kp.resize(kKeyBlock + kAhead), w.vp.resize(kKeyBlock + kAhead);
  for (int64_t hl = 0; hl < nh; ++hl)
    for (int64_t r = 0; r < R; ++r) {
      const float* src = q_row(p, t, hl, r);
      float* dst = w.q.data() + (hl * R + r) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * p.q_scale;
    }
  if constexpr (Steps::kBf16Q) {  // q's bf16 bits for the bf16 dot (q came in as bf16: exact)
    w.qb.resize(nh * R * D);
    for (int64_t hl = 0; hl < nh; ++hl)
      for (int64_t r = 0; r < R; ++r) {
        const float* src = q_row(p, t, hl, r);
        uint16_t* dst = w.qb.data() + (hl * R + r) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = bf16_bits(src[d]);
      }
  }
  const T** kp = reinterpret_cast<const T**>(w.kp.data());
  const T** vp = reinterpret_cast<const T**>(w.vp.data());
  for (int64_t j0 = start; j0 < end; j0 += block_keys) {
    const int64_t nk = std::min(block_keys, end - j0);
    for (int64_t hl = 0; hl < nh; ++hl) {
      for (int64_t jj = 0; jj < nk; ++jj) {
        kp[jj] = key_row<T>(p, p.k, p.k_stride, b, h0 + hl, j0 + jj);
        vp[jj] = key_row<T>(p, p.v, p.v_stride, b, h0 + hl, j0 + jj);
      }
      // Then the first kAhead rows of the next (head, block) of this walk, which the steps prefetch as this one
      // ends. (Prefetching this head's next block instead, 7 heads of work before it is read, was 4-14% slower
      // in bf16 with the cache in DRAM: those rows had left L1 by then.)
      const int64_t next_hl = hl + 1 < nh ? hl + 1 : 0, next_j0 = hl + 1 < nh ? j0 : j0 + block_keys;
      const int64_t n_next = std::clamp<int64_t>(end - next_j0, 0, kAhead);
      for (int64_t jj = 0; jj < n_next; ++jj) {
        kp[nk + jj] = key_row<T>(p, p.k, p.k_stride, b, h0 + next_hl, next_j0 + jj);
        vp[nk + jj] = key_row<T>(p, p.v, p.v_stride, b, h0 + next_hl, next_j0 + jj);
      }
      const int64_t n_ptr = nk + n_next;
      for (int64_t t0 = 0; t0 < R; t0 += kRowTile) {
        const int rt = static_cast<int>(std::min<int64_t>(kRowTile, R - t0));
        const int64_t s_first = t0 / G, s_last = (t0 + rt - 1) / G;
        int64_t tile_lo = len, tile_hi = 0;
        for (int64_t s = s_first; s <= s_last; ++s) tile_lo = std::min(tile_lo, w.lo[s]), tile_hi = std::max(tile_hi, w.hi[s]);
        if (tile_hi <= j0 || tile_lo >= j0 + nk || tile_hi <= tile_lo) continue;  // no row of the tile sees these keys
        const int64_t row0 = hl * R + t0;
        const QRows qt{w.q.data() + row0 * D, w.qb.empty() ? nullptr : w.qb.data() + row0 * D, p.q_scale};
        float* acc = w.acc.data() + row0 * D;
        float* sc = w.sc.data();
        Steps::scores(qt, D, rt, kp, nk, t0 == 0 ? n_ptr : nk, sc);
        for (int i = 0; i < rt; ++i) {
          float* s = sc + i * kKeyBlock;
          const int64_t lo = w.lo[(t0 + i) / G], hi = w.hi[(t0 + i) / G];
          if (p.softcap > 0.f)
            for (int64_t jj = 0; jj < nk; ++jj) s[jj] = p.softcap * std::tanh(s[jj] / p.softcap) * kLog2e;
          if (lo > j0 || hi < j0 + nk)  // the mask, only on blocks that cross one of this row's bounds
            for (int64_t jj = 0; jj < nk; ++jj)
              if (j0 + jj < lo || j0 + jj >= hi) s[jj] = kNegInf;
          float& m = w.m[row0 + i];
          float& l = w.l[row0 + i];
          const float m_new = std::max(m, Steps::row_max(s, nk));
          if (m_new == kNegInf) {  // the row has seen no key yet: nothing to add
            std::fill(s, s + nk, 0.f);
            continue;
          }
          const float alpha = std::exp2(m - m_new);  // 0 when m was -inf (acc is still 0 then)
          float sum = 0.f;
          Steps::exp2_row(s, nk, m_new, sum);
          l = l * alpha + sum;
          m = m_new;
          if (alpha != 1.f) Steps::scale_row(acc + i * D, D, alpha);
        }
        Steps::pv(sc, rt, vp, nk, t0 == 0 ? n_ptr : nk, D, acc);
      }
    }
  }
  write_task(p, t, R, w.acc.data(), w.m.data(), w.l.data());
}

#ifdef FLASHQUANT_AMX
// ---- AMX path: bf16 caches with at least amx::kMinRows query rows per KV head ------------------------------
// From a few rows per KV head on (speculative decoding, chunked prefill), the vector steps are bound by their
// multiplies, not by memory (bench/NOTES.md "Session 17"); one tdpbf16ps does 16 x 16 x 32 products. Per block of 32
// keys and KV head, for each tile of 16 query rows:
//   scores  S^T (32 keys x 16 rows) = K q^T: K rows are the A operand as they lie in the cache (tileloadd takes a
//           row stride; a tile of 16 keys that crosses a page, or the block's partial tail, is copied first), q is
//           the B operand, packed once per task into bf16 pairs. Products exact, sums fp32: as the vector path.
//   softmax in that transposed layout a vector holds one key's scores for the 16 rows, so the running max, exp2
//           and row sums are plain lane-wise vector steps.
//   P @ V   O (16 rows x D) += P V, on O's fp32 rows in memory. P (fp32) is split into two bf16 parts, P = hi + lo
//           (relative error 2^-17), so the output keeps the vector path's accuracy (one rounding of an fp32
//           result); its A tiles are the transpose of the softmax's layout (16 gathers). V is packed per block into
//           the key pairs tdpbf16ps wants as B.
namespace amx {

constexpr int64_t kRows = 16;  // query rows per tile; keys per score tile
constexpr int64_t kKeys = 32;  // keys per block: one tdpbf16ps of P @ V
// Fewest query rows per KV head (Sq * G) for this path. Its step costs about the same for 1 to 16 rows; the vector
// steps' cost grows with the rows. Interleaved, Llama-3-8B heads (G = 4), bf16, caches of 2k-8k keys, vector time /
// this path's: 12 rows (Sq = 3) 1.20-1.39, 8 rows 0.88-0.99, 4 rows 0.57-0.64 (bench/NOTES.md "Session 18").
constexpr int64_t kMinRows = 12;

// A tile of n <= 16 K rows (D bf16 each) as tileloadd reads it: the cache itself when the rows are 16 and evenly
// spaced, else copied into buf (16 x D, zero rows past n).
FLASHQUANT_AMX_TARGET inline void k_tile_source(const at::BFloat16* const* rows, int64_t n, int64_t D, uint16_t* buf,
                                                const void*& src, int64_t& stride) {
  if (n == kRows) {
    const char* first = reinterpret_cast<const char*>(rows[0]);
    const int64_t step = reinterpret_cast<const char*>(rows[1]) - first;
    bool even = step > 0;
    for (int64_t i = 2; i < kRows && even; ++i) even = reinterpret_cast<const char*>(rows[i]) - first == i * step;
    if (even) {
      src = first, stride = step;
      return;
    }
  }
  for (int64_t i = 0; i < kRows; ++i) {
    if (i < n)
      std::memcpy(buf + i * D, rows[i], D * 2);
    else
      std::memset(buf + i * D, 0, D * 2);
  }
  src = buf, stride = D * 2;
}

// V rows of a block (nk <= 32; zeros past nk) -> vpack[dt][jp][16]: per tile of 16 columns, key pair jp's two values
// of each column as one bf16 pair, the B operand of P @ V.
FLASHQUANT_AMX_TARGET inline void pack_v(const at::BFloat16* const* rows, int64_t nk, int64_t D, uint32_t* vpack) {
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx_lo = _mm512_load_si512(kLo);
  const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
  for (int64_t jp = 0; jp < kKeys / 2; ++jp) {
    const at::BFloat16* a = 2 * jp < nk ? rows[2 * jp] : nullptr;
    const at::BFloat16* b = 2 * jp + 1 < nk ? rows[2 * jp + 1] : nullptr;
    for (int64_t c = 0; c < D / 32; ++c) {
      const __m512i va = a ? _mm512_loadu_si512(a + 32 * c) : _mm512_setzero_si512();
      const __m512i vb = b ? _mm512_loadu_si512(b + 32 * c) : _mm512_setzero_si512();
      _mm512_storeu_si512(vpack + (2 * c * kRows + jp) * 16, _mm512_permutex2var_epi16(va, idx_lo, vb));
      _mm512_storeu_si512(vpack + ((2 * c + 1) * kRows + jp) * 16, _mm512_permutex2var_epi16(va, idx_hi, vb));
    }
  }
}

// fp32 lanes -> bf16 bits (round to nearest even) in the low half of each 32-bit lane, and the fp32 value of that.
FLASHQUANT_AMX_TARGET inline __m512i to_bf16(__m512 x, __m512& back) {
  const __m512i h = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
  back = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  return h;
}

// P (sc: [32 keys][16 rows] fp32) -> the A operands of P @ V: pack[0] = hi, pack[1] = lo parts, each [16 rows][16
// key pairs] of bf16 pairs, P = hi + lo up to 2^-17 relative. tmp: 2 x 256 words.
FLASHQUANT_AMX_TARGET inline void pack_p(const float* sc, uint32_t* tmp, uint32_t* pack) {
  for (int64_t jp = 0; jp < kKeys / 2; ++jp) {
    __m512 a_back, b_back, unused;
    const __m512 a = _mm512_loadu_ps(sc + 2 * jp * kRows), b = _mm512_loadu_ps(sc + (2 * jp + 1) * kRows);
    const __m512i a_hi = to_bf16(a, a_back), b_hi = to_bf16(b, b_back);
    const __m512i a_lo = to_bf16(_mm512_sub_ps(a, a_back), unused), b_lo = to_bf16(_mm512_sub_ps(b, b_back), unused);
    _mm512_storeu_si512(tmp + jp * 16, _mm512_or_si512(a_hi, _mm512_slli_epi32(b_hi, 16)));
    _mm512_storeu_si512(tmp + 256 + jp * 16, _mm512_or_si512(a_lo, _mm512_slli_epi32(b_lo, 16)));
  }
  const __m512i by_pair = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(16));
  for (int part = 0; part < 2; ++part)
    for (int64_t m = 0; m < kRows; ++m)  // row m: its 16 key pairs, a column of tmp
      _mm512_storeu_si512(pack + part * 256 + m * 16, _mm512_i32gather_epi32(by_pair, tmp + part * 256 + m, 4));
}

// The lane-wise online softmax of one row tile over one block: sc ([32][16] raw q.k sums) -> P (fp32, 0 for keys
// a row does not see), updating the tile's running max m (log2 units) and sum l, and scaling the rows of acc
// (16 x D) whose max moved.
FLASHQUANT_AMX_TARGET inline void softmax_block(const Problem& p, int64_t j0, int64_t nk, const int32_t* lo_row,
                                                const int32_t* hi_row, float* sc, float* m, float* l, float* acc) {
  if (p.softcap > 0.f)  // rare (Gemma-2-style models): the scalar tanh of run_task's path
    for (int64_t i = 0; i < nk * kRows; ++i) sc[i] = p.softcap * std::tanh(sc[i] * p.q_scale / p.softcap) * kLog2e;
  const __m512 scale = _mm512_set1_ps(p.softcap > 0.f ? 1.f : p.q_scale);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const __m512i lo = _mm512_loadu_si512(lo_row), hi = _mm512_loadu_si512(hi_row);
  __m512 block_max = neg_inf;
  for (int64_t j = 0; j < kKeys; ++j) {
    const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(j0 + j));
    const __mmask16 sees = j < nk ? _mm512_cmpge_epi32_mask(key, lo) & _mm512_cmplt_epi32_mask(key, hi) : 0;
    const __m512 s = _mm512_mask_mul_ps(neg_inf, sees, _mm512_loadu_ps(sc + j * kRows), scale);
    _mm512_storeu_ps(sc + j * kRows, s);
    block_max = _mm512_max_ps(block_max, s);
  }
  const __m512 m_old = _mm512_loadu_ps(m);
  const __m512 m_new = _mm512_max_ps(m_old, block_max);
  // rows that have seen no key yet subtract 0 instead of -inf (their scores are all -inf: P = 0, alpha = 0)
  const __m512 m_sub = _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ), _mm512_setzero_ps());
  const __m512 alpha = avx512::exp2v(_mm512_sub_ps(m_old, m_sub));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < kKeys; ++j) {
    const __m512 e = avx512::exp2v(_mm512_sub_ps(_mm512_loadu_ps(sc + j * kRows), m_sub));
    _mm512_storeu_ps(sc + j * kRows, e);
    sum = _mm512_add_ps(sum, e);
  }
  _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), alpha, sum));
  _mm512_storeu_ps(m, m_new);
  const __mmask16 moved = _mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.f), _CMP_NEQ_UQ);
  if (moved) {
    alignas(64) float a[kRows];
    _mm512_store_ps(a, alpha);
    for (int64_t r = 0; r < kRows; ++r)
      if (moved >> r & 1) avx512::scale_acc(acc + r * p.D, p.D, a[r]);
  }
}

// One row tile's scores for a block: tmm0 / tmm1 = keys 0-15 / 16-31 x 16 rows, stored to sc ([32][16] fp32).
FLASHQUANT_AMX_TARGET inline void scores(const uint32_t* qpack, int64_t chunks, const void* const* ksrc,
                                         const int64_t* kstride, bool two, float* sc) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(3, qpack + c * 256, 64);
    _tile_loadd(2, static_cast<const char*>(ksrc[0]) + c * 64, kstride[0]);
    _tile_dpbf16ps(0, 2, 3);
    if (two) {
      _tile_loadd(4, static_cast<const char*>(ksrc[1]) + c * 64, kstride[1]);
      _tile_dpbf16ps(1, 4, 3);
    }
  }
  _tile_stored(0, sc, 64);
  _tile_stored(1, sc + kRows * kRows, 64);
}

// acc (16 rows x D fp32, row stride D) += (hi + lo) @ V: pack = P's A operands (tmm4, tmm5), vpack = V's B operands.
// (Three column tiles in flight instead of two measured the same.)
FLASHQUANT_AMX_TARGET inline void pv(const uint32_t* pack, const uint32_t* vpack, int64_t D, float* acc) {
  _tile_loadd(4, pack, 64);
  _tile_loadd(5, pack + 256, 64);
  for (int64_t dt = 0; dt < D / 16; dt += 2) {  // D % 32 == 0: column tiles in pairs, so two chains overlap
    _tile_loadd(0, acc + dt * 16, D * 4);
    _tile_loadd(1, acc + (dt + 1) * 16, D * 4);
    _tile_loadd(2, vpack + dt * 256, 64);
    _tile_loadd(3, vpack + (dt + 1) * 256, 64);
    _tile_dpbf16ps(0, 4, 2);
    _tile_dpbf16ps(1, 4, 3);
    _tile_dpbf16ps(0, 5, 2);
    _tile_dpbf16ps(1, 5, 3);
    _tile_stored(0, acc + dt * 16, D * 4);
    _tile_stored(1, acc + (dt + 1) * 16, D * 4);
  }
}

// One task (run_task's split of the work) on tiles. Rows of KV head hl: hl * Rp + r, r < R real, R <= r < Rp zero
// padding (they see no key).
FLASHQUANT_AMX_TARGET void run_task_amx(const Problem& p, int64_t task, Scratch& w) {
  const Task t = task_keys(p, task, kKeys, w);
  const int64_t R = t.R, D = p.D, nh = t.nh, tiles = (R + kRows - 1) / kRows, Rp = tiles * kRows, chunks = D / 32;
  w.acc.assign(nh * Rp * D, 0.f), w.m.assign(nh * Rp, kNegInf), w.l.assign(nh * Rp, 0.f);
  // q as bf16 pairs: [hl][tile][chunk of 32 columns][16 column pairs][16 rows]
  w.qpack.assign(nh * tiles * chunks * 256, 0u);
  for (int64_t hl = 0; hl < nh; ++hl)
    for (int64_t r = 0; r < R; ++r) {
      const float* src = q_row(p, t, hl, r);
      uint32_t* dst = w.qpack.data() + (hl * tiles + r / kRows) * chunks * 256 + r % kRows;
      for (int64_t d = 0; d < D; d += 2)
        dst[(d / 32) * 256 + (d % 32) / 2 * kRows] = bf16_bits(src[d]) | uint32_t{bf16_bits(src[d + 1])} << 16;
    }
  // Each row's keys, lane-wise; each row tile's union of them.
  w.lo_row.assign(Rp, 0), w.hi_row.assign(Rp, 0), w.tile_lo.assign(tiles, t.len), w.tile_hi.assign(tiles, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t lo = w.lo[r / p.G], hi = w.hi[r / p.G];
    w.lo_row[r] = static_cast<int32_t>(lo), w.hi_row[r] = static_cast<int32_t>(hi);
    if (hi > lo) w.tile_lo[r / kRows] = std::min(w.tile_lo[r / kRows], lo), w.tile_hi[r / kRows] = std::max(w.tile_hi[r / kRows], hi);
  }
  w.sc.resize(kKeys * kRows), w.kbuf.resize(kKeys * D), w.vpack.resize(D / 16 * 256), w.pack.resize(4 * 256);
  w.kp.resize(kKeys), w.vp.resize(kKeys);
  const at::BFloat16** kp = reinterpret_cast<const at::BFloat16**>(w.kp.data());
  const at::BFloat16** vp = reinterpret_cast<const at::BFloat16**>(w.vp.data());
  // No software prefetch here: issuing the next (head, block)'s rows one, two or four steps ahead was 0-5%, 9-25%
  // and 7-16% slower than issuing each step's own rows as it starts (no lead: in effect none), interleaved runs.
  for (int64_t j0 = t.start; j0 < t.end; j0 += kKeys) {
    const int64_t nk = std::min(kKeys, t.end - j0);
    for (int64_t hl = 0; hl < nh; ++hl) {
      for (int64_t jj = 0; jj < nk; ++jj) {
        kp[jj] = key_row<at::BFloat16>(p, p.k, p.k_stride, t.b, t.h0 + hl, j0 + jj);
        vp[jj] = key_row<at::BFloat16>(p, p.v, p.v_stride, t.b, t.h0 + hl, j0 + jj);
      }
      const void* ksrc[2] = {nullptr, nullptr};
      int64_t kstride[2] = {0, 0};
      for (int64_t half = 0; half * kRows < nk; ++half)
        k_tile_source(kp + half * kRows, std::min(kRows, nk - half * kRows), D, w.kbuf.data() + half * kRows * D,
                      ksrc[half], kstride[half]);
      pack_v(vp, nk, D, w.vpack.data());
      for (int64_t tile = 0; tile < tiles; ++tile) {
        if (w.tile_hi[tile] <= j0 || w.tile_lo[tile] >= j0 + nk || w.tile_hi[tile] <= w.tile_lo[tile]) continue;
        const int64_t row0 = hl * Rp + tile * kRows;
        float* acc = w.acc.data() + row0 * D;
        scores(w.qpack.data() + (hl * tiles + tile) * chunks * 256, chunks, ksrc, kstride, nk > kRows, w.sc.data());
        softmax_block(p, j0, nk, w.lo_row.data() + tile * kRows, w.hi_row.data() + tile * kRows, w.sc.data(),
                      w.m.data() + row0, w.l.data() + row0, acc);
        pack_p(w.sc.data(), w.pack.data() + 512, w.pack.data());
        pv(w.pack.data(), w.vpack.data(), D, acc);
      }
    }
  }
  write_task(p, t, Rp, w.acc.data(), w.m.data(), w.l.data());
}

// Whether run_tasks takes this path for T: bf16, D a multiple of 32 (one tile product's columns), enough rows.
template <typename T>
bool takes(const Problem& p) {
  return std::is_same_v<T, at::BFloat16> && p.D % 32 == 0 && p.R >= kMinRows &&
         simd_level_enabled() >= SimdLevel::kAmxBf16;
}

}  // namespace amx
#endif  // FLASHQUANT_AMX

template <typename T>
void run_tasks(const Problem& p) {
  // Each thread takes the next task of p.task_order (costliest first) as it finishes one: sequences of different
  // lengths (a server's batch) give tasks of different sizes, which fixed contiguous ranges of tasks per thread
  // left unbalanced.
  const int64_t tasks = p.B * p.splits * p.head_chunks;
  std::atomic<int64_t> next{0};
  const auto run = [&](auto run_one) {
    at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      Scratch w;
      for (int64_t i = next.fetch_add(1); i < tasks; i = next.fetch_add(1)) run_one(p, p.task_order[i], w);
    });
  };
#ifdef FLASHQUANT_AMX
  if (amx::takes<T>(p))
    return run([](const Problem& pr, int64_t task, Scratch& w) {
      load_tile_config();
      amx::run_task_amx(pr, task, w);
      release_tiles();
    });
#endif
#ifdef FLASHQUANT_X86
  // The AVX-512 steps need D % 16 == 0 (bf16 scores take the dot where D % 32 == 0); AVX2's D % 8 == 0.
  const SimdLevel level = simd_level_enabled();
  if (level >= SimdLevel::kAvx512Vnni && cpu_has_avx512_bf16() && p.D % 16 == 0)
    return run(run_task<T, avx512::Steps<T>>);
  if (level >= SimdLevel::kAvx2 && p.D % 8 == 0) return run(run_task<T, avx2::Steps<T>>);
#endif
  run(run_task<T, ScalarSteps<T>>);
}

}  // namespace

namespace {

// The work both ops share once their inputs are checked. q3 (rows, Hq, D), any float dtype; k_cache / v_cache 4-D
// as in kvcache_attention_cpu; lens int32 (B,) contiguous, each within its capacity; cu_q int32 (B + 1,), k_first int32
// (B,) (Problem::k_first) and table int32, each contiguous and checked, or undefined. Returns out (rows, Hq, D) in q's dtype and lse (B, Hq, Sq) or, with cu_q, (Hq, rows).
std::tuple<at::Tensor, at::Tensor> attend(const at::Tensor& q3, int64_t B, int64_t Sq, const at::Tensor& k_cache,
                                          const at::Tensor& v_cache, const at::Tensor& lens,
                                          const at::Tensor& cu_q, const at::Tensor& k_first, const at::Tensor& table,
                                          double softmax_scale, bool causal, int64_t window_left,
                                          int64_t window_right, double softcap, int64_t num_splits) {
  const int64_t rows = q3.size(0), Hq = q3.size(1), D = q3.size(2), Hkv = k_cache.size(2);
  // Two tasks per thread where the work allows: split the keys into pieces of about 1 / (2 x threads) of all keys,
  // at least 512 (256 KB of K and V for 8 bf16 heads of 128); a sequence shorter than that is one piece. Then, when
  // that leaves fewer tasks than that (short caches), split the KV heads. num_splits > 0: that many for every sequence.
  const int64_t threads = at::get_num_threads();
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  const int64_t total_keys = std::accumulate(len_ptr, len_ptr + B, int64_t{0});
  const int64_t piece = std::max<int64_t>(512, (total_keys + 2 * threads - 1) / (2 * threads));
  std::vector<int32_t> seq_splits(B);
  int64_t splits = 1, pieces = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = num_splits > 0 ? num_splits : (len_ptr[b] + piece - 1) / piece;
    seq_splits[b] = static_cast<int32_t>(std::clamp<int64_t>(n, 1, 1024));
    splits = std::max<int64_t>(splits, seq_splits[b]);
    pieces += seq_splits[b];
  }
  int64_t heads_per_task = Hkv;
  if (pieces < 2 * threads) {
    const int64_t chunks = std::min(Hkv, (2 * threads + pieces - 1) / std::max<int64_t>(pieces, 1));
    heads_per_task = (Hkv + chunks - 1) / chunks;
  }
  const int64_t head_chunks = (Hkv + heads_per_task - 1) / heads_per_task;
  // Task t = (b * splits + split) * head_chunks + head chunk; its cost ~ its keys x (its row tiles + 1).
  std::vector<int64_t> order(B * splits * head_chunks), cost(order.size());
  const int32_t* cq = cu_q.defined() ? cu_q.data_ptr<int32_t>() : nullptr;
  for (int64_t t = 0; t < static_cast<int64_t>(order.size()); ++t) {
    const int64_t b = t / (splits * head_chunks), split = t / head_chunks % splits;
    const int64_t sq = cq ? cq[b + 1] - cq[b] : Sq;
    const int64_t keys = split < seq_splits[b] ? (len_ptr[b] + seq_splits[b] - 1) / seq_splits[b] : 0;
    order[t] = t, cost[t] = keys * ((sq * (Hq / Hkv) + kRowTile - 1) / kRowTile + 1);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });

  const at::Tensor qf = q3.to(at::kFloat).contiguous();
  at::Tensor part_out = at::empty({splits, rows, Hq, D}, q3.options().dtype(at::kFloat));
  at::Tensor part_lse = at::empty({splits, rows, Hq}, q3.options().dtype(at::kFloat));
  const bool varlen = cu_q.defined();
  at::Tensor lse = varlen ? at::empty({Hq, rows}, q3.options().dtype(at::kFloat))
                          : at::empty({B, Hq, Sq}, q3.options().dtype(at::kFloat));
  if (q3.numel() == 0) return {at::zeros_like(q3), lse.fill_(kNegInf)};

  Problem p{};
  p.B = B, p.Sq = Sq, p.Hq = Hq, p.Hkv = Hkv, p.D = D, p.G = Hq / Hkv, p.R = Sq * p.G, p.rows = rows;
  p.q = qf.data_ptr<float>();
  p.cu_q = varlen ? cu_q.data_ptr<int32_t>() : nullptr;
  p.k_first = k_first.defined() ? k_first.data_ptr<int32_t>() : nullptr;
  p.softcap = static_cast<float>(softcap);
  p.q_scale = static_cast<float>(softcap > 0 ? softmax_scale : softmax_scale * kLog2e);
  p.k = k_cache.data_ptr(), p.v = v_cache.data_ptr();
  for (int i = 0; i < 3; ++i) p.k_stride[i] = k_cache.stride(i), p.v_stride[i] = v_cache.stride(i);
  p.seqlens = lens.data_ptr<int32_t>();
  p.table = table.defined() ? table.data_ptr<int32_t>() : nullptr;
  p.table_stride = table.defined() ? table.size(1) : 0;
  p.block_size = k_cache.size(1);
  p.left = window_left;
  p.right = causal ? 0 : window_right;
  p.splits = splits;
  p.seq_splits = seq_splits.data();
  p.task_order = order.data();
  p.heads_per_task = heads_per_task;
  p.head_chunks = head_chunks;
  p.part_out = part_out.data_ptr<float>(), p.part_lse = part_lse.data_ptr<float>();
  if (varlen) {  // query tokens outside every sequence (before cu_q[0], from cu_q[B]): zeros, as the PyTorch path
    for (int64_t sp = 0; sp < splits; ++sp)
      for (const auto& [r0, r1] : {std::pair<int64_t, int64_t>{0, p.cu_q[0]}, {p.cu_q[B], rows}}) {
        std::fill(p.part_out + (sp * rows + r0) * Hq * D, p.part_out + (sp * rows + r1) * Hq * D, 0.f);
        std::fill(p.part_lse + (sp * rows + r0) * Hq, p.part_lse + (sp * rows + r1) * Hq, kNegInf);
      }
  }
  switch (q3.scalar_type()) {
    case at::kFloat: run_tasks<float>(p); break;
    case at::kHalf: run_tasks<at::Half>(p); break;
    case at::kBFloat16: run_tasks<at::BFloat16>(p); break;
    default: TORCH_CHECK(false, "flashquant CPU attention: q must be fp32, fp16 or bf16, got ", q3.scalar_type());
  }

  // Merge the splits (a no-op copy of the log-sum-exp for one split) and convert lse to the natural log.
  at::Tensor out = splits == 1 ? part_out[0] : at::empty({rows, Hq, D}, q3.options().dtype(at::kFloat));
  const int64_t n = rows * Hq;
  float* out_ptr = out.data_ptr<float>();
  float* lse_ptr = lse.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t hq = i % Hq, row = i / Hq;
      float& lse_i = varlen ? lse_ptr[hq * rows + row] : lse_ptr[(row / Sq * Hq + hq) * Sq + row % Sq];
      float mx = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) mx = std::max(mx, p.part_lse[sp * n + i]);
      if (splits == 1) {
        lse_i = mx * kLn2;  // -inf stays -inf
        continue;
      }
      lse_i = kNegInf;
      float* o = out_ptr + i * D;
      std::fill(o, o + D, 0.f);
      if (mx == kNegInf) continue;
      float total = 0.f;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const float w = std::exp2(p.part_lse[sp * n + i] - mx);
        if (w == 0.f) continue;
        total += w;
        const float* src = p.part_out + (sp * n + i) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * src[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
      lse_i = (mx + std::log2(total)) * kLn2;
    }
  });
  return {out.to(q3.scalar_type()), lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kvcache_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                                         const std::optional<at::Tensor>& block_table,
                                                         double softmax_scale, bool causal, int64_t window_left,
                                                         int64_t window_right, double softcap, int64_t num_splits,
                                                         const std::optional<at::Tensor>& seqstart_k) {
  TORCH_CHECK(q.dim() == 4, "kvcache_attention_cpu: q must be (B, Sq, Hq, D), got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "kvcache_attention_cpu: k_cache and v_cache must both be 4-D of one shape, got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "kvcache_attention_cpu: caches ", k_cache.sizes(),
              " do not match q ", q.sizes(), " (head_dim D, Hq a multiple of Hkv)");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "kvcache_attention_cpu: k_cache/v_cache must have q's dtype ", q.scalar_type());
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "kvcache_attention_cpu: k_cache/v_cache need unit stride in head_dim");
  TORCH_CHECK(seqlens_k.dim() == 1 && seqlens_k.size(0) == B, "kvcache_attention_cpu: seqlens_k must be (B=", B,
              ",), got ", seqlens_k.sizes());
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  seqlens_k.device().is_cpu(),
              "kvcache_attention_cpu: all tensors must be on the CPU");
  const at::Tensor lens = seqlens_k.to(at::kInt).contiguous();
  at::Tensor table;
  int64_t capacity = k_cache.size(1);
  if (block_table) {
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == B,
                "kvcache_attention_cpu: block_table must be (B=", B, ", max_blocks), got ", block_table->sizes());
    table = block_table->to(at::kInt).contiguous();
    capacity = table.size(1) * k_cache.size(1);
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "kvcache_attention_cpu: a contiguous k_cache must be (B=", B,
                ", S_max, Hkv, D), got ", k_cache.sizes());
  }
  at::Tensor first;
  if (seqstart_k) {
    TORCH_CHECK(!block_table, "kvcache_attention_cpu: seqstart_k needs a contiguous cache, not a paged one");
    TORCH_CHECK(seqstart_k->dim() == 1 && seqstart_k->size(0) == B, "kvcache_attention_cpu: seqstart_k must be (B=", B,
                ",), got ", seqstart_k->sizes());
    TORCH_CHECK(seqstart_k->device().is_cpu(), "kvcache_attention_cpu: all tensors must be on the CPU");
    first = seqstart_k->to(at::kInt).contiguous();
  }
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  const int32_t* first_ptr = first.defined() ? first.data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = first_ptr ? first_ptr[b] : 0;
    TORCH_CHECK(start >= 0 && len_ptr[b] >= 0 && start + len_ptr[b] <= capacity, "kvcache_attention_cpu: keys [",
                start, ", ", start + len_ptr[b], ") of sequence ", b, " (seqstart_k, seqlens_k) are outside [0, capacity=",
                capacity, "]");
  }
  if (block_table && table.numel() > 0) {
    // A plain loop, not two ATen reductions: this runs on every decode step, after the Python API's own check.
    const int32_t* t = table.data_ptr<int32_t>();
    const auto [lo, hi] = std::minmax_element(t, t + table.numel());
    TORCH_CHECK(*lo >= 0 && *hi < k_cache.size(0), "kvcache_attention_cpu: block_table entries must lie in [0, ",
                k_cache.size(0), "), got [", *lo, ", ", *hi, "]");
  }

  const auto [out, lse] = attend(q.reshape({B * Sq, Hq, D}), B, Sq, k_cache, v_cache, lens, at::Tensor(), first,
                                 table, softmax_scale, causal, window_left,
                                 window_right, softcap, num_splits);
  return {out.view({B, Sq, Hq, D}), lse};
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                        double softmax_scale, bool causal, int64_t window_left,
                                                        int64_t window_right, double softcap, int64_t num_splits) {
  TORCH_CHECK(q.dim() == 3, "varlen_attention_cpu: q must be (total_q, Hq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(),
              "varlen_attention_cpu: k and v must both be (total_k, Hkv, D) of one shape, got ", k.sizes(), " and ",
              v.sizes());
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(2) == D && Hkv > 0 && Hq % Hkv == 0, "varlen_attention_cpu: k/v ", k.sizes(),
              " do not match q ", q.sizes(), " (head_dim D, Hq a multiple of Hkv)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "varlen_attention_cpu: k/v must have q's dtype ", q.scalar_type());
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "varlen_attention_cpu: k/v need unit stride in head_dim");
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1 && cu_seqlens_k.sizes() == cu_seqlens_q.sizes(),
              "varlen_attention_cpu: cu_seqlens_q and cu_seqlens_k must both be (B + 1,), got ", cu_seqlens_q.sizes(),
              " and ", cu_seqlens_k.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && cu_seqlens_q.device().is_cpu() &&
                  cu_seqlens_k.device().is_cpu(),
              "varlen_attention_cpu: all tensors must be on the CPU");
  const at::Tensor cu_q = cu_seqlens_q.to(at::kInt).contiguous(), cu_k = cu_seqlens_k.to(at::kInt).contiguous();
  const int64_t B = cu_q.size(0) - 1;
  const int32_t* cq = cu_q.data_ptr<int32_t>();
  const int32_t* ck = cu_k.data_ptr<int32_t>();
  at::Tensor lens = at::empty({B}, cu_k.options());
  int32_t* len_ptr = lens.data_ptr<int32_t>();
  int64_t max_q = 0;
  TORCH_CHECK(cq[0] >= 0 && ck[0] >= 0, "varlen_attention_cpu: cu_seqlens must start at 0 or later, got ", cq[0],
              " and ", ck[0]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cq[b + 1] >= cq[b] && ck[b + 1] >= ck[b], "varlen_attention_cpu: cu_seqlens must be non-decreasing",
                " (sequence ", b, ")");
    len_ptr[b] = ck[b + 1] - ck[b];
    max_q = std::max<int64_t>(max_q, cq[b + 1] - cq[b]);
  }
  TORCH_CHECK(cq[B] <= q.size(0) && ck[B] <= k.size(0), "varlen_attention_cpu: cu_seqlens end at ", cq[B], " and ",
              ck[B], ", past total_q=", q.size(0), " / total_k=", k.size(0));
  // Keys as a cache whose B batch rows are all the packed k / v (batch stride 0), sequence b's from cu_k[b] on.
  const auto rows = [B](const at::Tensor& t) { return t.unsqueeze(0).expand({B, t.size(0), t.size(1), t.size(2)}); };
  return attend(q, B, max_q, rows(k), rows(v), lens, cu_q, cu_k, at::Tensor(), softmax_scale,
                causal, window_left, window_right, softcap, num_splits);
}

}  // namespace flashquant::cpu
