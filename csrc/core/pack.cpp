// pack.cpp: see pack.h. Plain loops over one row block at a time; the inner loops run over
// contiguous inputs so the compiler vectorises them.
#include "core/pack.h"

#include "core/kquant.h"
#include "core/pack_iq.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace hybrid {
namespace {

inline float load_src(const void* w, SrcDtype dt, int64_t i) {
  return dt == SrcDtype::F32 ? static_cast<const float*>(w)[i]
                             : bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
}
// Round to bf16 (nearest even) keeping fp32 storage; finite inputs (branch-free, vectorises).
inline float round_to_bf16(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  __builtin_memcpy(&x, &u, 4);
  return x;
}
// Rounding half to even without a libm call (baseline x86-64 has no roundps): for |v| < 2^22,
// (v + 1.5 * 2^23) - 1.5 * 2^23 is the nearest even integer in the default rounding mode.
inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

uint8_t* dest_q(const PackDest& d, WeightFormat f, int64_t k, int64_t b) {
  return d.qweight + size_t(b * d.block_mult + d.block_off) * block_qweight_bytes(f, k);
}
uint16_t* dest_s(const PackDest& d, WeightFormat f, int64_t k, int64_t b) {
  return d.scales + size_t(b * d.block_mult + d.block_off) * block_scale_count(f, k);
}

}  // namespace

size_t block_qweight_bytes(WeightFormat f, int64_t k) {
  return packed_qweight_bytes(f, kRowBlock, k);
}
size_t block_scale_count(WeightFormat f, int64_t k) {
  return packed_scale_bytes(f, kRowBlock, k) / 2;
}

void pack_int4_from_ct(const int32_t* packed, const void* scale, SrcDtype scale_dtype, int64_t n,
                       int64_t k, int64_t b0, int64_t b1, const PackDest& dst) {
  const int64_t groups = k / kGroup, words = k / 8;
  for (int64_t b = b0; b < b1; ++b) {
    uint8_t* q = dest_q(dst, WeightFormat::INT4_G32, k, b);
    uint16_t* s = dest_s(dst, WeightFormat::INT4_G32, k, b);
    for (int r = 0; r < kRowBlock; ++r) {
      const int64_t row = b * kRowBlock + r;
      const uint32_t* src = reinterpret_cast<const uint32_t*>(packed) + row * words;
      for (int64_t g = 0; g < groups; ++g) {
        for (int c = 0; c < 4; ++c) {
          uint32_t wd = src[4 * g + c];  // nibble j = input 32g + 8c + j
          uint8_t* out = q + g * 256 + c * 64 + r * 4;
          for (int j = 0; j < 4; ++j)
            out[j] = uint8_t(((wd >> (4 * j)) & 0xF) | (((wd >> (16 + 4 * j)) & 0xF) << 4));
        }
        uint16_t sb;
        if (scale_dtype == SrcDtype::BF16) {
          sb = static_cast<const uint16_t*>(scale)[row * groups + g];
        } else {
          float sf = static_cast<const float*>(scale)[row * groups + g];
          sb = f32_to_bf16(sf);
          if (bf16_to_f32(sb) != sf && !(std::isnan(sf)))
            throw std::invalid_argument(
                "weight_scale[" + std::to_string(row) + ", " + std::to_string(g) + "] = " +
                std::to_string(sf) + " is not exactly representable in bf16 (INT4_G32 stores "
                "bf16 scales; pass the checkpoint's bf16 scales)");
        }
        s[g * kRowBlock + r] = sb;
      }
    }
  }
}

