// kquant.h: GGUF's super-block ("K") types as the kernels see them (kernels.h: Q4_K, Q5_K, Q6_K,
// Q3_K, Q2_K, IQ4_XS): one table of facts per type (KQ, kq_of) that the packer (pack.cpp), the
// scalar reference (kernels_scalar.cpp) and the SIMD scaffolds (simd_avx512.h, kernels_avx2.cpp)
// all read, and the scalar decoder of a packed tile.
//
// Every K type is the same sum, written for one row, one sub-block j of S inputs (S = 16 or 32):
//   W[k] = D * sc_j * (u_k - off) - Dm * m_j
// u_k: a small unsigned integer (the "operand", built from bit planes, or a 4-bit index into a
// 16-entry table for IQ4_XS), off a type constant, sc_j a signed and m_j an unsigned small integer,
// D and Dm fp16 per 256 inputs (Dm, m only for the types with mins). ggml's dequantisers compute
// the same values (Q3_K's "hmask bit clear: -4" is u = low2 + 4 * hbit, off = 4; Q6_K's -32 is off;
// IQ4_XS's table value t is u = t + 128, off = 128).
//
// Packed layout (kernels.h's block-major rule): a matrix W [N, K] (N % 16 == 0, K % 256 == 0) is
// N/16 x K/256 tiles, tile (b, s) = rows 16b..16b+15 x inputs 256s..256s+255, tiles of a row block
// consecutive, each kq_of(f).tile_bytes long, fields in this order:
//   nib    [8 groups][4 chunks][16 lanes][4 bytes]  (if nib)    the INT4_G32 nibble layout: chunk c
//          of group g, lane r, byte j: low nibble = input 32g + 8c + j, high = input 32g + 8c + 4 + j
//   crumb  [8 groups][2 chunks][16 lanes][4 bytes]  (if crumb)  2-bit values: chunk c, lane r,
//          byte j, bits 2s..2s+1 = input 32g + 4 (4c + s) + j
//   bit    [8 groups][16 lanes][4 bytes]            (if bit)    1-bit values: lane r, byte j,
//          bit s = input 32g + 4s + j
//   D      [16 lanes] fp16;  Dm [16 lanes] fp16 (if min)
//   sc     [NS sub-blocks][16 lanes] int8; with scale_nibbles (Q2_K) a byte is sc | m << 4 and
//          there is no m array;  m [NS][16 lanes] uint8 (if min and not scale_nibbles)
// so the u of input 4i + j of a group (operand i = the [16 lanes x 4 inputs] u8 vector vpdpbusd
// takes) is  nib(i) | crumb(i) << crumb_shift | bit(i) << bit_shift,  each part a shift and a mask
// of one load. Sub-block j of a 16-input type covers operands 4 (j % 2) .. +3 of group j / 2.
// Bytes per weight: Q4_K 4.625 bits (GGUF 4.5), Q5_K 5.625 (5.5), Q6_K 6.5625 (6.5625), Q3_K 3.5625
// (3.4375), Q2_K 2.625 (2.625), IQ4_XS 4.3125 (4.25): GGUF packs some 6-bit scales tighter.
//
// The lattice ("IQ") types IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ1_M are K types of the same sum
// whose u is not bit planes but a codebook entry (iq_grids.h: 4 or 8 signed values per entry, one
// entry per 4 or 8 inputs): u = gmul * v + delta + 128 (off = 128, the signed-table convention of
// IQ4_XS: table = true), v the entry's value times its sign (IQ2/IQ3: a per-8-input sign mask;
// IQ1: none, but a per-row delta of +-1 per 32 (IQ1_S) or 8 (IQ1_M) inputs, gmul = 8), sc_j = 2 s_j
// + 1 and D scaled by 2^-dshift (ggml's d (0.5 + s) / 4 is D (2s + 1) 2^-3, exact). Their tiles
// hold the grid indices as the file has them, not the values, so the packed bytes stay near the
// file's size; the kernels expand entries in registers (gathers from the codebook):
//   gidx   [8 groups][32 / gw pieces][16 lanes] gidx_bytes each: piece p covers inputs 32g + gw p
//          .. + gw - 1. IQ2_XXS, IQ3_XXS: the 8-bit index; IQ2_XS: index | sign index << 9 (the
//          file's uint16); IQ1_S, IQ1_M (g12): per piece 24 bytes, the 16 lanes' 12-bit entries
//          11-bit index | (delta < 0) << 11, lane r's at bits 12 r .. 12 r + 11 (little-endian),
//          so lane r's is the uint16 at byte 3r/2 shifted right by 4 (r % 2)
//   gsign  [8 groups][4 pieces of 8 inputs][16 lanes] the sign mask (bit j: input 8p + j negative;
//          ksigns already applied) (if gsign: IQ2_XXS, IQ3_XXS)
//   D, sc  as above (sc = 2 s + 1, int8)
// Bits per weight (file): IQ2_XXS 2.3125 (2.0625), IQ2_XS 2.5625 (2.3125), IQ3_XXS 3.3125
// (3.0625), IQ1_S 1.8125 (1.5625), IQ1_M 2.0625 (1.75); IQ1 held its index entries in 16 bits
// before (2.3125, 2.5625: 1.48x and 1.46x the file, too much for the files people pick to fit RAM).
//
// Everything here is static / constexpr (kernels.h: no COMDAT code shared across ISA units).
#pragma once
#include <cstdint>
#include <cstring>

