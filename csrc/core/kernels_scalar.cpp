// kernels_scalar.cpp: the scalar reference kernels, plain loops over the packed layouts of
// kernels.h. These define correctness: every SIMD path is tested against them. Compiled for
// baseline x86-64 (the compiler may auto-vectorise with SSE2; results stay exact integer sums
// or ordered fp32 sums as written).
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/kernels.h"
#include "core/kernels_scalar.h"
#include "core/kquant.h"

namespace hybrid {
namespace {

// x [K] -> per group of 32: scale = amax / 127, q = round_half_even(x / scale) (via x * (1/scale)),
// gsum = sum of q. An all-zero group gets scale 0, q 0; a group holding NaN or Inf scale NaN, q 0.
void quantize_row_a8(const float* x, int64_t k, int8_t* q, float* scale, int32_t* gsum) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    float amax = 0.f;
    bool finite = true;
    for (int i = 0; i < kGroup; ++i) {
      amax = std::fmax(amax, std::fabs(xg[i]));
      finite = finite && std::isfinite(xg[i]);
    }
    if (!finite) {
      std::fill(q + g * kGroup, q + (g + 1) * kGroup, int8_t(0));
      scale[g] = kNonFiniteScale;
      gsum[g] = 0;
      continue;
    }
    float s = amax / 127.f;
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int i = 0; i < kGroup; ++i) {
      float v = std::nearbyint(xg[i] * inv);  // default rounding mode: half to even
      v = std::fmin(127.f, std::fmax(-127.f, v));
      q[g * kGroup + i] = int8_t(v);
      sum += int32_t(v);
    }
    scale[g] = s;
    gsum[g] = sum;
  }
}

// Unpack the (block b, group g) tile of a group-32 integer matrix (INT4_G32 / INT8_G32 and their
// GGUF twins Q4_0 / Q8_0) into signed values w[r][i] = q[16*b + r][32*g + i] (offset removed) and
// fp32 scales s[r].
void load_tile(const PackedMatrix& w, int64_t b, int64_t g, int8_t (*q)[kGroup], float* s) {
  const int64_t groups = w.k / kGroup;
  if (nibble_layout(w.format)) {
    const uint8_t* grp = w.qweight + (b * groups + g) * 256;
    for (int c = 0; c < 4; ++c)
      for (int r = 0; r < kRowBlock; ++r)
        for (int j = 0; j < 4; ++j) {
          uint8_t byte = grp[c * 64 + r * 4 + j];
          q[r][8 * c + j] = int8_t((byte & 0x0F) - 8);
          q[r][8 * c + 4 + j] = int8_t((byte >> 4) - 8);
        }
  } else {  // INT8_G32, Q8_0
    const uint8_t* grp = w.qweight + (b * groups + g) * 512;
    for (int c = 0; c < 8; ++c)
      for (int r = 0; r < kRowBlock; ++r)
        for (int j = 0; j < 4; ++j) q[r][4 * c + j] = int8_t(int(grp[c * 64 + r * 4 + j]) - 128);
  }
  for (int r = 0; r < kRowBlock; ++r) s[r] = scale_to_f32(w.format, w.scales[(b * groups + g) * kRowBlock + r]);
}

// BF16 weight W[16*b + r][k].
inline float bf16_weight(const PackedMatrix& w, int64_t b, int r, int64_t k) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(w.qweight);
  return bf16_to_f32(p[((b * (w.k / 2) + k / 2) * kRowBlock + r) * 2 + (k & 1)]);
}

