// simd_iq.h: the lattice types' operands (kquant.h: IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ1_M) built
// in registers from their packed grid indices, for the K-type scaffolds of simd_avx512.h
// (z_iq_operands, 16 rows in a zmm) and kernels_avx2.cpp (y_iq_operands, rows 8h..8h+7 in a ymm).
// Per piece of one group (8 inputs, or 4 for IQ3_XXS) and row: the index entry, a gather of the
// codebook word it names (8 or 4 int8 values, input order), the signs (a per-byte mask from the
// sign byte: bit j of byte r for lane r's byte j), IQ1's x 8 and +-1 delta, then ^ 0x80: the u8
// operand u = v + 128 of kquant.h's signed-table convention. For 8-value entries two gathers
// give [rows][8 bytes], and a dword permute splits them into the operands of inputs 0-3 and 4-7.
// Include only from an AVX2 (Y) or AVX-512 (Z) translation unit after kquant.h; internal linkage.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "core/kquant.h"
#include "core/tile_width.h"

namespace hybrid {
namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ---- AVX-512: 16 rows -------------------------------------------------------------------------
// 7-bit sign index s (dword lanes) -> its ksigns mask: s | parity(s) << 7 (iq_grids.h's kIqSigns).
static HY_ALWAYS_INLINE __m512i z_iq_signs7(__m512i s) {
  __m512i p = _mm512_xor_si512(s, _mm512_srli_epi32(s, 4));
  p = _mm512_xor_si512(p, _mm512_srli_epi32(p, 2));
  p = _mm512_xor_si512(p, _mm512_srli_epi32(p, 1));
  return _mm512_or_si512(s, _mm512_slli_epi32(_mm512_and_si512(p, _mm512_set1_epi32(1)), 7));
}

// Negate the bytes of v whose sign bit is set: sign byte of lane r in the low byte of dword r;
// `bits` the per-byte bit of dword lanes (0x08040201: sign bits 0-3, 0x80402010: bits 4-7).
static HY_ALWAYS_INLINE __m512i z_iq_apply_signs(__m512i v, __m512i sgn, uint32_t bits) {
  const __m512i ctl = _mm512_set_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808,
                                       0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000,
                                       0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000);
  const __m512i srep = _mm512_shuffle_epi8(sgn, ctl);  // the sign byte in all 4 bytes of its dword
  const __mmask64 neg = _mm512_test_epi8_mask(srep, _mm512_set1_epi32(int32_t(bits)));
  return _mm512_mask_sub_epi8(v, neg, _mm512_setzero_si512(), v);
}

template <WeightFormat F>
static HY_ALWAYS_INLINE void z_iq_operands(const uint8_t* tile, int g, __m512i* wv) {
  constexpr KQ k = kq_of(F);
  const __m512i flip = _mm512_set1_epi8(int8_t(0x80));
  const void* grid = iq_grid_words(k);
  if constexpr (k.gw == 4) {  // IQ3_XXS: one 16-dword gather per 4-input operand
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + k.gidx_at + (g * 8 + q) * 16)));
      __m512i v = _mm512_i32gather_epi32(idx, grid, 4);
      const __m512i sgn = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + k.gsign_at + (g * 4 + q / 2) * 16)));
      v = z_iq_apply_signs(v, sgn, (q % 2) ? 0x80402010u : 0x08040201u);
      wv[q] = _mm512_xor_si512(v, flip);
    }
    return;
  }
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    const uint8_t* at = tile + k.gidx_at + (g * 4 + p) * 16 * k.gidx_bytes;
    const __m512i e = k.gidx_bytes == 2 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)))
                                        : _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
    const __m512i idx = _mm512_and_si512(e, _mm512_set1_epi32(k.grid - 1));
    const __m512i lo = _mm512_i32gather_epi64(_mm512_castsi512_si256(idx), grid, 8);       // rows 0-7
    // rows 8-15 (a lane shuffle, not vextracti64x4, whose undefined-source form GCC 12 reports)
    const __m512i hi = _mm512_i32gather_epi64(_mm512_castsi512_si256(_mm512_shuffle_i64x2(idx, idx, 0x0E)), grid, 8);
    __m512i a = _mm512_permutex2var_epi32(lo, even, hi);  // inputs 0-3 of each row
    __m512i b = _mm512_permutex2var_epi32(lo, odd, hi);   // inputs 4-7
    if constexpr (k.gsign || k.gsign7) {
      const __m512i sgn = k.gsign7 ? z_iq_signs7(_mm512_srli_epi32(e, 9))
                                   : _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + k.gsign_at + (g * 4 + p) * 16)));
      a = z_iq_apply_signs(a, sgn, 0x08040201u);
      b = z_iq_apply_signs(b, sgn, 0x80402010u);
    }
    if constexpr (k.gdelta) {  // 8 v +- 1: v in {-1, 0, 1}, a byte-wise << 3 then the delta
      const __m512i m = _mm512_set1_epi8(int8_t(0xF8));
      const __mmask16 neg = _mm512_test_epi32_mask(e, _mm512_set1_epi32(0x8000));
      const __m512i dv = _mm512_mask_blend_epi32(neg, _mm512_set1_epi8(1), _mm512_set1_epi8(-1));
      a = _mm512_add_epi8(_mm512_and_si512(_mm512_slli_epi16(a, 3), m), dv);
      b = _mm512_add_epi8(_mm512_and_si512(_mm512_slli_epi16(b, 3), m), dv);
    }
    wv[2 * p] = _mm512_xor_si512(a, flip);
    wv[2 * p + 1] = _mm512_xor_si512(b, flip);
  }
}
#endif

