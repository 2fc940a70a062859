// simd_iq.h: the lattice types' operands (kquant.h: IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ1_M) built
// in registers from their packed grid indices, for the K-type scaffolds of simd_avx512.h
// (z_iq_operands, 16 rows in a zmm) and kernels_avx2.cpp (y_iq_operands, rows 8h..8h+7 in a ymm).
// Per piece of one group (8 inputs, or 4 for IQ3_XXS) and row: the index entry, a lookup of the
// codebook word it names (8 or 4 int8 values, input order), the signs (a per-byte mask from the
// sign byte: bit j of byte r for lane r's byte j), IQ1's x 8 and +-1 delta, then ^ 0x80: the u8
// operand u = v + 128 of kquant.h's signed-table convention. For 8-value entries two lookups of 4
// give [rows][8 bytes], and a dword permute splits them into the operands of inputs 0-3 and 4-7.
// Include only from an AVX2 (Y) or AVX-512 (Z) translation unit after kquant.h; internal linkage.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "core/kquant.h"
#include "core/tile_width.h"

namespace hybrid {
namespace {

#if defined(__AVX2__)
// Codebook words at 4 entry indices read from memory, by scalar loads and inserts, not gathers:
// on this Zen 4 guest 8 scalar lookups take 0.5-0.7x the time of an 8-lane vpgatherdd and 16
// take 0.6x a 16-lane one (bench/lookup_probe.cpp); Zen 2/3's gathers are slower still, and Intel's
// since the Gather Data Sampling microcode (Skylake to Ice Lake: the AVX-512 levels without
// VBMI).
// Row r's codebook index: a uint8 index (kBytes 1), the low bits (kMask) of a uint16 entry
// (kBytes 2), or IQ1's 12-bit entry (kBytes 12, kquant.h g12: the uint16 at byte 3r/2, shifted
// right by 4 for odd r).
template <int kBytes, int kMask>
static HY_ALWAYS_INLINE uint32_t iq_index(const uint8_t* at, int r) {
  if constexpr (kBytes == 2 || kBytes == 12) {
    uint16_t e;
    __builtin_memcpy(&e, at + (kBytes == 2 ? 2 * r : 3 * r / 2), 2);
    return uint32_t(kBytes == 12 && (r & 1) ? e >> 4 : e) & uint32_t(kMask);
  } else {
    return at[r];
  }
}

template <int kBytes, int kMask, class Word>
static HY_ALWAYS_INLINE __m128i iq_dwords4(const Word* grid, const uint8_t* at, int r0) {
  __m128i v = _mm_cvtsi32_si128(int(grid[iq_index<kBytes, kMask>(at, r0)]));
  v = _mm_insert_epi32(v, int(grid[iq_index<kBytes, kMask>(at, r0 + 1)]), 1);
  v = _mm_insert_epi32(v, int(grid[iq_index<kBytes, kMask>(at, r0 + 2)]), 2);
  return _mm_insert_epi32(v, int(grid[iq_index<kBytes, kMask>(at, r0 + 3)]), 3);
}

template <int kBytes, int kMask>
static HY_ALWAYS_INLINE __m256i iq_qwords4(const long long* grid, const uint8_t* at, int r0) {
  return _mm256_set_epi64x(grid[iq_index<kBytes, kMask>(at, r0 + 3)], grid[iq_index<kBytes, kMask>(at, r0 + 2)],
                           grid[iq_index<kBytes, kMask>(at, r0 + 1)], grid[iq_index<kBytes, kMask>(at, r0)]);
}

// IQ1: the bytes holding the delta-sign bit (entry bit 11) of the 8 lanes whose 12 bytes of
// entries start at `at`: byte r has lane r's at bit 3 (even r) or 7 (odd r); the 16-byte load
// stays inside the tile (D and the scales follow the entries).
static HY_ALWAYS_INLINE __m128i iq1_sign_bytes(const uint8_t* at) {
  const __m128i pick = _mm_setr_epi8(1, 2, 4, 5, 7, 8, 10, 11, -1, -1, -1, -1, -1, -1, -1, -1);
  return _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)), pick);
}

#endif

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

