// simd_avx512_gemv.h: the AVX-512 bodies of the dense bf16 GEMVs (gemv_bf16, gemv_t_bf16 of
// kernels.h), for kernels_avx512.cpp and kernels_avx512_bf16.cpp. Same rules as simd_avx512.h
// (internal linkage only; include only from a TU compiled with at least -mavx512f -mavx512bw
// -mavx512vl -mavx512dq), whose helpers it uses.
#pragma once
#include "core/simd_avx512.h"
#include "core/tile_width.h"

namespace hybrid {
namespace {

// ---------------------------------------------------------------------------------------------
// gemv_bf16 (kernels.h): unpacked row-major bf16 W [N][K] times bf16 X [T][K], fp32 out.
// A tile is R = 4 rows (or 1 for the last n % 4) x TT <= 4 tokens, R x TT zmm accumulators of 16
// partial sums each, reduced horizontally once at the end. Each step covers 32 inputs: one 64-byte
// load per row and per token, so every x load serves 4 rows and every weight load TT tokens.
// Rows are the outer loop and token tiles the inner one: a row tile is read from memory once per
// call and from L1/L2 for the next token tiles (4 rows of K = 18432 are 144 KiB). No software
// prefetch: the hardware streamer follows the 4 row streams; prefetching each row 1, 2 or 4 KiB
// ahead measured no gain at T = 1 (7168 x 8192 and 1536 x 7168, 1 thread) and a loss at T = 4.
//
// Two bodies share this code: plain AVX-512 splits each 32-bit lane into its two bf16 halves as
// fp32 (low half: shift left 16 = input 2j, high half: mask = input 2j + 1) and does two FMAs;
// the avx512_bf16 TU (which defines __AVX512BF16__) uses one vdpbf16ps on the pairs as loaded.
// Both sum the pairs of 16 lanes in a different order from the scalar loop; the products are
// exact, so only the fp32 summation order differs. The K % 32 tail uses masked loads (masked
// lanes read as 0 and never fault), so any K works without touching memory past a row.
//
// Legend: R rows per tile, TT tokens per tile, 32 inputs (bf16) per zmm step.
// ---------------------------------------------------------------------------------------------
#define HY_Z_GEMV_TT_MAX 4
#define HY_Z_GEMV_ROWS 4

// Totals of four zmm of partial sums: [sum a, sum b, sum c, sum d].
static HY_ALWAYS_INLINE __m128 z_hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
  const __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  const __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
  // hadd pairs within 128-bit lanes: [a0+a1 a2+a3 b0+b1 b2+b3 | a4+a5 a6+a7 b4+b5 b6+b7]
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// A tile's sums out: out[t * ldo + r] = the total of acc[r][t] (rows = 4 or 1).
static HY_ALWAYS_INLINE void z_gemv_store(__m512 (*acc)[HY_Z_GEMV_TT_MAX], int rows, int tt, float* out, int64_t ldo) {
  if (rows == HY_Z_GEMV_ROWS) {
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) _mm_storeu_ps(out + t * ldo, z_hsum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
  } else {
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) out[t * ldo] = _mm512_reduce_add_ps(acc[0][t]);
  }
}

// acc[r][t] += W row r . X token t over one step of 32 inputs (wv, xv: the raw bf16 vectors).
// The FMA body is bound by its vector ALU ports (widening + 2 FMAs per row), not by the chain of
// two dependent FMAs: splitting even and odd products into separate accumulators measured no
// faster for T = 1 and slower for T = 2.
static HY_ALWAYS_INLINE void z_gemv_step(__m512 (*acc)[HY_Z_GEMV_TT_MAX], const __m512i* wv, const __m512i* xv,
                                         int rows, int tt, bool dot) {
#ifdef __AVX512BF16__
  if (dot) {
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < tt; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], (__m512bh)xv[t]);
    return;
  }
#endif
  const __m512i hi = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  __m512 xe[HY_Z_GEMV_TT_MAX], xo[HY_Z_GEMV_TT_MAX];
#pragma GCC unroll 4
  for (int t = 0; t < tt; ++t) {
    xe[t] = _mm512_castsi512_ps(_mm512_slli_epi32(xv[t], 16));  // inputs 2j
    xo[t] = _mm512_castsi512_ps(_mm512_and_si512(xv[t], hi));   // inputs 2j + 1
  }
#pragma GCC unroll 4
  for (int r = 0; r < rows; ++r) {
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv[r], 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv[r], hi));
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) acc[r][t] = _mm512_fmadd_ps(wo, xo[t], _mm512_fmadd_ps(we, xe[t], acc[r][t]));
  }
}