void quantize_pack(WeightFormat format, const void* w, SrcDtype dt, int64_t n, int64_t k,
                   int64_t b0, int64_t b1, const PackDest& dst) {
  if (gguf_block_bytes(format) != 0)
    throw std::invalid_argument("GGUF block formats are packed from their blocks (pack_gguf), not quantised "
                                "from floats here");
  const int64_t groups = k / kGroup;
  volatile float magic_v = 12582912.f;  // 1.5 * 2^23 (see above); volatile: never folded
  const float magic_ = magic_v;
  float x[kGroup];
  for (int64_t b = b0; b < b1; ++b) {
    uint8_t* q = dest_q(dst, format, k, b);
    if (format == WeightFormat::BF16) {
      uint16_t* out = reinterpret_cast<uint16_t*>(q);
      for (int r = 0; r < kRowBlock; ++r) {
        const int64_t row = b * kRowBlock + r;
        for (int64_t kk = 0; kk < k; ++kk) {
          uint16_t v = dt == SrcDtype::BF16 ? static_cast<const uint16_t*>(w)[row * k + kk]
                                            : f32_to_bf16(static_cast<const float*>(w)[row * k + kk]);
          out[((kk / 2) * kRowBlock + r) * 2 + (kk & 1)] = v;
        }
      }
      continue;
    }
    uint16_t* s = dest_s(dst, format, k, b);
    for (int r = 0; r < kRowBlock; ++r) {
      const int64_t row = b * kRowBlock + r;
      for (int64_t g = 0; g < groups; ++g) {
        float amax = 0.f;
        for (int i = 0; i < kGroup; ++i) x[i] = load_src(w, dt, row * k + g * kGroup + i);
        bool finite = true;
        for (int i = 0; i < kGroup; ++i) {
          const float a = std::fabs(x[i]);
          finite &= a <= std::numeric_limits<float>::max();  // false for NaN and Inf
          amax = a > amax ? a : amax;
        }
        if (!finite)
          throw std::invalid_argument("row " + std::to_string(row) + ", inputs " + std::to_string(g * kGroup) +
                                      ".." + std::to_string(g * kGroup + kGroup - 1) +
                                      " contain NaN or Inf (cannot be quantised)");
        if (format == WeightFormat::INT4_G32) {
          // compressed-tensors: scale = amax / ((qmax - qmin) / 2) in the weight dtype, zero
          // scales replaced by the dtype's eps, then q = round(clamp(x / scale, qmin, qmax)),
          // each division rounded to the weight dtype.
          float scale = amax / 7.5f;
          if (dt == SrcDtype::BF16) scale = round_to_bf16(scale);
          if (scale == 0.f)
            scale = dt == SrcDtype::BF16 ? 0.0078125f : std::numeric_limits<float>::epsilon();
          float v[kGroup];
          for (int i = 0; i < kGroup; ++i) v[i] = x[i] / scale;
          if (dt == SrcDtype::BF16)
            for (int i = 0; i < kGroup; ++i) v[i] = round_to_bf16(v[i]);
          const float m = magic_;
          int nib[kGroup];
          for (int i = 0; i < kGroup; ++i) nib[i] = int((clampf(v[i], -8.f, 7.f) + m) - m) + 8;
          uint8_t* out = q + g * 256 + r * 4;
          for (int c = 0; c < 4; ++c)
            for (int j = 0; j < 4; ++j)
              out[c * 64 + j] = uint8_t(nib[8 * c + j] | (nib[8 * c + 4 + j] << 4));
          s[g * kRowBlock + r] = f32_to_bf16(scale);
        } else {  // INT8_G32
          uint16_t sb = f32_to_bf16(amax / 127.f);
          float scale = bf16_to_f32(sb);
          const float inv_ok = scale > 0.f ? 1.f : 0.f;  // zero group: q = 0
          const float div = scale > 0.f ? scale : 1.f;
          const float m = magic_;
          int qi[kGroup];
          for (int i = 0; i < kGroup; ++i)
            qi[i] = int((clampf(x[i] / div, -127.f, 127.f) * inv_ok + m) - m) + 128;
          uint8_t* out = q + g * 512 + r * 4;
          for (int c = 0; c < 8; ++c)
            for (int j = 0; j < 4; ++j) out[c * 64 + j] = uint8_t(qi[4 * c + j]);
          s[g * kRowBlock + r] = sb;
        }
      }
    }
  }
}

size_t gguf_block_bytes(WeightFormat f) {
  switch (f) {
    case WeightFormat::Q4_0: return 2 + kGroup / 2;
    case WeightFormat::Q8_0: return 2 + kGroup;
    case WeightFormat::Q4_K: return 144;
    case WeightFormat::Q5_K: return 176;
    case WeightFormat::Q6_K: return 210;
    case WeightFormat::Q3_K: return 110;
    case WeightFormat::Q2_K: return 84;
    case WeightFormat::IQ4_XS: return 136;
    default: return iq_block_bytes(f);  // the lattice types, else 0
  }
}

int64_t gguf_block_inputs(WeightFormat f) { return is_kquant(f) ? kSuper : kGroup; }

size_t gguf_row_bytes(WeightFormat f, int64_t k) { return size_t(k / gguf_block_inputs(f)) * gguf_block_bytes(f); }