#include "core/iq_grids.h"
#include "core/kernels.h"

namespace hybrid {

constexpr int kSuper = 256;  // inputs per super-block (ggml's QK_K)

// IQ4_NL / IQ4_XS's 16 values (ggml's kvalues_iq4nl).
constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

struct KQ {
  bool valid = false;
  int sub = 32;             // S: inputs per sub-block (16 or 32)
  bool nib = false, crumb = false, bit = false;
  int crumb_shift = 0, bit_shift = 0;
  bool table = false;       // u = kIq4Values[nib] + 128 (the nibble is an index)
  int off = 0;              // W = D sc (u - off) - Dm m
  bool min = false;         // Dm and m present
  bool scale_nibbles = false;
  // Lattice types (grid > 0): codebook entries, values per entry, index bytes, separate sign
  // masks, a 7-bit sign index in the index's top bits, IQ1's delta bit, value multiplier, D shift.
  int grid = 0, gw = 8, gidx_bytes = 1;
  bool gsign = false, gsign7 = false, gdelta = false;
  bool g12 = false;         // IQ1: 12-bit index entries, 16 lanes in 24 bytes a piece
  int gmul = 1, dshift = 0;
  // Derived: byte offsets of the fields inside a tile and the tile size.
  int nsub = 0, nib_at = 0, crumb_at = 0, bit_at = 0, gidx_at = 0, gsign_at = 0, d_at = 0, dm_at = 0, sc_at = 0, m_at = 0,
      tile_bytes = 0;
};

static constexpr KQ kq_layout(KQ k) {
  k.valid = true;
  k.nsub = kSuper / k.sub;
  int at = 0;
  k.nib_at = at;
  at += k.nib ? 8 * 256 : 0;
  k.crumb_at = at;
  at += k.crumb ? 8 * 128 : 0;
  k.bit_at = at;
  at += k.bit ? 8 * 64 : 0;
  k.gidx_at = at;
  at += !k.grid ? 0 : k.g12 ? 8 * 4 * 24 : 8 * (32 / k.gw) * 16 * k.gidx_bytes;
  k.gsign_at = at;
  at += k.gsign ? 8 * 64 : 0;
  k.d_at = at;
  at += 32;
  k.dm_at = at;
  at += k.min ? 32 : 0;
  k.sc_at = at;
  at += k.nsub * 16;
  k.m_at = at;
  at += (k.min && !k.scale_nibbles) ? k.nsub * 16 : 0;
  k.tile_bytes = at;
  return k;
}

// The facts of each K type; valid = false for the other formats.
// A lattice type's common facts (see the header comment).
static constexpr KQ kq_lattice(int grid, int gw, int gidx_bytes, int sub, int dshift) {
  KQ k;
  k.table = true;
  k.off = 128;
  k.grid = grid;
  k.gw = gw;
  k.gidx_bytes = gidx_bytes;
  k.sub = sub;
  k.dshift = dshift;
  return k;
}

static constexpr KQ kq_of(WeightFormat f) {
  KQ k;
  switch (f) {
    case WeightFormat::Q4_K: k.nib = true; k.min = true; return kq_layout(k);
    case WeightFormat::Q5_K: k.nib = k.bit = true; k.bit_shift = 4; k.min = true; return kq_layout(k);
    case WeightFormat::Q6_K: k.sub = 16; k.nib = k.crumb = true; k.crumb_shift = 4; k.off = 32; return kq_layout(k);
    case WeightFormat::Q3_K: k.sub = 16; k.crumb = k.bit = true; k.bit_shift = 2; k.off = 4; return kq_layout(k);
    case WeightFormat::Q2_K:
      k.sub = 16; k.crumb = true; k.min = true; k.scale_nibbles = true; return kq_layout(k);
    case WeightFormat::IQ4_XS: k.nib = k.table = true; k.off = 128; return kq_layout(k);
    case WeightFormat::IQ2_XXS: k = kq_lattice(256, 8, 1, 32, 3); k.gsign = true; return kq_layout(k);
    case WeightFormat::IQ2_XS: k = kq_lattice(512, 8, 2, 16, 3); k.gsign7 = true; return kq_layout(k);
    case WeightFormat::IQ3_XXS: k = kq_lattice(256, 4, 1, 32, 2); k.gsign = true; return kq_layout(k);
    case WeightFormat::IQ1_S: k = kq_lattice(2048, 8, 1, 32, 3); k.gdelta = k.g12 = true; k.gmul = 8; return kq_layout(k);
    case WeightFormat::IQ1_M: k = kq_lattice(2048, 8, 1, 16, 3); k.gdelta = k.g12 = true; k.gmul = 8; return kq_layout(k);
    default: return k;
  }
}

static inline bool is_kquant(WeightFormat f) { return kq_of(f).valid; }

static_assert(kq_of(WeightFormat::Q4_K).tile_bytes == ktile_bytes(WeightFormat::Q4_K), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::Q5_K).tile_bytes == ktile_bytes(WeightFormat::Q5_K), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::Q6_K).tile_bytes == ktile_bytes(WeightFormat::Q6_K), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::Q3_K).tile_bytes == ktile_bytes(WeightFormat::Q3_K), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::Q2_K).tile_bytes == ktile_bytes(WeightFormat::Q2_K), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::IQ4_XS).tile_bytes == ktile_bytes(WeightFormat::IQ4_XS), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::IQ2_XXS).tile_bytes == ktile_bytes(WeightFormat::IQ2_XXS), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::IQ2_XS).tile_bytes == ktile_bytes(WeightFormat::IQ2_XS), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::IQ3_XXS).tile_bytes == ktile_bytes(WeightFormat::IQ3_XXS), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::IQ1_S).tile_bytes == ktile_bytes(WeightFormat::IQ1_S), "kernels.h ktile_bytes");
static_assert(kq_of(WeightFormat::IQ1_M).tile_bytes == ktile_bytes(WeightFormat::IQ1_M), "kernels.h ktile_bytes");