// One tile: rows [0, rows) of w (rows = 4 or 1), tokens [0, tt) of x, out[t * ldo + r].
static HY_ALWAYS_INLINE void z_gemv_tile(const uint16_t* w, int64_t ldw, int64_t k, const uint16_t* x,
                                         int64_t ldx, int rows, int tt, bool dot, float* out, int64_t ldo) {
  __m512 acc[HY_Z_GEMV_ROWS][HY_Z_GEMV_TT_MAX];
#pragma GCC unroll 4
  for (int r = 0; r < rows; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) acc[r][t] = _mm512_setzero_ps();
  __m512i wv[HY_Z_GEMV_ROWS], xv[HY_Z_GEMV_TT_MAX];
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) wv[r] = _mm512_loadu_si512(w + r * ldw + i);
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) xv[t] = _mm512_loadu_si512(x + t * ldx + i);
    z_gemv_step(acc, wv, xv, rows, tt, dot);
  }
  if (i < k) {  // 1..31 inputs left: masked lanes load as zero on both sides
    const __mmask32 m = __mmask32((1u << (k - i)) - 1u);
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w + r * ldw + i);
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) xv[t] = _mm512_maskz_loadu_epi16(m, x + t * ldx + i);
    z_gemv_step(acc, wv, xv, rows, tt, dot);
  }
  z_gemv_store(acc, rows, tt, out, ldo);
}

// vdpbf16ps only for one token: its throughput here is one per ~2 cycles (32 products) against two
// FMAs per cycle (16 products each), so once the widening of W is shared by 2+ tokens the FMA body
// is faster (measured, 1 thread, 256 x 512 in L2: T = 1 dp 4.9 us vs FMA 7.4 us; T = 2 7.6 vs 6.6;
// T = 4 14.1 vs 11.2; 12288 x 1536 from L3: T = 1 1.60 vs 1.80 ms, T = 4 2.77 vs 2.38 ms).
// The whole entry; `dot` (vdpbf16ps) only where __AVX512BF16__ is defined.
static HY_ALWAYS_INLINE void z_gemv_bf16_body(const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k,
                                              const uint16_t* x, int64_t t, int64_t ldx, float* out, int64_t ldo,
                                              bool dot) {
  gemv_walk<HY_Z_GEMV_ROWS, HY_Z_GEMV_TT_MAX>(
      w, ldw, n0, n1, x, t, ldx, out, ldo, [&](const uint16_t* wr, const uint16_t* xt, auto R, auto TT, float* ot) HY_INLINE_LAMBDA {
        z_gemv_tile(wr, ldw, k, xt, ldx, R(), TT(), TT() == 1 && dot, ot, ldo);
      });
}

[[maybe_unused]] static void z_gemv_bf16(const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k,
                                         const uint16_t* x, int64_t t, int64_t ldx, float* out, int64_t ldo) {
  z_gemv_bf16_body(w, ldw, n0, n1, k, x, t, ldx, out, ldo, false);
}

// ---------------------------------------------------------------------------------------------
// gemv_i8 (kernels.h): unpacked row-major int8 W [N][K] times bf16 X [T][K], fp32 sums (the
// per-row scale is dense.cpp's). A tile is R = 4 rows (or 1) x TT <= 4 tokens of zmm
// accumulators; a step covers 16 inputs: each row's 16 int8 sign-extended and converted to fp32
// (exact), each token's 16 bf16 zero-extended and shifted into fp32, one FMA per row and token.
// Inputs stay in order (no even / odd split as in gemv_bf16), so a step is one 16-byte load per
// row: a 4-row tile reads 64 weight bytes per step against the bf16 GEMV's 256. The K % 16 tail
// uses masked loads (masked lanes read as 0 and never fault).
// ---------------------------------------------------------------------------------------------
static HY_ALWAYS_INLINE void z_gemv_i8_tile(const int8_t* w, int64_t ldw, int64_t k, const uint16_t* x, int64_t ldx,
                                            int rows, int tt, float* out, int64_t ldo) {
  __m512 acc[HY_Z_GEMV_ROWS][HY_Z_GEMV_TT_MAX];
#pragma GCC unroll 4
  for (int r = 0; r < rows; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) acc[r][t] = _mm512_setzero_ps();
  auto step = [&](const __m128i* wv, const __m256i* xv) HY_INLINE_LAMBDA {
    __m512 xf[HY_Z_GEMV_TT_MAX];
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) xf[t] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(xv[t]), 16));
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) {
      const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(wv[r]));
