// simd_avx2_gemv.h: the AVX2 bodies of the dense GEMVs of kernels.h (gemv_bf16, gemv_i8,
// gemv_t_bf16) on unpacked row-major weights, for kernels_avx2.cpp, and the 8-lane bf16 -> fp32
// load its packed kernels use too. Same rules as kernels_avx2.cpp: include only from a TU
// compiled with -mavx2 -mfma; internal linkage only (static, the anonymous namespace), no STL
// code, so no AVX2-compiled COMDAT copy can leak into a lower ISA's path.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "core/tile_width.h"

namespace hybrid {
namespace {

// 8 bf16 -> 8 fp32 (exact: zero-extend, shift into the high half).
static HY_ALWAYS_INLINE __m256 y_load_bf16x8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// ---------------------------------------------------------------------------------------------
// gemv_bf16 (kernels.h): unpacked row-major bf16 W [N][K] times bf16 X [T][K], fp32 out.
// A tile is R = 4 rows (or 1 for the last n % 4) x TT <= 2 tokens: 8 ymm accumulators, 2 x TT
// widened x operands and 2 widened weight operands fit the 16 ymm. A step covers 16 inputs: one
// 32-byte load per row and token, each 32-bit lane split into its two bf16 halves as fp32 (shift
// left 16 = input 2j, mask = input 2j + 1). Rows are the outer loop, token tiles the inner one,
// so a row tile comes from memory once per call. The K % 16 tail goes through zero-padded stack
// copies (AVX2 has no 16-bit masked load), so no load reads past a row. Only the fp32 summation
// order differs from the scalar reference (the products are exact).
// ---------------------------------------------------------------------------------------------
constexpr int kGemvRows = 4;    // R
constexpr int kGemvTokens = 2;  // TT max

// Total of one ymm of partial sums.
static HY_ALWAYS_INLINE float y_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Totals of four ymm: [sum a, sum b, sum c, sum d].
static HY_ALWAYS_INLINE __m128 y_hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// A tile's sums out: out[t * ldo + r] = the total of acc[r][t] (rows = 4 or 1).
static HY_ALWAYS_INLINE void y_gemv_store(__m256 (*acc)[kGemvTokens], int rows, int tt, float* out, int64_t ldo) {
  if (rows == kGemvRows) {
#pragma GCC unroll 2
    for (int t = 0; t < tt; ++t) _mm_storeu_ps(out + t * ldo, y_hsum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
  } else {
#pragma GCC unroll 2
    for (int t = 0; t < tt; ++t) out[t * ldo] = y_hsum(acc[0][t]);
  }
}

// acc[r][t] += W row r . X token t over one step of 16 inputs (wv, xv: the raw bf16 vectors).
static HY_ALWAYS_INLINE void y_gemv_step(__m256 (*acc)[kGemvTokens], const __m256i* wv, const __m256i* xv,
                                         int rows, int tt) {
  const __m256i hi = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  __m256 xe[kGemvTokens], xo[kGemvTokens];
#pragma GCC unroll 2
  for (int t = 0; t < tt; ++t) {
    xe[t] = _mm256_castsi256_ps(_mm256_slli_epi32(xv[t], 16));
    xo[t] = _mm256_castsi256_ps(_mm256_and_si256(xv[t], hi));
  }
#pragma GCC unroll 4
  for (int r = 0; r < rows; ++r) {
    const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv[r], 16));
    const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv[r], hi));
#pragma GCC unroll 2
    for (int t = 0; t < tt; ++t) acc[r][t] = _mm256_fmadd_ps(wo, xo[t], _mm256_fmadd_ps(we, xe[t], acc[r][t]));
  }
}

// 16 bf16 from p[0, n), n in [1, 15], zero-padded.
static HY_ALWAYS_INLINE __m256i y_load_bf16_partial(const uint16_t* p, int64_t n) {
  alignas(32) uint16_t buf[16] = {};
  std::memcpy(buf, p, size_t(n) * 2);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

// One tile: rows [0, rows) of w (rows = 4 or 1), tokens [0, tt) of x, out[t * ldo + r].
static HY_ALWAYS_INLINE void y_gemv_tile(const uint16_t* w, int64_t ldw, int64_t k, const uint16_t* x,
                                         int64_t ldx, int rows, int tt, float* out, int64_t ldo) {
  __m256 acc[kGemvRows][kGemvTokens];
#pragma GCC unroll 4
  for (int r = 0; r < rows; ++r)
#pragma GCC unroll 2
    for (int t = 0; t < tt; ++t) acc[r][t] = _mm256_setzero_ps();
  __m256i wv[kGemvRows], xv[kGemvTokens];
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + i));
#pragma GCC unroll 2
    for (int t = 0; t < tt; ++t) xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * ldx + i));
    y_gemv_step(acc, wv, xv, rows, tt);
  }
  if (i < k) {
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) wv[r] = y_load_bf16_partial(w + r * ldw + i, k - i);
#pragma GCC unroll 2
    for (int t = 0; t < tt; ++t) xv[t] = y_load_bf16_partial(x + t * ldx + i, k - i);
    y_gemv_step(acc, wv, xv, rows, tt);
  }
  y_gemv_store(acc, rows, tt, out, ldo);
}