namespace {

// One GGUF super-block in plain integers (kquant.h's terms): u (IQ4_XS: the table index, the
// stored nibble), sc, m per sub-block, the fp16 bits of d and dmin. The block layouts are ggml's
// (block_q4_K, ...); the comments give each field's byte range.
struct KBlock {
  uint8_t u[kSuper];
  int8_t sc[16];
  uint8_t m[16];
  uint16_t d, dmin;
};

uint16_t le16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }

// Q4_K / Q5_K's 12 bytes of 6-bit scales and mins for 8 sub-blocks (ggml's get_scale_min_k4).
void scale_min_k4(const uint8_t* q, KBlock& o) {
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      o.sc[j] = int8_t(q[j] & 63);
      o.m[j] = uint8_t(q[j + 4] & 63);
    } else {
      o.sc[j] = int8_t((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
      o.m[j] = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
  }
}

void decode_gguf_super(WeightFormat f, const uint8_t* b, KBlock& o) {
  std::memset(&o, 0, sizeof(o));
  switch (f) {
    case WeightFormat::Q4_K:  // d [0,2) dmin [2,4) scales [4,16) qs [16,144)
    case WeightFormat::Q5_K: {  // d, dmin, scales as Q4_K, qh [16,48) qs [48,176)
      const bool five = f == WeightFormat::Q5_K;
      o.d = le16(b);
      o.dmin = le16(b + 2);
      scale_min_k4(b + 4, o);
      const uint8_t* qs = b + (five ? 48 : 16);
      const uint8_t* qh = b + 16;
      for (int i = 0; i < 4; ++i)  // sub-blocks 2i (low nibbles), 2i + 1 (high nibbles)
        for (int l = 0; l < 32; ++l) {
          const uint8_t q = qs[32 * i + l];
          o.u[64 * i + l] = uint8_t((q & 0x0F) | (five ? ((qh[l] >> (2 * i)) & 1) << 4 : 0));
          o.u[64 * i + 32 + l] = uint8_t((q >> 4) | (five ? ((qh[l] >> (2 * i + 1)) & 1) << 4 : 0));
        }
      return;
    }
    case WeightFormat::Q6_K: {  // ql [0,128) qh [128,192) scales int8 [192,208) d [208,210)
      const uint8_t *ql = b, *qh = b + 128;
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
          const uint8_t lo = ql[64 * h + l], hi = ql[64 * h + 32 + l], hb = qh[32 * h + l];
          o.u[128 * h + l] = uint8_t((lo & 0x0F) | ((hb & 3) << 4));
          o.u[128 * h + 32 + l] = uint8_t((hi & 0x0F) | (((hb >> 2) & 3) << 4));
          o.u[128 * h + 64 + l] = uint8_t((lo >> 4) | (((hb >> 4) & 3) << 4));
          o.u[128 * h + 96 + l] = uint8_t((hi >> 4) | (((hb >> 6) & 3) << 4));
        }
      for (int j = 0; j < 16; ++j) o.sc[j] = int8_t(b[192 + j]);
      o.d = le16(b + 208);
      return;
    }
    case WeightFormat::Q3_K: {  // hmask [0,32) qs [32,96) scales [96,108) d [108,110)
      const uint8_t *hm = b, *qs = b + 32, *sb = b + 96;
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 32; ++l)
            o.u[128 * h + 32 * j + l] =
                uint8_t(((qs[32 * h + l] >> (2 * j)) & 3) | (((hm[l] >> (4 * h + j)) & 1) << 2));
      for (int j = 0; j < 16; ++j) {
        const int lo = j < 8 ? sb[j] & 0x0F : sb[j - 8] >> 4;
        const int hi = (sb[8 + j % 4] >> (2 * (j / 4))) & 3;
        o.sc[j] = int8_t((lo | (hi << 4)) - 32);
      }
      o.d = le16(b + 108);
      return;
    }
    case WeightFormat::Q2_K: {  // scales [0,16) qs [16,80) d [80,82) dmin [82,84)
      const uint8_t* qs = b + 16;
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 32; ++l) o.u[128 * h + 32 * j + l] = uint8_t((qs[32 * h + l] >> (2 * j)) & 3);
      for (int j = 0; j < 16; ++j) {
        o.sc[j] = int8_t(b[j] & 0x0F);
        o.m[j] = uint8_t(b[j] >> 4);
      }
      o.d = le16(b + 80);
      o.dmin = le16(b + 82);
      return;
    }
    case WeightFormat::IQ4_XS: {  // d [0,2) scales_h u16 [2,4) scales_l [4,8) qs [8,136)
      o.d = le16(b);
      const uint16_t sh = le16(b + 2);
      for (int ib = 0; ib < 8; ++ib) {
        const int ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0F) | (((sh >> (2 * ib)) & 3) << 4);
        o.sc[ib] = int8_t(ls - 32);
        for (int j = 0; j < 16; ++j) {
          o.u[32 * ib + j] = b[8 + 16 * ib + j] & 0x0F;
          o.u[32 * ib + 16 + j] = b[8 + 16 * ib + j] >> 4;
        }
      }
      return;
    }
    default: throw std::logic_error("decode_gguf_super: not a K type");
  }
}