#pragma GCC unroll 4
      for (int t = 0; t < tt; ++t) acc[r][t] = _mm512_fmadd_ps(wf, xf[t], acc[r][t]);
    }
  };
  __m128i wv[HY_Z_GEMV_ROWS];
  __m256i xv[HY_Z_GEMV_TT_MAX];
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) wv[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw + i));
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * ldx + i));
    step(wv, xv);
  }
  if (i < k) {  // 1..15 inputs left
    const __mmask16 m = __mmask16((1u << (k - i)) - 1u);
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r) wv[r] = _mm_maskz_loadu_epi8(m, w + r * ldw + i);
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) xv[t] = _mm256_maskz_loadu_epi16(m, x + t * ldx + i);
    step(wv, xv);
  }
  z_gemv_store(acc, rows, tt, out, ldo);
}

[[maybe_unused]] static void z_gemv_i8(const int8_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k,
                                       const uint16_t* x, int64_t t, int64_t ldx, float* out, int64_t ldo) {
  gemv_walk<HY_Z_GEMV_ROWS, HY_Z_GEMV_TT_MAX>(
      w, ldw, n0, n1, x, t, ldx, out, ldo, [&](const int8_t* wr, const uint16_t* xt, auto R, auto TT, float* ot) HY_INLINE_LAMBDA {
        z_gemv_i8_tile(wr, ldw, k, xt, ldx, R(), TT(), ot, ldo);
      });
}

// ---------------------------------------------------------------------------------------------
// gemv_t_bf16 (kernels.h): out[tt][j] (+)= sum_i x[tt][i] W[i][j], W bf16 [K][N] used transposed.
// Axpy form, vectorised over columns: a tile is NV zmm of 16 consecutive columns x TT <= 4 tokens
// of fp32 accumulators (64 columns x 4 tokens = 16 zmm); for each row i it widens the tile's
// columns of W row i once (zero-extend, shift left 16) and does one FMA per zmm and token with
// x[tt][i] broadcast. So each column is the ordered sum over i of kernels.h, one FMA per step.
//
// The K loop is cut into blocks of KB rows (about 16 KiB of W), and the tiles of a block pass
// their accumulators on through out (loaded and stored once per block): every token tile after
// the first reads the block's W from L1, so W streams from memory once per call for any T, and
// the column chunks of a block touch the same few pages back to back, not once per chunk over
// the whole of K (a 256K-row latent cache is 300 MB). The first token tile of each chunk
// prefetches the chunk's lines of the next block (KB rows ahead): the rows are 1152 bytes apart
// and a chunk reads 128 bytes of each, a stride the hardware prefetchers follow poorly. Measured
// (K x N = 131072 x 512, ldw 576, 1 thread, from RAM, medians of 7 alternating rounds on a 2-vCPU
// KVM guest shared with another job): 7.4 -> 9.4 GB/s at T = 1 and 5.0 -> 7.7 at T = 4; from L3
// (K = 4096) 19.4 -> 21.5 and 13.0 -> 16.0 (a plain read of the rows: ~14 and ~24 GB/s).
// Prefetching whole rows of the next block instead (every chunk's lines, in the first chunk) was
// ~10% faster from RAM but 25% slower from L3; blocks of 32 or 64 rows measured no better; and
// splitting each 32-bf16 load into even and odd columns (half the widening work, permutes at
// every block edge) gained up to 10% at T = 1 from RAM but lost 20% on a 128-row W in L2.
// The last 1..63 columns go in single-zmm tiles, the last one with masked loads and stores
// (masked lanes never fault), so any column range works.
//
// Legend: NV zmm per column chunk (16 columns each), TT tokens per tile, KB rows per block.
// ---------------------------------------------------------------------------------------------
#define HY_Z_GEMVT_TT 4  // TT max
#define HY_Z_GEMVT_NV 4  // NV of a full chunk: 64 columns