// 16 rows' codebook words (iq_dwords4, iq_qwords4 above) in a zmm.
template <int kBytes, int kMask, class Word>
static HY_ALWAYS_INLINE __m512i z_dwords16(const Word* grid, const uint8_t* at) {
  __m512i v = _mm512_castsi128_si512(iq_dwords4<kBytes, kMask>(grid, at, 0));
  v = _mm512_inserti32x4(v, iq_dwords4<kBytes, kMask>(grid, at, 4), 1);
  v = _mm512_inserti32x4(v, iq_dwords4<kBytes, kMask>(grid, at, 8), 2);
  return _mm512_inserti32x4(v, iq_dwords4<kBytes, kMask>(grid, at, 12), 3);
}

template <int kBytes, int kMask>
static HY_ALWAYS_INLINE __m512i z_qwords8(const long long* grid, const uint8_t* at, int r0) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(iq_qwords4<kBytes, kMask>(grid, at, r0)),
                            iq_qwords4<kBytes, kMask>(grid, at, r0 + 4), 1);
}

#if defined(__AVX512VBMI__)
// ---- AVX-512 VBMI: the 256-entry codebooks (IQ2_XXS, IQ3_XXS) by byte permutes, no gathers -----
// Each entry is held as a code of its values' level numbers (2 bits each for IQ2_XXS's 3 levels,
// 3 for IQ3_XXS's 8): entry i's 16-bit code in two byte tables, so 64 indices (a group's, one per
// row and piece) become 64 code bytes by two vpermi2b and a blend per table. Per operand, a
// vpmultishiftqb takes each byte's value field from its row's code (its 6-bit window starts at the
// field), a vpermb maps the window to u = 128 + value (the fields above ignored), and the sign
// mask negates: 0 - (128 + v) = 128 - v (mod 256). Measured against the gathers on this 2-vCPU
// Zen 4 guest: bench/kernel_speed.py --format (1 thread, 512 x 7168 in L2), see simd_vnni.h.
struct IqCodes {
  uint8_t lo[512], hi[512];  // entry i's code, bits 0-7 and 8-15 (256 or 512 entries)
  uint8_t u[64];             // 6-bit window, field in its low bits -> 128 + the field's value
  bool ok;                   // every value of the codebook is one of the levels
};

template <class Word, int kEntries, int kValues, int kLevels>
static constexpr IqCodes iq_codes(const Word* grid, const int* levels, int bits) {
  IqCodes c{};
  c.ok = true;
  for (int i = 0; i < kEntries; ++i) {
    uint32_t code = 0;
    for (int j = 0; j < kValues; ++j) {
      const int v = int((uint64_t(grid[i]) >> (8 * j)) & 0xFF);
      int l = -1;
      for (int m = 0; m < kLevels; ++m)
        if (levels[m] == v) l = m;
      c.ok = c.ok && l >= 0;
      code |= uint32_t(l < 0 ? 0 : l) << (bits * j);
    }
    c.lo[i] = uint8_t(code);
    c.hi[i] = uint8_t(code >> 8);
  }
  for (int e = 0; e < 64; ++e) {
    const int l = e & ((1 << bits) - 1);
    c.u[e] = uint8_t(128 + (l < kLevels ? levels[l] : 0));
  }
  return c;
}

static constexpr int kIq2xxsLevels[3] = {8, 25, 43};
static constexpr int kIq3xxsLevels[8] = {4, 12, 20, 28, 36, 44, 52, 62};
alignas(64) static constexpr IqCodes kIq2xxsCodes = iq_codes<uint64_t, 256, 8, 3>(kIq2xxsGrid, kIq2xxsLevels, 2);
alignas(64) static constexpr IqCodes kIq2xsCodes = iq_codes<uint64_t, 512, 8, 3>(kIq2xsGrid, kIq2xxsLevels, 2);
alignas(64) static constexpr IqCodes kIq3xxsCodes = iq_codes<uint32_t, 256, 4, 8>(kIq3xxsGrid, kIq3xxsLevels, 3);
static_assert(kIq2xxsCodes.ok && kIq2xsCodes.ok && kIq3xxsCodes.ok, "a codebook value outside its type's levels");