// Row r of tile t (kquant.h layout) from one decoded super-block. Each tile byte of the row is
// composed whole from its values (no read-modify-write), with the type's layout facts as
// constants (a template per type): the loader packs a K2.5 GGUF's hundreds of GB through here.
template <WeightFormat F>
void write_tile_row_t(const KBlock& o, int r, uint8_t* t) {
  constexpr KQ k = kq_of(F);
  for (int g = 0; g < 8; ++g) {
    const uint8_t* u = o.u + 32 * g;  // input 4i + j of the group: u[4 i + j]
    for (int j = 0; j < 4; ++j) {
      const int lane = r * 4 + j;
      if constexpr (k.nib)
        for (int c = 0; c < 4; ++c)
          t[k.nib_at + g * 256 + c * 64 + lane] = uint8_t((u[8 * c + j] & 0x0F) | ((u[8 * c + 4 + j] & 0x0F) << 4));
      if constexpr (k.crumb)
        for (int c = 0; c < 2; ++c) {
          int byte = 0;
          for (int s = 0; s < 4; ++s) byte |= ((u[4 * (4 * c + s) + j] >> k.crumb_shift) & 3) << (2 * s);
          t[k.crumb_at + g * 128 + c * 64 + lane] = uint8_t(byte);
        }
      if constexpr (k.bit) {
        int byte = 0;
        for (int i = 0; i < 8; ++i) byte |= ((u[4 * i + j] >> k.bit_shift) & 1) << i;
        t[k.bit_at + g * 64 + lane] = uint8_t(byte);
      }
    }
  }
  std::memcpy(t + k.d_at + 2 * r, &o.d, 2);
  if constexpr (k.min) std::memcpy(t + k.dm_at + 2 * r, &o.dmin, 2);
  for (int j = 0; j < k.nsub; ++j) {
    t[k.sc_at + j * 16 + r] = k.scale_nibbles ? uint8_t((o.sc[j] & 0x0F) | (o.m[j] << 4)) : uint8_t(o.sc[j]);
    if constexpr (k.min && !k.scale_nibbles) t[k.m_at + j * 16 + r] = o.m[j];
  }
}

void write_tile_row(WeightFormat f, const KBlock& o, int r, uint8_t* t) {
  switch (f) {
    case WeightFormat::Q4_K: return write_tile_row_t<WeightFormat::Q4_K>(o, r, t);
    case WeightFormat::Q5_K: return write_tile_row_t<WeightFormat::Q5_K>(o, r, t);
    case WeightFormat::Q6_K: return write_tile_row_t<WeightFormat::Q6_K>(o, r, t);
    case WeightFormat::Q3_K: return write_tile_row_t<WeightFormat::Q3_K>(o, r, t);
    case WeightFormat::Q2_K: return write_tile_row_t<WeightFormat::Q2_K>(o, r, t);
    case WeightFormat::IQ4_XS: return write_tile_row_t<WeightFormat::IQ4_XS>(o, r, t);
    default: throw std::logic_error("write_tile_row: not a bit-plane K type");
  }
}

}  // namespace