static void y_gemv_bf16(const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k, const uint16_t* x,
                        int64_t t, int64_t ldx, float* out, int64_t ldo) {
  gemv_walk<kGemvRows, kGemvTokens>(
      w, ldw, n0, n1, x, t, ldx, out, ldo, [&](const uint16_t* wr, const uint16_t* xt, auto R, auto TT, float* ot) HY_INLINE_LAMBDA {
        y_gemv_tile(wr, ldw, k, xt, ldx, R(), TT(), ot, ldo);
      });
}

// ---------------------------------------------------------------------------------------------
// gemv_i8 (kernels.h): unpacked row-major int8 W [N][K] times bf16 X [T][K], fp32 sums (the
// per-row scale is dense.cpp's). The tiles of y_gemv_bf16 (4 or 1 rows x TT <= 2 tokens); a step
// covers 8 inputs in order: 8 int8 sign-extended and converted to fp32 (exact) per row, 8 bf16
// zero-extended and shifted per token, one FMA per row and token. The K % 8 tail goes through
// zero-padded stack copies, so no load reads past a row.
// ---------------------------------------------------------------------------------------------
static HY_ALWAYS_INLINE void y_gemv_i8_tile(const int8_t* w, int64_t ldw, int64_t k, const uint16_t* x, int64_t ldx,
                                            int rows, int tt, float* out, int64_t ldo) {
  __m256 acc[kGemvRows][kGemvTokens];
#pragma GCC unroll 4
  for (int r = 0; r < rows; ++r)
#pragma GCC unroll 2
    for (int t = 0; t < tt; ++t) acc[r][t] = _mm256_setzero_ps();
  auto step = [&](const int8_t* const* wp, const uint16_t* const* xp) HY_INLINE_LAMBDA {
    __m256 xf[kGemvTokens];
#pragma GCC unroll 2
    for (int t = 0; t < tt; ++t)
      xf[t] = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xp[t]))), 16));
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) {
      const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wp[r]))));
#pragma GCC unroll 2
      for (int t = 0; t < tt; ++t) acc[r][t] = _mm256_fmadd_ps(wf, xf[t], acc[r][t]);
    }
  };
  const int8_t* wp[kGemvRows];
  const uint16_t* xp[kGemvTokens];
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) wp[r] = w + r * ldw + i;
#pragma GCC unroll 2
    for (int t = 0; t < tt; ++t) xp[t] = x + t * ldx + i;
    step(wp, xp);
  }
  if (i < k) {  // 1..7 inputs left, zero-padded
    alignas(16) int8_t wb[kGemvRows][16] = {};
    alignas(16) uint16_t xb[kGemvTokens][8] = {};
    for (int r = 0; r < rows; ++r) {
      std::memcpy(wb[r], w + r * ldw + i, size_t(k - i));
      wp[r] = wb[r];
    }
    for (int t = 0; t < tt; ++t) {
      std::memcpy(xb[t], x + t * ldx + i, size_t(k - i) * 2);
      xp[t] = xb[t];
    }
    step(wp, xp);
  }
  y_gemv_store(acc, rows, tt, out, ldo);
}

static void y_gemv_i8(const int8_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k, const uint16_t* x, int64_t t,
                      int64_t ldx, float* out, int64_t ldo) {
  gemv_walk<kGemvRows, kGemvTokens>(
      w, ldw, n0, n1, x, t, ldx, out, ldo, [&](const int8_t* wr, const uint16_t* xt, auto R, auto TT, float* ot) HY_INLINE_LAMBDA {
        y_gemv_i8_tile(wr, ldw, k, xt, ldx, R(), TT(), ot, ldo);
      });
}

// ---------------------------------------------------------------------------------------------
// gemv_t_bf16 (kernels.h): out[tt][j] (+)= sum_i x[tt][i] W[i][j], W bf16 [K][N] used transposed.
// The structure of simd_avx512_gemv.h's z_gemv_t_bf16 on ymm of 8 columns: a tile is NV ymm x TT
// tokens of fp32 accumulators, W row i's tile columns widened once (zero-extend, shift left 16)
// and one FMA per ymm and token with x[tt][i] broadcast, so each column is the ordered FMA sum
// of kernels.h. 16 ymm allow 8 accumulators: NV = 4 (32 columns) for 1-2 tokens, so one token
// still has 4 independent FMA chains, and NV = 2 (16 columns) for 3-4. Blocks of KB rows (~16 KiB
// of W) carry the sums through out, so later token tiles read the block from L1 and W streams
// from memory once; the first token tile prefetches its lines of the next block (see there). The
// last columns go in single-ymm tiles, then 1..7 left over in scalar FMA loops (AVX2 has no
// 16-bit masked load), the same fused steps in the same order as a vector lane.
// ---------------------------------------------------------------------------------------------
constexpr int kGemvTTokens = 4;  // TT max