// The K types (kquant.h), one decoded tile at a time. a8: per sub-block j of a group, the exact
// integer sums I = sum u q_a and A = sum q_a, then (I - off A) * (D sc_j * xs) - (Dm m_j * xs) * A
// into the fp32 accumulator; f32: W from kq_weight (bit-equal to ggml's) times x, input order.
void kq_matmul(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs* xa, const float* xf,
               int64_t t, int64_t ldx, float* out, int64_t ldo) {
  const KQ kq = kq_of(w.format);
  const int64_t ns = w.k / kSuper, ng = w.k / kGroup;
  KTile tile;
  std::vector<float> acc(size_t(t) * kRowBlock);
  for (int64_t b = b0; b < b1; ++b) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t sb = 0; sb < ns; ++sb) {
      kq_decode_tile(w.format, w.qweight + (b * ns + sb) * kq.tile_bytes, tile);
      for (int64_t tt = 0; tt < t; ++tt)
        for (int r = 0; r < kRowBlock; ++r) {
          float& a = acc[tt * kRowBlock + r];
          if (xa == nullptr) {
            const float* xr = xf + tt * ldx + sb * kSuper;
            for (int i = 0; i < kSuper; ++i) a += kq_weight(kq, tile, r, i) * xr[i];
            continue;
          }
          const float d = f16_to_f32(tile.d[r]) * kq_dscale(kq), dm = f16_to_f32(tile.dm[r]);
          for (int j = 0; j < kq.nsub; ++j) {
            const int i0 = j * kq.sub;
            const int64_t g = sb * 8 + i0 / kGroup;
            const int8_t* q = xa->q + tt * xa->ldq + sb * kSuper + i0;
            int32_t I = 0, A = 0;
            for (int i = 0; i < kq.sub; ++i) {
              I += int32_t(tile.u[r][i0 + i]) * q[i];
              A += q[i];
            }
            const float xs = xa->scale[tt * ng + g];
            a += float(I - kq.off * A) * (d * float(tile.sc[r][j]) * xs) - (dm * float(tile.m[r][j]) * xs) * float(A);
          }
        }
    }
    for (int64_t tt = 0; tt < t; ++tt)
      for (int r = 0; r < kRowBlock; ++r) out[tt * ldo + (b - b0) * kRowBlock + r] = acc[tt * kRowBlock + r];
  }
}

// Integer dot per group: sum_i (q_w + offset) * q_a - offset * gsum is what a SIMD kernel does
// on the unsigned operand; with the offset already removed it is the plain sum q_w * q_a, the
// same integer. Accumulation over groups in fp32, group order.
void matmul_a8(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x, float* out,
               int64_t ldo) {
  if (is_kquant(w.format)) return kq_matmul(w, b0, b1, &x, nullptr, x.t, 0, out, ldo);
  const int64_t groups = w.k / kGroup;
  int8_t q[kRowBlock][kGroup];
  float s[kRowBlock];
  std::vector<float> acc(size_t(x.t) * kRowBlock);
  for (int64_t b = b0; b < b1; ++b) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < groups; ++g) {
      load_tile(w, b, g, q, s);
      for (int64_t t = 0; t < x.t; ++t) {
        const int8_t* xq = x.q + t * x.ldq + g * kGroup;
        const float xs = x.scale[t * groups + g];
        for (int r = 0; r < kRowBlock; ++r) {
          int32_t dot = 0;
          for (int i = 0; i < kGroup; ++i) dot += int32_t(q[r][i]) * int32_t(xq[i]);
          acc[t * kRowBlock + r] += float(dot) * (s[r] * xs);
        }
      }
    }
    for (int64_t t = 0; t < x.t; ++t)
      for (int r = 0; r < kRowBlock; ++r)
        out[t * ldo + (b - b0) * kRowBlock + r] = acc[t * kRowBlock + r];
  }
}

// fp32 activations: per group, sum q_w * x in fp32, then times the weight scale (INT formats);
// BF16 weights: a plain fp32 dot in input order.
void matmul_f32(const PackedMatrix& w, int64_t b0, int64_t b1, const float* x, int64_t t,
                int64_t ldx, float* out, int64_t ldo) {
  if (is_kquant(w.format)) return kq_matmul(w, b0, b1, nullptr, x, t, ldx, out, ldo);
  const int64_t groups = w.k / kGroup;
  int8_t q[kRowBlock][kGroup];
  float s[kRowBlock];
  std::vector<float> acc(size_t(t) * kRowBlock);
  for (int64_t b = b0; b < b1; ++b) {
    std::fill(acc.begin(), acc.end(), 0.f);
    if (w.format == WeightFormat::BF16) {
      for (int64_t tt = 0; tt < t; ++tt)
        for (int r = 0; r < kRowBlock; ++r) {
          float a = 0.f;
          for (int64_t k = 0; k < w.k; ++k) a += bf16_weight(w, b, r, k) * x[tt * ldx + k];
          acc[tt * kRowBlock + r] = a;
        }
    } else {
      for (int64_t g = 0; g < groups; ++g) {
        load_tile(w, b, g, q, s);
        for (int64_t tt = 0; tt < t; ++tt) {
          const float* xr = x + tt * ldx + g * kGroup;
          for (int r = 0; r < kRowBlock; ++r) {
            float part = 0.f;
            for (int i = 0; i < kGroup; ++i) part += float(q[r][i]) * xr[i];
            acc[tt * kRowBlock + r] += part * s[r];
          }
        }
      }
    }
    for (int64_t tt = 0; tt < t; ++tt)
      for (int r = 0; r < kRowBlock; ++r)
        out[tt * ldo + (b - b0) * kRowBlock + r] = acc[tt * kRowBlock + r];
  }
}