// The lanes of m of 16 bf16 -> fp32 (other lanes 0, their memory not touched).
static HY_ALWAYS_INLINE __m512 z_load_bf16x16_mask(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// One tile over kb rows: out[t * ldo + 16 v + c] for tokens t < tt, zmm v < nv (the last one
// limited to the lanes of `last` when `masked`). `start`: the sums start from 0 and out is not
// read. Rows i < pf_rows prefetch their tile's bytes [0, pf_bytes) pf_ahead rows further on.
static HY_ALWAYS_INLINE void z_gemv_t_tile(const uint16_t* w, int64_t ldw, int64_t kb, const float* x, int64_t ldx,
                                           int nv, int tt, bool masked, __mmask16 last, bool start, int64_t pf_rows,
                                           int64_t pf_ahead, int pf_bytes, float* out, int64_t ldo) {
  __m512 acc[HY_Z_GEMVT_TT][HY_Z_GEMVT_NV];
#pragma GCC unroll 4
  for (int t = 0; t < tt; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < nv; ++v) {
      const float* o = out + t * ldo + 16 * v;
      acc[t][v] = start ? _mm512_setzero_ps() : masked && v == nv - 1 ? _mm512_maskz_loadu_ps(last, o) : _mm512_loadu_ps(o);
    }
  for (int64_t i = 0; i < kb; ++i) {
    const uint16_t* wr = w + i * ldw;
    if (i < pf_rows) {  // first and last byte: the tile's 32 * nv bytes span at most 3 lines
      const char* p = reinterpret_cast<const char*>(wr + pf_ahead * ldw);
      _mm_prefetch(p, _MM_HINT_T0);
      if (pf_bytes > 64) _mm_prefetch(p + 64, _MM_HINT_T0);
      _mm_prefetch(p + pf_bytes - 1, _MM_HINT_T0);
    }
    __m512 wv[HY_Z_GEMVT_NV];
#pragma GCC unroll 4
    for (int v = 0; v < nv; ++v)
      wv[v] = masked && v == nv - 1 ? z_load_bf16x16_mask(wr + 16 * v, last) : z_load_bf16x16(wr + 16 * v);
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t * ldx + i]);
#pragma GCC unroll 4
      for (int v = 0; v < nv; ++v) acc[t][v] = _mm512_fmadd_ps(wv[v], xb, acc[t][v]);
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < tt; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < nv; ++v) {
      float* o = out + t * ldo + 16 * v;
      if (masked && v == nv - 1) _mm512_mask_storeu_ps(o, last, acc[t][v]);
      else _mm512_storeu_ps(o, acc[t][v]);
    }
}

#define HY_Z_GEMVT_DISPATCH(nv, masked, last, ...)                                                  \
  switch (tt) {                                                                                     \
    case 1: z_gemv_t_tile(__VA_ARGS__, nv, 1, masked, last, start, pf_rows, kb_max, pf_bytes, ot, ldo); break; \
    case 2: z_gemv_t_tile(__VA_ARGS__, nv, 2, masked, last, start, pf_rows, kb_max, pf_bytes, ot, ldo); break; \
    case 3: z_gemv_t_tile(__VA_ARGS__, nv, 3, masked, last, start, pf_rows, kb_max, pf_bytes, ot, ldo); break; \
    default: z_gemv_t_tile(__VA_ARGS__, nv, 4, masked, last, start, pf_rows, kb_max, pf_bytes, ot, ldo); break; \
  }

[[maybe_unused]] static void z_gemv_t_bf16(const uint16_t* w, int64_t ldw, int64_t k, int64_t n0, int64_t n1,
                                           const float* x, int64_t t, int64_t ldx, float* out, int64_t ldo,
                                           bool accumulate) {
  const int64_t n = n1 - n0;
  const int64_t kb_max = 8192 / n > 16 ? 8192 / n : 16;  // KB: ~16 KiB of W per block, 16 rows or more
  for (int64_t i0 = 0; i0 < k; i0 += kb_max) {
    const int64_t kb = k - i0 < kb_max ? k - i0 : kb_max;
    const int64_t next = k - i0 - kb;                     // rows of the next block, to prefetch
    const int64_t pf_next = next < kb ? next : kb;
    const bool start = i0 == 0 && !accumulate;
    const uint16_t* wb = w + i0 * ldw + n0;
    const float* xb = x + i0;
    int64_t j = 0;
    for (; j + 16 * HY_Z_GEMVT_NV <= n; j += 16 * HY_Z_GEMVT_NV) {
      const int pf_bytes = 32 * HY_Z_GEMVT_NV;
      for (int64_t t0 = 0; t0 < t; t0 += HY_Z_GEMVT_TT) {
        const int tt = int(t - t0 < HY_Z_GEMVT_TT ? t - t0 : HY_Z_GEMVT_TT);
        const int64_t pf_rows = t0 == 0 ? pf_next : 0;
        float* ot = out + t0 * ldo + j;
        HY_Z_GEMVT_DISPATCH(HY_Z_GEMVT_NV, false, __mmask16(0xFFFF), wb + j, ldw, kb, xb + t0 * ldx, ldx)
      }
    }
    for (; j < n; j += 16) {
      const int cols = int(n - j < 16 ? n - j : 16);
      const __mmask16 last = __mmask16((1u << cols) - 1u);
      const int pf_bytes = 2 * cols;
      for (int64_t t0 = 0; t0 < t; t0 += HY_Z_GEMVT_TT) {
        const int tt = int(t - t0 < HY_Z_GEMVT_TT ? t - t0 : HY_Z_GEMVT_TT);
        const int64_t pf_rows = t0 == 0 ? pf_next : 0;
        float* ot = out + t0 * ldo + j;
        HY_Z_GEMVT_DISPATCH(1, true, last, wb + j, ldw, kb, xb + t0 * ldx, ldx)
      }
    }
  }
}

}  // namespace
}  // namespace hybrid
