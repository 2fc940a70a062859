// pack.cpp: see pack.h. Plain loops over one row block at a time; the inner loops run over
// contiguous inputs so the compiler vectorises them.
#include "pack.h"

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
inline float round_to_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

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
  return f == WeightFormat::BF16 ? 0 : size_t(k / kGroup) * kRowBlock;
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
  const int64_t groups = k / kGroup;
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
        for (int i = 0; i < kGroup; ++i) {
          x[i] = load_src(w, dt, row * k + g * kGroup + i);
          amax = std::fmax(amax, std::fabs(x[i]));
        }
        if (format == WeightFormat::INT4_G32) {
          // compressed-tensors: scale = amax / ((qmax - qmin) / 2) in the weight dtype, zero
          // scales replaced by the dtype's eps, then q = round(clamp(x / scale, qmin, qmax)),
          // each division rounded to the weight dtype.
          float scale = amax / 7.5f;
          if (dt == SrcDtype::BF16) scale = round_to_bf16(scale);
          if (scale == 0.f)
            scale = dt == SrcDtype::BF16 ? 0.0078125f : std::numeric_limits<float>::epsilon();
          uint8_t nib[kGroup];
          for (int i = 0; i < kGroup; ++i) {
            float v = x[i] / scale;
            if (dt == SrcDtype::BF16) v = round_to_bf16(v);
            v = std::nearbyint(std::fmin(7.f, std::fmax(-8.f, v)));
            nib[i] = uint8_t(int(v) + 8);
          }
          for (int c = 0; c < 4; ++c)
            for (int j = 0; j < 4; ++j)
              q[g * 256 + c * 64 + r * 4 + j] = uint8_t(nib[8 * c + j] | (nib[8 * c + 4 + j] << 4));
          s[g * kRowBlock + r] = f32_to_bf16(scale);
        } else {  // INT8_G32
          uint16_t sb = f32_to_bf16(amax / 127.f);
          float scale = bf16_to_f32(sb);
          for (int i = 0; i < kGroup; ++i) {
            float v = scale > 0.f ? std::nearbyint(std::fmin(127.f, std::fmax(-127.f, x[i] / scale)))
                                  : 0.f;
            q[g * 512 + (i / 4) * 64 + r * 4 + (i % 4)] = uint8_t(int(v) + 128);
          }
          s[g * kRowBlock + r] = sb;
        }
      }
    }
  }
}

void unpack(const PackedMatrix& w, int64_t b0, int64_t b1, float* out) {
  const int64_t k = w.k, groups = k / kGroup;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* q = w.qweight + size_t(b) * block_qweight_bytes(w.format, k);
    for (int r = 0; r < kRowBlock; ++r) {
      float* o = out + ((b - b0) * kRowBlock + r) * k;
      if (w.format == WeightFormat::BF16) {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(q);
        for (int64_t kk = 0; kk < k; ++kk) o[kk] = bf16_to_f32(p[((kk / 2) * kRowBlock + r) * 2 + (kk & 1)]);
        continue;
      }
      const uint16_t* s = w.scales + size_t(b) * block_scale_count(w.format, k);
      for (int64_t g = 0; g < groups; ++g) {
        float sc = bf16_to_f32(s[g * kRowBlock + r]);
        for (int i = 0; i < kGroup; ++i) {
          int v;
          if (w.format == WeightFormat::INT4_G32) {
            uint8_t byte = q[g * 256 + (i / 8) * 64 + r * 4 + (i % 4)];
            v = ((i % 8) < 4 ? (byte & 0xF) : (byte >> 4)) - 8;
          } else {
            v = int(q[g * 512 + (i / 4) * 64 + r * 4 + (i % 4)]) - 128;
          }
          o[g * kGroup + i] = float(v) * sc;
        }
      }
    }
  }
}

}  // namespace hybrid