// The reference GEMV walk: one ordered fp32 sum per (row, token) of to_f32(W[n][i]) * x[tt][i].
template <class W, class ToF32>
void gemv_ref(const W* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k, const uint16_t* x, int64_t t,
              int64_t ldx, float* out, int64_t ldo, ToF32 to_f32) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* wr = w + n * ldw;
    for (int64_t tt = 0; tt < t; ++tt) {
      const uint16_t* xr = x + tt * ldx;
      float acc = 0.f;
      for (int64_t i = 0; i < k; ++i) acc += to_f32(wr[i]) * bf16_to_f32(xr[i]);
      out[tt * ldo + (n - n0)] = acc;
    }
  }
}

// The reference: each product is exact in fp32 (bf16 has 8 significant bits), so this is also
// what an FMA chain in input order would give.
void gemv_bf16(const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k, const uint16_t* x,
               int64_t t, int64_t ldx, float* out, int64_t ldo) {
  gemv_ref(w, ldw, n0, n1, k, x, t, ldx, out, ldo, [](uint16_t v) { return bf16_to_f32(v); });
}

// The reference axpy: out row tt += x[tt][i] * W row i, rows in increasing i, so each column is an
// ordered fp32 sum starting from out (accumulate) or 0. Row by row: W is read along its rows (the
// compiler may vectorise over j with SSE2 mul + add, which rounds exactly as written).
void gemv_t_bf16(const uint16_t* w, int64_t ldw, int64_t k, int64_t n0, int64_t n1, const float* x, int64_t t,
                 int64_t ldx, float* out, int64_t ldo, bool accumulate) {
  const int64_t n = n1 - n0;
  for (int64_t tt = 0; tt < t; ++tt) {
    float* o = out + tt * ldo;
    if (!accumulate) std::fill(o, o + n, 0.f);
    for (int64_t i = 0; i < k; ++i) {
      const float xi = x[tt * ldx + i];
      const uint16_t* wr = w + i * ldw + n0;
      for (int64_t j = 0; j < n; ++j) o[j] += xi * bf16_to_f32(wr[j]);
    }
  }
}

// The reference int8 GEMV: int8 x bf16 products are exact in fp32 too.
void gemv_i8(const int8_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k, const uint16_t* x, int64_t t,
             int64_t ldx, float* out, int64_t ldo) {
  gemv_ref(w, ldw, n0, n1, k, x, t, ldx, out, ldo, [](int8_t v) { return float(v); });
}

const KernelTable kTable = {
    "scalar", quantize_row_a8, matmul_a8, matmul_f32,
    nullptr,  // matmul_a16: none below avx512_bf16 (kernels.h); see reference_matmul_a16
    gemv_bf16,
    gemv_t_bf16,
    gemv_i8,
};

}  // namespace

void reference_matmul_a16(const PackedMatrix& w, int64_t b0, int64_t b1, const float* x,
                          int64_t t, int64_t ldx, float* out, int64_t ldo) {
  for (int64_t tt = 0; tt < t; ++tt) {
    const float* xr = x + tt * ldx;
    for (int64_t b = b0; b < b1; ++b) {
      for (int r = 0; r < kRowBlock; ++r) {
        float acc = 0.f;
        for (int64_t k = 0; k < w.k; ++k)
          acc += bf16_weight(w, b, r, k) * bf16_to_f32(f32_to_bf16(xr[k]));
        out[tt * ldo + (b - b0) * kRowBlock + r] = acc;
      }
    }
  }
}

const KernelTable* kernels_scalar() { return &kTable; }

}  // namespace hybrid
