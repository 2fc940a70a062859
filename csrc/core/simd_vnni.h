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

// acc += w (u8) . the 4 activations at a (s8), broadcast from memory by vpdpbusd itself
// ({1to16}): GCC emits a separate vpbroadcastd per step for _mm512_set1_epi32 (8 per token and
// group), which the embedded broadcast saves. Measured (INT4, 128 x 7168, weights in L2, 1 thread,
// best of 8-12 interleaved rounds, Gop/s, thread CPU time): with the 16-token tile below, T = 64:
// 301 -> 317 and 296 -> 316; T = 2: 230 -> 247; T = 1 and T = 11-16 unchanged within the noise.
static HY_ALWAYS_INLINE __m512i vnni_dpbusd_bcast4(__m512i acc, __m512i w, const int8_t* a) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(a)));
  return acc;
}

// Token-tile width of the VNNI group-32 and K-type tiles: 8 weight operands + 16 accumulators + 2
// chains fit the 32 zmm; the 16-token tile came out a little ahead of 8 at 64 tokens (above) and
// runs the ~11 tokens per expert of a 512-token prefill in one tile instead of 8 + 3.
constexpr int kVnniTileTokens = 16;

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
      s0 = vnni_dpbusd_bcast4(s0, o.wv[i], a + 4 * i);
      s1 = vnni_dpbusd_bcast4(s1, o.wv[i + 1], a + 4 * i + 4);
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
// u = t + 128 included, the scaffold removes 128 A), one vpdpbusd chain per 16 inputs, the
// activations broadcast from memory as in the group-32 dots. Measured (512 x 7168 in L2, 1 thread,
// Gop/s, bench/kernel_speed.py --format): the embedded broadcast took Q4_K at T = 1 from 87 to
// 146-154 (INT4's 152-163), IQ2_XXS at T = 16 from 156 to 167; the 16-token K tile (below) then
// IQ2_XXS at T = 11 from 132 to 196 and at T = 16 to 226 (the lattice operands, built once per
// tile, are most of their cost).
struct vnni_kq {
  static constexpr bool kSignedTable = false;
  template <bool kTable = false>
  static HY_ALWAYS_INLINE void dot_t(const __m512i* wv, const int8_t* a, __m512i& lo, __m512i& hi) {
    lo = _mm512_setzero_si512();
    hi = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      lo = vnni_dpbusd_bcast4(lo, wv[i], a + 4 * i);
      hi = vnni_dpbusd_bcast4(hi, wv[i + 4], a + 16 + 4 * i);
    }
  }
};

// Tokens [t_begin, t_end) of x for blocks [b0, b1); out points at block b0's column of token 0.
[[maybe_unused]] static void v_matmul_a8_range(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                                               int64_t t_begin, int64_t t_end, float* out, int64_t ldo) {
  z_matmul_a8_range<vnni_q4g32, vnni_q8g32, vnni_kq, kVnniTileTokens, kVnniTileTokens>(w, b0, b1, x, t_begin, t_end, out, ldo);
}

[[maybe_unused]] static void v_matmul_a8(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                        float* out, int64_t ldo) {
  v_matmul_a8_range(w, b0, b1, x, 0, x.t, out, ldo);
}

}  // namespace
}  // namespace hybrid