// Byte table tab[256] at the 64 byte indices idx.
static HY_ALWAYS_INLINE __m512i z_lut256(const uint8_t* tab, __m512i idx) {
  const __m512i a = _mm512_permutex2var_epi8(_mm512_load_si512(tab), idx, _mm512_load_si512(tab + 64));
  const __m512i b = _mm512_permutex2var_epi8(_mm512_load_si512(tab + 128), idx, _mm512_load_si512(tab + 192));
  return _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), a, b);
}

// The permute controls of z_iq_operands_vbmi for a type with `bits` per field (piece 0; piece p
// adds 16 p to asm and rep).
struct IqVbmiControls {
  uint8_t asm_[64];  // src qword q = bytes lo, hi of row 2q, lo, hi of row 2q + 1 (hi at 64 +)
  uint8_t rep[64];   // a row's sign byte in all 4 bytes of its lane
  uint8_t sh[2][64]; // per operand half (fields 0-3, 4-7) the multishift offset of lane r, field j
  uint8_t even[64];  // IQ2_XS: the low bytes of 64 uint16 entries in two registers (odd: + 1)
};

static constexpr IqVbmiControls iq_vbmi_controls(int bits) {
  IqVbmiControls c{};
  for (int i = 0; i < 64; ++i) {
    const int q = i / 8, b = i % 4, r = (i / 4) % 2, j = i % 4;
    c.asm_[i] = uint8_t((b % 2) * 64 + 2 * q + b / 2);
    c.rep[i] = uint8_t(i / 4);
    c.sh[0][i] = uint8_t(16 * r + bits * j);
    c.sh[1][i] = uint8_t(16 * r + bits * (4 + j));
    c.even[i] = uint8_t(2 * i);
  }
  return c;
}
alignas(64) static constexpr IqVbmiControls kIqVbmi2 = iq_vbmi_controls(2);
alignas(64) static constexpr IqVbmiControls kIqVbmi3 = iq_vbmi_controls(3);

// Operands of 4 pieces (h: the 4 pieces 4h .. 4h + 3 of the group) from their code bytes lo, hi
// ([piece][row], 64 each) and the group's sign masks s64 ([piece of 8 inputs][row]). Per piece, src
// qword q holds rows 2q and 2q + 1's codes (bytes lo, hi, lo, hi): the operand's row r field j
// comes from bit 16 (r % 2) + bits (j0 + j) of that qword (IqVbmiControls::sh).
template <WeightFormat F>
static HY_ALWAYS_INLINE void z_iq_vbmi_pieces(__m512i lo, __m512i hi, __m512i s64, int h, const IqVbmiControls& ctl,
                                              __m512i utab, __m512i* wv) {
  constexpr KQ k = kq_of(F);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i asm0 = _mm512_load_si512(ctl.asm_), rep0 = _mm512_load_si512(ctl.rep);
  const __m512i sh_a = _mm512_load_si512(ctl.sh[0]), sh_b = _mm512_load_si512(ctl.sh[1]);
  const __m512i bits_a = _mm512_set1_epi32(0x08040201), bits_b = _mm512_set1_epi32(int32_t(0x80402010u));
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    const __m512i src = _mm512_permutex2var_epi8(lo, _mm512_add_epi8(asm0, _mm512_set1_epi8(int8_t(16 * p))), hi);
    const int piece = 4 * h + p, spiece = k.gw == 8 ? piece : piece / 2;  // sign pieces: 8 inputs
    const __m512i srep = _mm512_permutexvar_epi8(_mm512_add_epi8(rep0, _mm512_set1_epi8(int8_t(16 * spiece))), s64);
    auto operand = [&](__m512i sh, __m512i sbits) {
      const __m512i u = _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(sh, src), utab);
      return _mm512_mask_sub_epi8(u, _mm512_test_epi8_mask(srep, sbits), zero, u);
    };
    if constexpr (k.gw == 8) {
      wv[2 * piece] = operand(sh_a, bits_a);
      wv[2 * piece + 1] = operand(sh_b, bits_b);
    } else {
      wv[piece] = operand(sh_a, piece % 2 ? bits_b : bits_a);
    }
  }
}