// D's factor 2^-dshift (exact in fp32 for every fp16 D).
static constexpr float kq_dscale(const KQ& k) { return 1.0f / float(1 << k.dshift); }

// A lattice type's codebook words (iq_grids.h: uint32 for gw = 4, else uint64), for gathers.
// Operands (4 inputs x 16 rows each) of a bit-plane type whose vpmaddubsw pair sums one int16
// lane can add before a vpmaddwd (the AVX2 and AVX-512 BW dots): a pair is at most 2 u_max 128
// (u_max: 15 for Q4_K, 31 Q5_K, 63 Q6_K, 7 Q3_K, 3 Q2_K) and the sum must stay below 32768; at
// most the 8 operands of a group. 1 for the table types.
static constexpr int kq_s16_depth(const KQ& k) {
  const int umax = k.table ? 0 : (k.nib ? 15 : 0) | (k.crumb ? 3 << k.crumb_shift : 0) | (k.bit ? 1 << k.bit_shift : 0);
  const int d = umax == 0 ? 1 : 32767 / (2 * umax * 128);
  return d >= 8 ? 8 : d >= 4 ? 4 : d >= 2 ? 2 : 1;
}

static inline const void* iq_grid_words(const KQ& k) {
  return k.grid == 512 ? static_cast<const void*>(kIq2xsGrid)
         : k.grid == 2048 ? static_cast<const void*>(kIq1sGrid)
         : k.gw == 4 ? static_cast<const void*>(kIq3xxsGrid)
                     : static_cast<const void*>(kIq2xxsGrid);
}

