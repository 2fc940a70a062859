// simd_vnni.h: the AVX-512 VNNI matmul_a8 body (vpdpbusd), the decode workhorse. Shared by
// kernels_avx512_vnni.cpp and kernels_amx.cpp (AMX's small-T fallback). Include only from a TU
// compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni (or more).
//
// The tile scaffold is simd_avx512.h's z_matmul_a8_tile16xTT; this header gives it the two
// VNNI dots, vnni_q4g32 and vnni_q8g32. Per (block, group) of INT4 the inner loop is: 4 zmm loads
// of packed bytes, 3 ops each to split low/high nibbles (and, shift, and), then per token 8
// vpdpbusd against broadcast activations (u8 nibble x s8 activation, 4 products per int32 lane),
// the +8 offset removed by starting the int32 accumulator at -8 * gsum, one int->float convert and
// one FMA by (weight scale x activation scale). Groups are independent int32 chains, so
// out-of-order execution overlaps them; the fp32 accumulator gets one FMA per group.
//
// Legend: RB = 16 rows per packed block, G = 32 inputs per group, NG = K / 32, TT tokens per tile.
#pragma once
#include "core/simd_avx512.h"

namespace hybrid {
namespace {

// vpdpbusd adds 4 u8 x s8 products per int32 lane without saturation, so the packed bytes are
// the operand as they are (INT4: the nibbles, z_q4g32_operands; INT8: the u8 = q + 128 bytes) and
// the offset goes by starting the int32 sum at -offset * gsum. Two int32 chains (even / odd
// operands) halve the dependent vpdpbusd latency at T = 1.
template <int kBytes, int kOffset>
struct vnni_qg32 {
  static constexpr int kGroupBytes = kBytes;
  static constexpr bool kPrefetchNextBlock = true;  // from 2 tokens (z_prefetch_next_block)
  struct Operands { __m512i wv[8]; };
  static HY_ALWAYS_INLINE __m512i dot(const Operands& o, const int8_t* a, int32_t gsum) {
    __m512i s0 = _mm512_set1_epi32(-kOffset * gsum);
    __m512i s1 = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int i = 0; i < 8; i += 2) {
      s0 = _mm512_dpbusd_epi32(s0, o.wv[i], z_bcast4(a + 4 * i));
      s1 = _mm512_dpbusd_epi32(s1, o.wv[i + 1], z_bcast4(a + 4 * i + 4));
    }
    return _mm512_add_epi32(s0, s1);
  }
};

struct vnni_q4g32 : vnni_qg32<256, 8> {
  static HY_ALWAYS_INLINE void load(const uint8_t* p, Operands& o) { z_q4g32_operands(p, o.wv); }
};

struct vnni_q8g32 : vnni_qg32<512, 128> {
  static HY_ALWAYS_INLINE void load(const uint8_t* p, Operands& o) {
#pragma GCC unroll 16
    for (int c = 0; c < 8; ++c) o.wv[c] = _mm512_loadu_si512(p + c * 64);
  }
};

// The K types' dot (simd_avx512.h, z_kq_a8_tile16xTT): the u8 operands as they are (IQ4_XS's
// u = t + 128 included, the scaffold removes 128 A), one vpdpbusd chain per 16 inputs.
struct vnni_kq {
  static constexpr bool kSignedTable = false;
  template <bool kTable = false>
  static HY_ALWAYS_INLINE void dot_t(const __m512i* wv, const int8_t* a, __m512i& lo, __m512i& hi) {
    lo = _mm512_setzero_si512();
    hi = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      lo = _mm512_dpbusd_epi32(lo, wv[i], z_bcast4(a + 4 * i));
      hi = _mm512_dpbusd_epi32(hi, wv[i + 4], z_bcast4(a + 16 + 4 * i));
    }
  }
};

// Tokens [t_begin, t_end) of x for blocks [b0, b1); out points at block b0's column of token 0.
[[maybe_unused]] static void v_matmul_a8_range(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                                               int64_t t_begin, int64_t t_end, float* out, int64_t ldo) {
  z_matmul_a8_range<vnni_q4g32, vnni_q8g32, vnni_kq>(w, b0, b1, x, t_begin, t_end, out, ldo);
}

[[maybe_unused]] static void v_matmul_a8(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                        float* out, int64_t ldo) {
  v_matmul_a8_range(w, b0, b1, x, 0, x.t, out, ldo);
}

}  // namespace
}  // namespace hybrid