// The operands of IQ2_XXS, IQ2_XS (8 values per entry, 4 pieces of 16 rows per group) or IQ3_XXS
// (4 values, 8 pieces) of group g.
template <WeightFormat F>
static HY_ALWAYS_INLINE void z_iq_operands_vbmi(const uint8_t* tile, int g, __m512i* wv) {
  constexpr KQ k = kq_of(F);
  constexpr int pieces = 32 / k.gw;
  const IqCodes& c = k.grid == 512 ? kIq2xsCodes : k.gw == 8 ? kIq2xxsCodes : kIq3xxsCodes;
  const IqVbmiControls& ctl = k.gw == 8 ? kIqVbmi2 : kIqVbmi3;
  const __m512i utab = _mm512_load_si512(c.u);
  if constexpr (k.gsign7) {
    // IQ2_XS: 64 uint16 entries [piece][row] (9-bit index | sign index << 9): their low and high
    // bytes, the 512-entry codes by index bit 8, the sign masks from the 7-bit index (ksigns).
    const uint8_t* at = tile + k.gidx_at + g * 128;
    const __m512i e0 = _mm512_loadu_si512(at), e1 = _mm512_loadu_si512(at + 64);
    const __m512i ev = _mm512_load_si512(ctl.even);
    const __m512i idx = _mm512_permutex2var_epi8(e0, ev, e1);
    const __m512i top = _mm512_permutex2var_epi8(e0, _mm512_add_epi8(ev, _mm512_set1_epi8(1)), e1);
    const __mmask64 upper = _mm512_test_epi8_mask(top, _mm512_set1_epi8(1));
    const __m512i lo = _mm512_mask_blend_epi8(upper, z_lut256(c.lo, idx), z_lut256(c.lo + 256, idx));
    const __m512i hi = _mm512_mask_blend_epi8(upper, z_lut256(c.hi, idx), z_lut256(c.hi + 256, idx));
    const __m512i s7 = _mm512_and_si512(_mm512_srli_epi16(top, 1), _mm512_set1_epi8(0x7F));
    const __m512i s64 = _mm512_permutex2var_epi8(_mm512_loadu_si512(kIqSigns), s7, _mm512_loadu_si512(kIqSigns + 64));
    z_iq_vbmi_pieces<F>(lo, hi, s64, 0, ctl, utab, wv);
  } else {
    const __m512i s64 = _mm512_loadu_si512(tile + k.gsign_at + g * 64);
#pragma GCC unroll 2
    for (int h = 0; h < pieces / 4; ++h) {
      const __m512i idx = _mm512_loadu_si512(tile + k.gidx_at + (g * pieces + 4 * h) * 16);  // [piece][row]
      z_iq_vbmi_pieces<F>(z_lut256(c.lo, idx), z_lut256(c.hi, idx), s64, h, ctl, utab, wv);
    }
  }
}

#endif