// Entry `idx` of a lattice type's codebook, value j (j < gw) as an int.
static inline int iq_grid_value(const KQ& k, int idx, int j) {
  const uint8_t* e = static_cast<const uint8_t*>(iq_grid_words(k)) + idx * k.gw;  // little-endian words
  return int(int8_t(e[j]));
}

// u of input i (0..255) of row r of a lattice tile t (header comment).
static inline int iq_decode_u(const KQ& k, const uint8_t* t, int r, int i) {
  const int g = i / 32, p = (i % 32) / k.gw, j = i % k.gw;
  const int at = k.g12 ? k.gidx_at + (g * 4 + p) * 24 + 3 * r / 2 : k.gidx_at + ((g * (32 / k.gw) + p) * 16 + r) * k.gidx_bytes;
  const int e = k.g12 ? (int(t[at] | (t[at + 1] << 8)) >> (4 * (r % 2))) & 0xFFF
                : k.gidx_bytes == 2 ? int(t[at] | (t[at + 1] << 8)) : int(t[at]);
  const int bit = i % 8;  // position inside the 8-input sign piece
  int sign = 0, delta = 0, idx = e;
  if (k.gsign) sign = (t[k.gsign_at + (g * 4 + (i % 32) / 8) * 16 + r] >> bit) & 1;
  if (k.gsign7) {
    idx = e & 511;
    sign = (kIqSigns[e >> 9] >> bit) & 1;
  }
  if (k.gdelta) {
    idx = e & 0x7FF;
    delta = (e >> 11) ? -1 : 1;
  }
  const int v = iq_grid_value(k, idx, j) * k.gmul;
  return (sign ? -v : v) + delta + 128;
}

// One packed tile in plain integers: u[r][i] (the table already applied: u is the value the
// operand holds), sc[r][j], m[r][j], and the fp16 bits of D, Dm per row.
struct KTile {
  uint8_t u[kRowBlock][kSuper];
  int8_t sc[kRowBlock][16];
  uint8_t m[kRowBlock][16];
  uint16_t d[kRowBlock], dm[kRowBlock];
};

static inline void kq_decode_tile(WeightFormat f, const uint8_t* t, KTile& o) {
  const KQ k = kq_of(f);
  for (int r = 0; r < kRowBlock; ++r) {
    if (k.grid)
      for (int i = 0; i < kSuper; ++i) o.u[r][i] = uint8_t(iq_decode_u(k, t, r, i));
    for (int g = 0; g < (k.grid ? 0 : 8); ++g)
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) {
          const int lane = r * 4 + j;
          int u = 0;
          if (k.nib) {
            const uint8_t byte = t[k.nib_at + g * 256 + (i / 2) * 64 + lane];
            u = (i % 2) ? byte >> 4 : byte & 0x0F;
          }
          if (k.crumb) u |= ((t[k.crumb_at + g * 128 + (i / 4) * 64 + lane] >> (2 * (i % 4))) & 3) << k.crumb_shift;
          if (k.bit) u |= ((t[k.bit_at + g * 64 + lane] >> i) & 1) << k.bit_shift;
          if (k.table) u = kIq4Values[u] + 128;
          o.u[r][32 * g + 4 * i + j] = uint8_t(u);
        }
    std::memcpy(&o.d[r], t + k.d_at + 2 * r, 2);
    if (k.min) std::memcpy(&o.dm[r], t + k.dm_at + 2 * r, 2);
    else o.dm[r] = 0;
    for (int j = 0; j < k.nsub; ++j) {
      const uint8_t s = t[k.sc_at + j * 16 + r];
      o.sc[r][j] = k.scale_nibbles ? int8_t(s & 0x0F) : int8_t(s);
      o.m[r][j] = !k.min ? 0 : k.scale_nibbles ? uint8_t(s >> 4) : t[k.m_at + j * 16 + r];
    }
  }
}

// W of row r, input i of a decoded tile, as ggml computes it: D sc (u - off) exact, minus Dm m
// exact, one rounding (fp32).
static inline float kq_weight(const KQ& k, const KTile& o, int r, int i) {
  const int j = i / k.sub;
  const float dsc = f16_to_f32(o.d[r]) * float(o.sc[r][j]) * kq_dscale(k);  // 2^-dshift: exact
  const float dmm = f16_to_f32(o.dm[r]) * float(o.m[r][j]);
  return dsc * float(int(o.u[r][i]) - k.off) - dmm;
}

}  // namespace hybrid
