// pack_iq.cpp: see pack_iq.h. One block at a time, plain loops (load time only).
#include "core/pack_iq.h"

#include <cstring>
#include <stdexcept>

#include "core/kquant.h"

namespace hybrid {
namespace {

uint16_t le16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
uint32_t le32(const uint8_t* p) { return uint32_t(le16(p)) | uint32_t(le16(p + 2)) << 16; }

// The tile fields of row r (kquant.h): index entry of piece p of group g, sign mask of 8-input
// piece q of group g, D, sc of sub-block j.
struct RowOut {
  const KQ& k;
  uint8_t* t;
  int r;
  void idx(int g, int p, int e) const {
    uint8_t* at = t + k.gidx_at + ((g * (32 / k.gw) + p) * 16 + r) * k.gidx_bytes;
    at[0] = uint8_t(e);
    if (k.gidx_bytes == 2) at[1] = uint8_t(e >> 8);
  }
  void idx12(int g, int p, int index, bool negative) const {  // IQ1's 12-bit entry (kquant.h g12)
    const int f = (index & 0x7FF) | (negative ? 0x800 : 0);
    uint8_t* at = t + k.gidx_at + (g * 4 + p) * 24 + 3 * r / 2;
    if (r % 2 == 0) {
      at[0] = uint8_t(f);
      at[1] = uint8_t((at[1] & 0xF0) | (f >> 8));
    } else {
      at[0] = uint8_t((at[0] & 0x0F) | ((f & 0x0F) << 4));
      at[1] = uint8_t(f >> 4);
    }
  }
  void sign(int g, int q, int s7) const { t[k.gsign_at + (g * 4 + q) * 16 + r] = kIqSigns[s7 & 0x7F]; }
  void d(uint16_t bits) const { std::memcpy(t + k.d_at + 2 * r, &bits, 2); }
  void sc(int j, int s) const { t[k.sc_at + j * 16 + r] = uint8_t(2 * s + 1); }
};

}  // namespace

size_t iq_block_bytes(WeightFormat f) {
  switch (f) {
    case WeightFormat::IQ2_XXS: return 66;
    case WeightFormat::IQ2_XS: return 74;
    case WeightFormat::IQ3_XXS: return 98;
    case WeightFormat::IQ1_S: return 50;
    case WeightFormat::IQ1_M: return 56;
    default: return 0;
  }
}

void iq_pack_super(WeightFormat f, const uint8_t* b, int r, uint8_t* t) {
  const KQ k = kq_of(f);
  const RowOut o{k, t, r};
  switch (f) {
    case WeightFormat::IQ2_XXS:  // d [0,2); per 32 inputs ib, 8 bytes at 2 + 8 ib: 4 grid indices,
      o.d(le16(b));              // then u32: 4 x 7-bit sign indices, scale in bits 28..31
      for (int ib = 0; ib < 8; ++ib) {
        const uint8_t* q = b + 2 + 8 * ib;
        const uint32_t aux = le32(q + 4);
        for (int l = 0; l < 4; ++l) {
          o.idx(ib, l, q[l]);
          o.sign(ib, l, int(aux >> (7 * l)));
        }
        o.sc(ib, int(aux >> 28));
      }
      return;
    case WeightFormat::IQ2_XS:  // d [0,2); qs u16 [2,66): 9-bit index | sign index << 9, per 8
      o.d(le16(b));             // inputs; scales [66,74): byte ib: nibble h = s of inputs 16h..
      for (int ib = 0; ib < 8; ++ib) {
        for (int l = 0; l < 4; ++l) o.idx(ib, l, le16(b + 2 + 8 * ib + 2 * l));
        o.sc(2 * ib, b[66 + ib] & 0x0F);
        o.sc(2 * ib + 1, b[66 + ib] >> 4);
      }
      return;
    case WeightFormat::IQ3_XXS:  // d [0,2); qs [2,66): one grid index per 4 inputs; [66,98): u32
      o.d(le16(b));              // per 32 inputs: 4 x 7-bit sign indices (per 8), scale bits 28..31
      for (int ib = 0; ib < 8; ++ib) {
        for (int l = 0; l < 8; ++l) o.idx(ib, l, b[2 + 8 * ib + l]);
        const uint32_t aux = le32(b + 66 + 4 * ib);
        for (int l = 0; l < 4; ++l) o.sign(ib, l, int(aux >> (7 * l)));
        o.sc(ib, int(aux >> 28));
      }
      return;
    case WeightFormat::IQ1_S:  // d [0,2); qs [2,34): low 8 index bits per 8 inputs; qh u16 [34,50)
      o.d(le16(b));            // per 32: 4 x 3 high index bits, scale bits 12..14, delta sign bit 15
      for (int ib = 0; ib < 8; ++ib) {
        const int qh = le16(b + 34 + 2 * ib);
        for (int l = 0; l < 4; ++l) o.idx12(ib, l, b[2 + 4 * ib + l] | (((qh >> (3 * l)) & 7) << 8), qh >> 15);
        o.sc(ib, (qh >> 12) & 7);
      }
      return;
    case WeightFormat::IQ1_M: {  // qs [0,32): low index bits per 8 inputs; qh [32,48): a nibble per
      // 8 inputs (3 high index bits, bit 3 the delta sign); scales u16 [48,56): 4 x 3-bit scales
      // per u16 (one per 16 inputs), d's fp16 bits in the 4 top nibbles
      const uint8_t* sb = b + 48;
      const uint16_t d = uint16_t((le16(sb) >> 12) | ((le16(sb + 2) >> 8) & 0x00F0) |
                                  ((le16(sb + 4) >> 4) & 0x0F00) | (le16(sb + 6) & 0xF000));
      o.d(d);
      for (int q = 0; q < 32; ++q) {
        const int nib = (b[32 + q / 2] >> (4 * (q % 2))) & 0x0F;
        o.idx12(q / 4, q % 4, b[q] | ((nib & 7) << 8), nib >> 3);
      }
      for (int j = 0; j < 16; ++j) o.sc(j, (le16(sb + 2 * (j / 4)) >> (3 * (j % 4))) & 7);
      return;
    }
    default: throw std::logic_error("iq_pack_super: not a lattice type");
  }
}

}  // namespace hybrid