template <WeightFormat F>
static HY_ALWAYS_INLINE void z_iq_operands(const uint8_t* tile, int g, __m512i* wv) {
  constexpr KQ k = kq_of(F);
#if defined(__AVX512VBMI__)
  if constexpr (k.grid <= 512) {  // IQ2_XXS, IQ2_XS, IQ3_XXS
    z_iq_operands_vbmi<F>(tile, g, wv);
    return;
  }
#endif
  // The lookups below (every AVX-512 level; with VBMI IQ1_S and IQ1_M, whose 2048 entries are too
  // many for byte permutes): 1 thread, 512 x 7168 in L2, this Zen 4, against the gathers they
  // replace, T = 1 / 16 Gop/s: avx512_vnni IQ2_XXS 33 -> 57 / 226 -> 276, IQ3_XXS 22 -> 31 /
  // 167 -> 232, IQ1_S 32 -> 47 / 208 -> 258; avx512_bf16 IQ1_S 37 -> 50 / 238 -> 257 (its
  // 16-bit level codes by one vpgatherdd and multishift before).
  const __m512i flip = _mm512_set1_epi8(int8_t(0x80));
  const void* grid = iq_grid_words(k);
  if constexpr (k.gw == 4) {  // IQ3_XXS: 16 dword lookups per 4-input operand
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      __m512i v = z_dwords16<1, 255>(static_cast<const int*>(grid), tile + k.gidx_at + (g * 8 + q) * 16);
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
    constexpr int kIdxBytes = k.g12 ? 12 : k.gidx_bytes;
    const uint8_t* at = tile + k.gidx_at + (g * 4 + p) * (k.g12 ? 24 : 16 * k.gidx_bytes);
    const auto* grid64 = static_cast<const long long*>(grid);
    const __m512i lo = z_qwords8<kIdxBytes, k.grid - 1>(grid64, at, 0);  // rows 0-7
    const __m512i hi = z_qwords8<kIdxBytes, k.grid - 1>(grid64, at, 8);  // rows 8-15
    __m512i a = _mm512_permutex2var_epi32(lo, even, hi);  // inputs 0-3 of each row
    __m512i b = _mm512_permutex2var_epi32(lo, odd, hi);   // inputs 4-7
    if constexpr (k.gsign || k.gsign7) {
      const __m512i sgn = k.gsign7 ? z_iq_signs7(_mm512_srli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))), 9))
                                   : _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + k.gsign_at + (g * 4 + p) * 16)));
      a = z_iq_apply_signs(a, sgn, 0x08040201u);
      b = z_iq_apply_signs(b, sgn, 0x80402010u);
    }
    if constexpr (k.gdelta) {  // 8 v +- 1: v in {-1, 0, 1}, a byte-wise << 3 then the delta
      const __m512i m = _mm512_set1_epi8(int8_t(0xF8));
      const __m128i sb = _mm_unpacklo_epi64(iq1_sign_bytes(at), iq1_sign_bytes(at + 12));  // rows 0-7, 8-15
      const __mmask16 neg = _mm_test_epi8_mask(sb, _mm_set1_epi16(int16_t(0x8008)));
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
      const uint8_t* at = tile + k.gidx_at + (g * 8 + q) * 16 + 8 * h;
      __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(iq_dwords4<1, 255>(grid, at, 0)),
                                          iq_dwords4<1, 255>(grid, at, 4), 1);
      v = y_iq_apply_signs(v, sign_bytes(q / 2), (q % 2) ? 0x80402010u : 0x08040201u);
      wv[q] = _mm256_xor_si256(v, flip);
    }
    return;
  }
  const auto* grid64 = reinterpret_cast<const long long*>(grid);
  const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    constexpr int kIdxBytes = k.g12 ? 12 : k.gidx_bytes;
    const uint8_t* at = tile + k.gidx_at + (k.g12 ? (g * 4 + p) * 24 + 12 * h : ((g * 4 + p) * 16 + 8 * h) * k.gidx_bytes);
    const __m256i g0 = _mm256_permutevar8x32_epi32(iq_qwords4<kIdxBytes, k.grid - 1>(grid64, at, 0), split);
    const __m256i g1 = _mm256_permutevar8x32_epi32(iq_qwords4<kIdxBytes, k.grid - 1>(grid64, at, 4), split);
    __m256i a = _mm256_permute2x128_si256(g0, g1, 0x20);  // inputs 0-3 of rows 0-7 of the half
    __m256i b = _mm256_permute2x128_si256(g0, g1, 0x31);  // inputs 4-7
    if constexpr (k.gsign || k.gsign7) {
      const __m256i sgn = k.gsign7 ? y_iq_signs7(_mm256_srli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at))), 9))
                                   : sign_bytes(p);  // IQ2_XS: the entries' sign index
      a = y_iq_apply_signs(a, sgn, 0x08040201u);
      b = y_iq_apply_signs(b, sgn, 0x80402010u);
    }
    if constexpr (k.gdelta) {
      const __m256i m = _mm256_set1_epi8(int8_t(0xF8));
      const __m256i bit = _mm256_set1_epi64x(0x0000008000000008ll);  // lane r's sign bit: 8 even, 0x80 odd
      const __m256i neg = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_cvtepu8_epi32(iq1_sign_bytes(at)), bit), bit);
      const __m256i dv = _mm256_blendv_epi8(_mm256_set1_epi8(1), _mm256_set1_epi8(-1), neg);
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