#if defined(__AVX2__)
// ---- AVX2: rows 8h..8h+7 ----------------------------------------------------------------------
static HY_ALWAYS_INLINE __m256i y_iq_signs7(__m256i s) {
  __m256i p = _mm256_xor_si256(s, _mm256_srli_epi32(s, 4));
  p = _mm256_xor_si256(p, _mm256_srli_epi32(p, 2));
  p = _mm256_xor_si256(p, _mm256_srli_epi32(p, 1));
  return _mm256_or_si256(s, _mm256_slli_epi32(_mm256_and_si256(p, _mm256_set1_epi32(1)), 7));
}

static HY_ALWAYS_INLINE __m256i y_iq_apply_signs(__m256i v, __m256i sgn, uint32_t bits) {
  const __m256i ctl = _mm256_set_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808,
                                       0x04040404, 0x00000000);
  const __m256i bv = _mm256_set1_epi32(int32_t(bits));
  const __m256i srep = _mm256_shuffle_epi8(sgn, ctl);
  const __m256i neg = _mm256_cmpeq_epi8(_mm256_and_si256(srep, bv), bv);  // 0xFF: negate
  return _mm256_sub_epi8(_mm256_xor_si256(v, neg), neg);
}

template <WeightFormat F>
static HY_ALWAYS_INLINE void y_iq_operands(const uint8_t* tile, int g, int h, __m256i* wv) {
  constexpr KQ k = kq_of(F);
  const __m256i flip = _mm256_set1_epi8(int8_t(0x80));
  const auto* grid = static_cast<const int*>(iq_grid_words(k));
  auto sign_bytes = [&](int piece) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tile + k.gsign_at + (g * 4 + piece) * 16 + 8 * h)));
  };
  if constexpr (k.gw == 4) {  // IQ3_XXS
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tile + k.gidx_at + (g * 8 + q) * 16 + 8 * h)));
      __m256i v = _mm256_i32gather_epi32(grid, idx, 4);
      v = y_iq_apply_signs(v, sign_bytes(q / 2), (q % 2) ? 0x80402010u : 0x08040201u);
      wv[q] = _mm256_xor_si256(v, flip);
    }
    return;
  }
  const auto* grid64 = reinterpret_cast<const long long*>(grid);
  const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    const uint8_t* at = tile + k.gidx_at + ((g * 4 + p) * 16 + 8 * h) * k.gidx_bytes;
    const __m256i e = k.gidx_bytes == 2 ? _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)))
                                        : _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
    const __m256i idx = _mm256_and_si256(e, _mm256_set1_epi32(k.grid - 1));
    const __m256i g0 = _mm256_permutevar8x32_epi32(_mm256_i32gather_epi64(grid64, _mm256_castsi256_si128(idx), 8), split);
    const __m256i g1 = _mm256_permutevar8x32_epi32(_mm256_i32gather_epi64(grid64, _mm256_extracti128_si256(idx, 1), 8), split);
    __m256i a = _mm256_permute2x128_si256(g0, g1, 0x20);  // inputs 0-3 of rows 0-7 of the half
    __m256i b = _mm256_permute2x128_si256(g0, g1, 0x31);  // inputs 4-7
    if constexpr (k.gsign || k.gsign7) {
      const __m256i sgn = k.gsign7 ? y_iq_signs7(_mm256_srli_epi32(e, 9)) : sign_bytes(p);
      a = y_iq_apply_signs(a, sgn, 0x08040201u);
      b = y_iq_apply_signs(b, sgn, 0x80402010u);
    }
    if constexpr (k.gdelta) {
      const __m256i m = _mm256_set1_epi8(int8_t(0xF8));
      const __m256i pos = _mm256_cmpeq_epi32(_mm256_and_si256(e, _mm256_set1_epi32(0x8000)), _mm256_setzero_si256());
      const __m256i dv = _mm256_blendv_epi8(_mm256_set1_epi8(-1), _mm256_set1_epi8(1), pos);
      a = _mm256_add_epi8(_mm256_and_si256(_mm256_slli_epi16(a, 3), m), dv);
      b = _mm256_add_epi8(_mm256_and_si256(_mm256_slli_epi16(b, 3), m), dv);
    }
    wv[2 * p] = _mm256_xor_si256(a, flip);
    wv[2 * p + 1] = _mm256_xor_si256(b, flip);
  }
}
#endif

}  // namespace
}  // namespace hybrid