void pack_gguf(WeightFormat f, const uint8_t* src, int64_t n, int64_t k, int64_t b0, int64_t b1,
               const PackDest& dst) {
  const size_t bb = gguf_block_bytes(f), rb = gguf_row_bytes(f, k);
  if (bb == 0) throw std::invalid_argument("pack_gguf: format " + std::to_string(int(f)) + " is not a GGUF type");
  if (is_kquant(f)) {
    const KQ kq = kq_of(f);
    const int64_t supers = k / kSuper;
    KBlock o;
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* q = dest_q(dst, f, k, b);
      std::memset(q, 0, block_qweight_bytes(f, k));
      for (int r = 0; r < kRowBlock; ++r) {
        const uint8_t* row = src + size_t(b * kRowBlock + r) * rb;
        for (int64_t sb = 0; sb < supers; ++sb) {
          uint8_t* tile = q + size_t(sb) * size_t(kq.tile_bytes);
          if (kq.grid) {
            iq_pack_super(f, row + size_t(sb) * bb, r, tile);
            continue;
          }
          decode_gguf_super(f, row + size_t(sb) * bb, o);
          write_tile_row(f, o, r, tile);
        }
      }
    }
    return;
  }
  const int64_t groups = k / kGroup;
  for (int64_t b = b0; b < b1; ++b) {
    uint8_t* q = dest_q(dst, f, k, b);
    uint16_t* s = dest_s(dst, f, k, b);
    for (int r = 0; r < kRowBlock; ++r) {
      const uint8_t* row = src + size_t(b * kRowBlock + r) * rb;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* blk = row + size_t(g) * bb;
        uint16_t d;
        std::memcpy(&d, blk, 2);
        s[g * kRowBlock + r] = d;
        const uint8_t* qs = blk + 2;
        if (f == WeightFormat::Q4_0) {
          // nib(i): input i's stored nibble (q + 8), as GGUF orders them.
          auto nib = [&](int i) { return i < 16 ? qs[i] & 0x0F : qs[i - 16] >> 4; };
          uint8_t* out = q + g * 256 + r * 4;
          for (int c = 0; c < 4; ++c)
            for (int j = 0; j < 4; ++j) out[c * 64 + j] = uint8_t(nib(8 * c + j) | (nib(8 * c + 4 + j) << 4));
        } else {  // Q8_0: u8 = q + 128
          uint8_t* out = q + g * 512 + r * 4;
          for (int c = 0; c < 8; ++c)
            for (int j = 0; j < 4; ++j) out[c * 64 + j] = uint8_t(qs[4 * c + j] ^ 0x80);
        }
      }
    }
  }
}

void unpack(const PackedMatrix& w, int64_t b0, int64_t b1, float* out) {
  const int64_t k = w.k, groups = k / kGroup;
  if (is_kquant(w.format)) {
    const KQ kq = kq_of(w.format);
    KTile t;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t sb = 0; sb < k / kSuper; ++sb) {
        kq_decode_tile(w.format, w.qweight + size_t(b) * block_qweight_bytes(w.format, k) + size_t(sb) * kq.tile_bytes, t);
        for (int r = 0; r < kRowBlock; ++r)
          for (int i = 0; i < kSuper; ++i) out[((b - b0) * kRowBlock + r) * k + sb * kSuper + i] = kq_weight(kq, t, r, i);
      }
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* q = w.qweight + size_t(b) * block_qweight_bytes(w.format, k);
    const uint16_t* s = w.format == WeightFormat::BF16 ? nullptr : w.scales + size_t(b) * block_scale_count(w.format, k);
    for (int r = 0; r < kRowBlock; ++r) {
      float* o = out + ((b - b0) * kRowBlock + r) * k;
      if (w.format == WeightFormat::BF16) {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(q) + 2 * r;
        for (int64_t kk = 0; kk < k / 2; ++kk) {
          o[2 * kk] = bf16_to_f32(p[kk * 2 * kRowBlock]);
          o[2 * kk + 1] = bf16_to_f32(p[kk * 2 * kRowBlock + 1]);
        }
        continue;
      }
      for (int64_t g = 0; g < groups; ++g) {
        const float sc = scale_to_f32(w.format, s[g * kRowBlock + r]);
        float* og = o + g * kGroup;
        if (nibble_layout(w.format)) {
          const uint8_t* in = q + g * 256 + r * 4;
          for (int c = 0; c < 4; ++c)
            for (int j = 0; j < 4; ++j) {
              const uint8_t byte = in[c * 64 + j];
              og[8 * c + j] = float(int(byte & 0x0F) - 8) * sc;
              og[8 * c + 4 + j] = float(int(byte >> 4) - 8) * sc;
            }
        } else {
          const uint8_t* in = q + g * 512 + r * 4;
          for (int c = 0; c < 8; ++c)
            for (int j = 0; j < 4; ++j) og[4 * c + j] = float(int(in[c * 64 + j]) - 128) * sc;
        }
      }
    }
  }
}

}  // namespace hybrid