// One tile over kb rows: out[t * ldo + 8 v + c] for tokens t < tt, ymm v < nv. `start`: the sums
// start from 0 and out is not read. Rows i < pf_rows prefetch the tile's bytes pf_ahead rows on.
static HY_ALWAYS_INLINE void y_gemv_t_tile(const uint16_t* w, int64_t ldw, int64_t kb, const float* x, int64_t ldx,
                                           int nv, int tt, bool start, int64_t pf_rows, int64_t pf_ahead, float* out,
                                           int64_t ldo) {
  __m256 acc[kGemvTTokens][4];
#pragma GCC unroll 4
  for (int t = 0; t < tt; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < nv; ++v) acc[t][v] = start ? _mm256_setzero_ps() : _mm256_loadu_ps(out + t * ldo + 8 * v);
  for (int64_t i = 0; i < kb; ++i) {
    const uint16_t* wr = w + i * ldw;
    if (i < pf_rows) {  // first and last byte of the tile's 16 * nv: at most 2 lines
      const char* p = reinterpret_cast<const char*>(wr + pf_ahead * ldw);
      _mm_prefetch(p, _MM_HINT_T0);
      _mm_prefetch(p + 16 * nv - 1, _MM_HINT_T0);
    }
    __m256 wv[4];
#pragma GCC unroll 4
    for (int v = 0; v < nv; ++v) wv[v] = y_load_bf16x8(wr + 8 * v);
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) {
      const __m256 xb = _mm256_broadcast_ss(x + t * ldx + i);
#pragma GCC unroll 4
      for (int v = 0; v < nv; ++v) acc[t][v] = _mm256_fmadd_ps(wv[v], xb, acc[t][v]);
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < tt; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < nv; ++v) _mm256_storeu_ps(out + t * ldo + 8 * v, acc[t][v]);
}

// Columns [0, n) of one block for tokens [0, tt): chunks of 8 * nv columns, then of 8, then single columns.
static HY_ALWAYS_INLINE void y_gemv_t_tokens(const uint16_t* w, int64_t ldw, int64_t kb, int64_t n, const float* x,
                                             int64_t ldx, int tt, bool start, int64_t pf_rows, int64_t pf_ahead,
                                             float* out, int64_t ldo) {
  const int nv = tt <= 2 ? 4 : 2;
  int64_t j = 0;
  for (; j + 8 * nv <= n; j += 8 * nv) y_gemv_t_tile(w + j, ldw, kb, x, ldx, nv, tt, start, pf_rows, pf_ahead, out + j, ldo);
  for (; j + 8 <= n; j += 8) y_gemv_t_tile(w + j, ldw, kb, x, ldx, 1, tt, start, pf_rows, pf_ahead, out + j, ldo);
  for (; j < n; ++j)
    for (int t = 0; t < tt; ++t) {
      float* o = out + t * ldo + j;
      __m128 acc = start ? _mm_setzero_ps() : _mm_load_ss(o);
      for (int64_t i = 0; i < kb; ++i)
        acc = _mm_fmadd_ss(_mm_set_ss(bf16_to_f32(w[i * ldw + j])), _mm_load_ss(x + t * ldx + i), acc);
      _mm_store_ss(o, acc);
    }
}

static void y_gemv_t_bf16(const uint16_t* w, int64_t ldw, int64_t k, int64_t n0, int64_t n1, const float* x,
                          int64_t t, int64_t ldx, float* out, int64_t ldo, bool accumulate) {
  const int64_t n = n1 - n0;
  const int64_t kb_max = 8192 / n > 16 ? 8192 / n : 16;  // KB: ~16 KiB of W per block, 16 rows or more
  for (int64_t i0 = 0; i0 < k; i0 += kb_max) {
    const int64_t kb = k - i0 < kb_max ? k - i0 : kb_max;
    const int64_t next = k - i0 - kb;  // rows of the next block, to prefetch
    const bool start = i0 == 0 && !accumulate;
    const uint16_t* wb = w + i0 * ldw + n0;
    for (int64_t t0 = 0; t0 < t; t0 += kGemvTTokens) {
      const int tt = int(t - t0 < kGemvTTokens ? t - t0 : kGemvTTokens);
      const int64_t pf_rows = t0 > 0 ? 0 : next < kb ? next : kb;
      const float* xt = x + t0 * ldx + i0;
      float* ot = out + t0 * ldo;
      switch (tt) {
        case 1: y_gemv_t_tokens(wb, ldw, kb, n, xt, ldx, 1, start, pf_rows, kb_max, ot, ldo); break;
        case 2: y_gemv_t_tokens(wb, ldw, kb, n, xt, ldx, 2, start, pf_rows, kb_max, ot, ldo); break;
        case 3: y_gemv_t_tokens(wb, ldw, kb, n, xt, ldx, 3, start, pf_rows, kb_max, ot, ldo); break;
        default: y_gemv_t_tokens(wb, ldw, kb, n, xt, ldx, 4, start, pf_rows, kb_max, ot, ldo); break;
      }
    }
  }
}

}  // namespace
}  // namespace hybrid
