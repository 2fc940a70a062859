// simd_vnni.h: the AVX-512 VNNI matmul_a8 body (vpdpbusd), the decode workhorse. Shared by
// kernels_avx512_vnni.cpp and kernels_amx.cpp (AMX's small-T fallback). Include only from a TU
// compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni (or more).
//
// Per (block, group) of INT4 the inner loop is: 4 zmm loads of packed bytes, 3 ops each to split
// low/high nibbles (and, shift, and), then per token 8 vpdpbusd against broadcast activations
// (u8 nibble x s8 activation, 4 products per int32 lane), the +8 offset removed by starting the
// int32 accumulator at -8 * gsum, one int->float convert and one FMA by (weight scale x
// activation scale). Groups are independent int32 chains, so out-of-order execution overlaps
// them; the fp32 accumulator gets one FMA per group.
//
// Legend: RB = 16 rows per packed block, G = 32 inputs per group, NG = K / 32, TT tokens per tile.
#pragma once
#include "core/simd_avx512.h"

namespace hybrid {
namespace {

#define HY_V_TT_MAX 8

static HY_ALWAYS_INLINE void v_a8_i4_tile(const PackedMatrix& w, int64_t b, const QuantizedActs& x,
                                          int64_t t0, int tt, float* out, int64_t ldo) {
  const int64_t ng = w.k / kGroup;
  const uint8_t* qw = w.qweight + b * ng * 256;
  const uint16_t* sc = w.scales + b * ng * kRowBlock;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[HY_V_TT_MAX];
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* p = qw + g * 256;
    z_prefetch_bytes(p, 256);  // see kPrefetchBytes
    if (tt > 1) z_prefetch_next_block(p, 256, ng * 256);
    __m512i wv[8];  // [chunk c lo, chunk c hi]: inputs 8c..8c+3, 8c+4..8c+7 of the group
#pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) {
      __m512i v = _mm512_loadu_si512(p + c * 64);
      wv[2 * c] = _mm512_and_si512(v, m4);
      wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    }
    const __m512 sw = z_load_bf16x16(sc + g * kRowBlock);
#pragma GCC unroll 16
    for (int t = 0; t < tt; ++t) {
      const int64_t row = t0 + t;
      const int8_t* a = x.q + row * x.ldq + g * kGroup;
      // Two int32 chains (even / odd operands) halve the dependent vpdpbusd latency at T = 1.
      __m512i s0 = _mm512_set1_epi32(-8 * x.gsum[row * ng + g]);
      __m512i s1 = _mm512_setzero_si512();
      s0 = _mm512_dpbusd_epi32(s0, wv[0], z_bcast4(a + 0));
      s1 = _mm512_dpbusd_epi32(s1, wv[1], z_bcast4(a + 4));
      s0 = _mm512_dpbusd_epi32(s0, wv[2], z_bcast4(a + 8));
      s1 = _mm512_dpbusd_epi32(s1, wv[3], z_bcast4(a + 12));
      s0 = _mm512_dpbusd_epi32(s0, wv[4], z_bcast4(a + 16));
      s1 = _mm512_dpbusd_epi32(s1, wv[5], z_bcast4(a + 20));
      s0 = _mm512_dpbusd_epi32(s0, wv[6], z_bcast4(a + 24));
      s1 = _mm512_dpbusd_epi32(s1, wv[7], z_bcast4(a + 28));
      const __m512 sc2 = _mm512_mul_ps(sw, _mm512_set1_ps(x.scale[row * ng + g]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), sc2, acc[t]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

// INT8: the packed u8 bytes (q + 128) are the vpdpbusd operand as they are; -128 * gsum removes
// the offset.
static HY_ALWAYS_INLINE void v_a8_i8_tile(const PackedMatrix& w, int64_t b, const QuantizedActs& x,
                                          int64_t t0, int tt, float* out, int64_t ldo) {
  const int64_t ng = w.k / kGroup;
  const uint8_t* qw = w.qweight + b * ng * 512;
  const uint16_t* sc = w.scales + b * ng * kRowBlock;
  __m512 acc[HY_V_TT_MAX];
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* p = qw + g * 512;
    z_prefetch_bytes(p, 512);
    if (tt > 1) z_prefetch_next_block(p, 512, ng * 512);
    __m512i wv[8];
#pragma GCC unroll 16
    for (int c = 0; c < 8; ++c) wv[c] = _mm512_loadu_si512(p + c * 64);
    const __m512 sw = z_load_bf16x16(sc + g * kRowBlock);
#pragma GCC unroll 16
    for (int t = 0; t < tt; ++t) {
      const int64_t row = t0 + t;
      const int8_t* a = x.q + row * x.ldq + g * kGroup;
      __m512i s0 = _mm512_set1_epi32(-128 * x.gsum[row * ng + g]);
      __m512i s1 = _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int c = 0; c < 8; c += 2) {
        s0 = _mm512_dpbusd_epi32(s0, wv[c], z_bcast4(a + 4 * c));
        s1 = _mm512_dpbusd_epi32(s1, wv[c + 1], z_bcast4(a + 4 * c + 4));
      }
      const __m512 sc2 = _mm512_mul_ps(sw, _mm512_set1_ps(x.scale[row * ng + g]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), sc2, acc[t]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

// Tokens [t_begin, t_end) of x for blocks [b0, b1); out points at block b0's column of token 0.
[[maybe_unused]] static void v_matmul_a8_range(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                              int64_t t_begin, int64_t t_end, float* out, int64_t ldo) {
  for (int64_t b = b0; b < b1; ++b) {
    float* ob = out + (b - b0) * kRowBlock;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += HY_V_TT_MAX) {
      const int tt = int(t_end - t0 < HY_V_TT_MAX ? t_end - t0 : HY_V_TT_MAX);
      float* ot = ob + t0 * ldo;
      if (w.format == WeightFormat::INT4_G32) {
        HY_Z_DISPATCH_A8(v_a8_i4_tile, w, b, x, t0, tt, ot, ldo);
      } else {
        HY_Z_DISPATCH_A8(v_a8_i8_tile, w, b, x, t0, tt, ot, ldo);
      }
    }
  }
}

[[maybe_unused]] static void v_matmul_a8(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                        float* out, int64_t ldo) {
  v_matmul_a8_range(w, b0, b1, x, 0, x.t, out, ldo);
}

}  // namespace
}  // namespace hybrid
