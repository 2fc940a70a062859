// simd_avx512.h: AVX-512 (F/BW/VL/DQ) kernel bodies shared by the AVX-512 translation units
// (kernels_avx512.cpp uses them directly; kernels_avx512_vnni.cpp and kernels_amx.cpp include
// this header for the helpers). Include only from a TU compiled with at least
// -mavx512f -mavx512bw -mavx512vl -mavx512dq.
//
// Everything here has internal linkage on purpose (`static`, and the templates and lambdas inside
// this anonymous namespace): no COMDAT copy of an AVX-512 function may be shared with a TU
// compiled for a lower ISA. No STL code: token-tile widths are constants folded into always-inline
// bodies by with_tile_width (tile_width.h) in each driver.
//
// Legend: RB = 16 rows per packed block (one zmm of fp32/int32 lanes), G = 32 inputs per group,
// NG = K / 32 groups, T tokens, TT tokens handled together in registers (a "token tile").
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/kernels.h"
#include "core/kquant.h"
#include "core/simd_iq.h"
#include "core/tile_width.h"

// GCC 12 reports "__Y may be used uninitialized" inside avx512fintrin.h for every accumulator
// array whose tail lanes a constant token-tile width leaves unused (GCC PR105593, a false
// positive of _mm512_undefined_*); it says nothing about this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace hybrid {
namespace {

// Decode streams each thread's weight slice once: prefetching kPrefetchBytes ahead keeps more
// cache lines in flight than the hardware streamer does alone. Measured on a Xeon (AVX-512 VNNI,
// INT4, 1 thread, kernel GB/s over plain-read GB/s, hint T0): no prefetch 0.71, 1 KiB 0.71,
// 2 KiB 0.79, 4 KiB 0.99, 8 KiB 0.96, 16 KiB 0.96 (medians of 5-6 alternating runs). On Zen 4
// (EPYC, 2-vCPU KVM guest, INT4 K2.5 experts, 2 threads, decode over a plain read of the same
// experts' pages, all settings interleaved run by run in one process, 4 + 4 processes of 10
// runs): 4 KiB T0 0.72-0.87 (median 0.82), none 0.70-0.98, 8 KiB T0 0.80, 16 KiB T0 0.75; into
// L2 (T1) 4 KiB 0.83, 6 KiB 0.90-0.96, 8 KiB 0.90-1.03 (0.91), 16 KiB 0.85-1.06, 24 KiB 0.89;
// 8 KiB T2 0.79-0.91. Prefill (128 and 1024 tokens over 64 experts) unchanged within noise.
// Hence 8 KiB into L2: far enough ahead for a core's memory latency at this rate, and the
// lines do not push the current group's operands out of L1.
constexpr int64_t kPrefetchBytes = 8192;

static HY_ALWAYS_INLINE void z_prefetch_bytes(const uint8_t* p, int bytes) {
#pragma GCC unroll 8
  for (int i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + i), _MM_HINT_T1);
}

// The same bytes one row block further on (`ahead` = bytes per block), into L2: a lookahead of a
// whole block (57 KiB for K = 7168) lets the prefill GEMM, which spends ~10x longer per byte than
// decode, keep memory busy while it computes. Measured (AMX INT4, 11 tokens, weights from RAM,
// 1 thread, host shared with other jobs): +4% and +12% in two alternating series, within that
// host's noise; decode (T = 1) unchanged, so the VNNI path uses it only from 2 tokens.
static HY_ALWAYS_INLINE void z_prefetch_next_block(const uint8_t* p, int bytes, int64_t ahead) {
#pragma GCC unroll 8
  for (int i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + ahead + i), _MM_HINT_T1);
}

// 16 bf16 values -> 16 fp32 (bf16 is the top half of an fp32: zero-extend, shift).
static HY_ALWAYS_INLINE __m512 z_load_bf16x16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Per-(row, group) weight scales of the 16 rows of a block, as fp32: the scale policies of the
// integer formats (kernels.h), a template argument of every tile below.
struct z_scales_bf16 {  // INT4_G32, INT8_G32
  static HY_ALWAYS_INLINE __m512 load(const uint16_t* p) { return z_load_bf16x16(p); }
};
struct z_scales_f16 {  // Q4_0, Q8_0 (GGUF's fp16 block scales): vcvtph2ps, exact
  static HY_ALWAYS_INLINE __m512 load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

// fn(nibbles, scales) for an integer group-32 format: nibbles is std::true_type for the INT4_G32
// operand layout (INT4_G32, Q4_0) and std::false_type for the INT8_G32 one (INT8_G32, Q8_0);
// scales the policy above. One place maps formats to (layout, scales) for every AVX-512 driver.
template <class Fn>
static HY_ALWAYS_INLINE void z_with_int_format(WeightFormat f, Fn&& fn) {
  switch (f) {
    case WeightFormat::INT4_G32: fn(std::true_type{}, z_scales_bf16{}); break;
    case WeightFormat::Q4_0: fn(std::true_type{}, z_scales_f16{}); break;
    case WeightFormat::INT8_G32: fn(std::false_type{}, z_scales_bf16{}); break;
    case WeightFormat::Q8_0: fn(std::false_type{}, z_scales_f16{}); break;
    default: break;  // BF16 and the K types: the callers handle them first
  }
}

// Four int8 activations (inputs k..k+3) broadcast to every 32-bit lane: the s8 operand of
// vpmaddubsw / vpdpbusd against one [16 lanes x 4 inputs] weight chunk.
static HY_ALWAYS_INLINE __m512i z_bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The 8 [16 lanes x 4 inputs] u8 operands of one INT4 group (kernels.h layout): operand i covers
// inputs 4i..4i+3, so chunk c gives operands 2c (its low nibbles) and 2c + 1 (its high nibbles).
static HY_ALWAYS_INLINE void z_q4g32_operands(const uint8_t* p, __m512i* wv) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 16
  for (int c = 0; c < 4; ++c) {
    const __m512i v = _mm512_loadu_si512(p + c * 64);
    wv[2 * c] = _mm512_and_si512(v, m4);
    wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
  }
}

// ---------------------------------------------------------------------------------------------
// quantize_row_a8: per group of 32, scale = amax / 127, q = round-to-nearest-even(x * 127 / amax);
// a group holding NaN or Inf gets scale NaN, q 0.
// ---------------------------------------------------------------------------------------------
[[maybe_unused]] static void z_quantize_row_a8(const float* x, int64_t k, int8_t* q, float* scale, int32_t* gsum) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    __m512 v0 = _mm512_loadu_ps(xg);
    __m512 v1 = _mm512_loadu_ps(xg + 16);
    const __m512 a0 = _mm512_and_ps(v0, absmask), a1 = _mm512_and_ps(v1, absmask);
    if ((_mm512_cmp_ps_mask(a0, fmax, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(a1, fmax, _CMP_NLE_UQ)) != 0) {
      std::memset(q + g * kGroup, 0, kGroup);  // Inf or NaN in the group: zeros, scale NaN
      scale[g] = kNonFiniteScale;
      gsum[g] = 0;
      continue;
    }
    __m512 a = _mm512_max_ps(a0, a1);
    float amax = _mm512_reduce_max_ps(a);
    float s = amax / 127.0f;
    if (!(s > 0.0f)) {  // all-zero group: zeros, scale 0
      std::memset(q + g * kGroup, 0, kGroup);
      scale[g] = 0.0f;
      gsum[g] = 0;
      continue;
    }
    __m512 inv = _mm512_set1_ps(127.0f / amax);  // the scalar reference's formula, bit for bit
    // cvtps_epi32 rounds to nearest even (default MXCSR), the same as nearbyintf.
    __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
    __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    const __m512i lim = _mm512_set1_epi32(127);
    i0 = _mm512_max_epi32(_mm512_min_epi32(i0, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
    i1 = _mm512_max_epi32(_mm512_min_epi32(i1, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * kGroup), _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * kGroup + 16), _mm512_cvtepi32_epi8(i1));
    scale[g] = s;
    gsum[g] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
  }
}

// ---------------------------------------------------------------------------------------------
// matmul_f32 (precise path): weights dequantised exactly to fp32 ((nibble - 8) * scale is exact:
// a 4-bit integer times an 8-bit-mantissa bf16), activations and accumulation fp32.
// One row block x one token tile of TT <= 4 tokens; out points at (token t0, block column).
// ---------------------------------------------------------------------------------------------
#define HY_Z_F32_TT_MAX 4

// INT4: vpermps looks up (nibble - 8) as fp32 from a 16-entry table using only the low 4 bits
// of each lane, so a shift is the whole unpack; the group's sum is scaled once (exact products
// (nibble - 8) * x, one fp32 rounding order among others).
template <class Sc>
static HY_ALWAYS_INLINE void z_f32_i4_tile(const PackedMatrix& w, int64_t b, const float* x,
                                           int64_t ldx, int tt, float* out, int64_t ldo) {
  const int64_t ng = w.k / kGroup;
  const uint8_t* qw = w.qweight + b * ng * 256;
  const uint16_t* sc = w.scales + b * ng * kRowBlock;
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 acc[HY_Z_F32_TT_MAX];
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    z_prefetch_bytes(qw + g * 256, 256);
    __m512 ag[HY_Z_F32_TT_MAX];  // sum over the group of (nibble - 8) * x
#pragma GCC unroll 16
    for (int t = 0; t < tt; ++t) ag[t] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(qw + g * 256 + c * 64);
      const int64_t k0 = g * kGroup + 8 * c;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // j < 4: low nibble of byte j; j >= 4: high nibble of j-4
        const int sh = (j < 4) ? 8 * j : 8 * (j - 4) + 4;
        const __m512 wv = _mm512_permutexvar_ps(sh ? _mm512_srli_epi32(v, sh) : v, table);
#pragma GCC unroll 16
        for (int t = 0; t < tt; ++t)
          ag[t] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[t * ldx + k0 + j]), ag[t]);
      }
    }
    const __m512 s = Sc::load(sc + g * kRowBlock);
#pragma GCC unroll 16
    for (int t = 0; t < tt; ++t) acc[t] = _mm512_fmadd_ps(ag[t], s, acc[t]);
  }
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

template <class Sc>
static HY_ALWAYS_INLINE void z_f32_i8_tile(const PackedMatrix& w, int64_t b, const float* x,
                                           int64_t ldx, int tt, float* out, int64_t ldo) {
  const int64_t ng = w.k / kGroup;
  const uint8_t* qw = w.qweight + b * ng * 512;
  const uint16_t* sc = w.scales + b * ng * kRowBlock;
  const __m512i m8 = _mm512_set1_epi32(0xFF);
  __m512 acc[HY_Z_F32_TT_MAX];
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 s = Sc::load(sc + g * kRowBlock);
    const __m512 s128 = _mm512_mul_ps(s, _mm512_set1_ps(128.0f));
    z_prefetch_bytes(qw + g * 512, 512);
#pragma GCC unroll 16
    for (int c = 0; c < 8; ++c) {
      const __m512i v = _mm512_loadu_si512(qw + g * 512 + c * 64);
      const int64_t k0 = g * kGroup + 4 * c;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        __m512i byte = _mm512_and_si512(_mm512_srli_epi32(v, 8 * j), m8);
        __m512 wv = _mm512_fmsub_ps(_mm512_cvtepi32_ps(byte), s, s128);  // (u8 - 128) * s
#pragma GCC unroll 16
        for (int t = 0; t < tt; ++t)
          acc[t] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[t * ldx + k0 + j]), acc[t]);
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

static HY_ALWAYS_INLINE void z_f32_bf16_tile(const PackedMatrix& w, int64_t b, const float* x,
                                             int64_t ldx, int tt, float* out, int64_t ldo) {
  const int64_t kp = w.k / 2;  // pairs
  const uint8_t* qw = w.qweight + b * kp * 64;
  const __m512i hi = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  __m512 acc[HY_Z_F32_TT_MAX];
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    z_prefetch_bytes(qw + p * 64, 64);
    const __m512i v = _mm512_loadu_si512(qw + p * 64);
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));  // W[row][2p]
    const __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(v, hi));   // W[row][2p + 1]
#pragma GCC unroll 16
    for (int t = 0; t < tt; ++t) {
      acc[t] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[t * ldx + 2 * p]), acc[t]);
      acc[t] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[t * ldx + 2 * p + 1]), acc[t]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

// ---------------------------------------------------------------------------------------------
// The K types (kquant.h): per tile of 16 rows x 256 inputs, per group g of 32 inputs, the 8 u8
// operands (z_kq_operands: a shift and a mask per bit plane, IQ4_XS's table by vpshufb) and the
// fp32 lanes D sc_j, Dm m_j of the group's sub-blocks (one for 32-input sub-blocks, two for 16).
//   f32: W = fmsub(u, D sc_j, D sc_j off + Dm m_j) (ggml's value: one rounding of an exact
//        difference), one FMA per input and token.
//   a8:  per token the exact int32 sums I_j = sum u q_a over each sub-block (a Dot policy: bw or
//        vnni), then acc += (I_j - off A_j) * (D sc_j xs) - (Dm m_j) * (xs A_j), A_j the sub-block's
//        activation sum (gsum, or hsum and gsum - hsum for 16-input sub-blocks).
// Legend: S inputs per sub-block, NS = K / 256 tiles per row block.
// ---------------------------------------------------------------------------------------------
template <WeightFormat F>
static HY_ALWAYS_INLINE void z_kq_operands(const uint8_t* tile, int g, __m512i* wv) {
  constexpr KQ k = kq_of(F);
  if constexpr (k.grid) {  // the lattice types: codebook lookups (simd_iq.h)
    z_iq_operands<F>(tile, g, wv);
    return;
  }
  if constexpr (k.nib) {
    z_q4g32_operands(tile + k.nib_at + g * 256, wv);
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) wv[i] = _mm512_setzero_si512();
  }
  if constexpr (k.crumb) {
    const __m512i m3 = _mm512_set1_epi8(3);
#pragma GCC unroll 2
    for (int c = 0; c < 2; ++c) {
      const __m512i v = _mm512_loadu_si512(tile + k.crumb_at + g * 128 + c * 64);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        __m512i cr = _mm512_and_si512(s ? _mm512_srli_epi16(v, 2 * s) : v, m3);
        if constexpr (k.crumb_shift > 0) cr = _mm512_slli_epi16(cr, k.crumb_shift);
        wv[4 * c + s] = _mm512_or_si512(wv[4 * c + s], cr);
      }
    }
  }
  if constexpr (k.bit) {
    const __m512i v = _mm512_loadu_si512(tile + k.bit_at + g * 64);
    const __m512i m1 = _mm512_set1_epi8(1 << k.bit_shift);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {  // bit i of each byte to bit bit_shift
      const __m512i b = i > k.bit_shift ? _mm512_srli_epi16(v, i - k.bit_shift)
                        : i < k.bit_shift ? _mm512_slli_epi16(v, k.bit_shift - i) : v;
      wv[i] = _mm512_or_si512(wv[i], _mm512_and_si512(b, m1));
    }
  }
  if constexpr (k.table && k.nib) {  // nibble -> table value + 128 (u8)
    int8_t tb[16];
    for (int i = 0; i < 16; ++i) tb[i] = int8_t(kIq4Values[i] ^ 0x80);
    const __m512i tab = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb)));
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) wv[i] = _mm512_shuffle_epi8(tab, wv[i]);
  }
}

// The fp32 lanes D sc_j (dsc) and Dm m_j (dmm, types with mins) of sub-block j of a tile.
template <WeightFormat F>
static HY_ALWAYS_INLINE void z_kq_scales(const uint8_t* tile, int j, __m512 d, __m512 dm, __m512& dsc, __m512& dmm) {
  constexpr KQ k = kq_of(F);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + k.sc_at + 16 * j));
  if constexpr (k.scale_nibbles) {
    const __m512i b = _mm512_cvtepu8_epi32(raw);
    dsc = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))));
    dmm = _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)));
  } else {
    dsc = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)));
    if constexpr (k.min) {
      const __m128i mr = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + k.m_at + 16 * j));
      dmm = _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mr)));
    } else {
      dmm = _mm512_setzero_ps();
    }
  }
}

// Prefetch of the tile kPrefetchBytes ahead, an eighth (one group's share) at a time.
template <WeightFormat F>
static HY_ALWAYS_INLINE void z_kq_prefetch(const uint8_t* tile, int g) {
  constexpr int share = (kq_of(F).tile_bytes + 8 * 64 - 1) / (8 * 64) * 64;
  z_prefetch_bytes(tile + g * share, share);
}

// The walk over one 16-row block's groups for a K type, shared by its f32 and a8 tiles: per group
// G = 8 sb + g (super-block sb, group g), body(G, wv, dsc, dmm) with the group's 8 operands
// (z_kq_operands) and its sub-blocks' scales and mins (z_kq_scales; [1]: the second 16-input
// half when k.sub == 16).
template <WeightFormat F, class Body>
static HY_ALWAYS_INLINE void z_kq_groups(const PackedMatrix& w, int64_t b, Body&& body) {
  constexpr KQ k = kq_of(F);
  const int64_t ns = w.k / kSuper;
  for (int64_t sb = 0; sb < ns; ++sb) {
    const uint8_t* tile = w.qweight + (b * ns + sb) * k.tile_bytes;
    const __m512 d = _mm512_mul_ps(z_scales_f16::load(reinterpret_cast<const uint16_t*>(tile + k.d_at)),
                                   _mm512_set1_ps(kq_dscale(k)));  // 2^-dshift (lattice types): exact
    const __m512 dm = k.min ? z_scales_f16::load(reinterpret_cast<const uint16_t*>(tile + k.dm_at)) : _mm512_setzero_ps();
    for (int g = 0; g < 8; ++g) {
      z_kq_prefetch<F>(tile, g);
      __m512i wv[8];
      z_kq_operands<F>(tile, g, wv);
      __m512 dsc[2], dmm[2];
#pragma GCC unroll 2
      for (int h = 0; h < (k.sub == 16 ? 2 : 1); ++h) z_kq_scales<F>(tile, k.sub == 16 ? 2 * g + h : g, d, dm, dsc[h], dmm[h]);
      body(sb * 8 + g, wv, dsc, dmm);
    }
  }
}

template <WeightFormat F>
static HY_ALWAYS_INLINE void z_kq_f32_tile(const PackedMatrix& w, int64_t b, const float* x, int64_t ldx, int tt,
                                           float* out, int64_t ldo) {
  constexpr KQ k = kq_of(F);
  const __m512i m8 = _mm512_set1_epi32(0xFF);
  __m512 acc[HY_Z_F32_TT_MAX];
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) acc[t] = _mm512_setzero_ps();
  z_kq_groups<F>(w, b, [&](int64_t G, const __m512i* wv, const __m512* dsc, const __m512* dmm) HY_INLINE_LAMBDA {
    __m512 bias[2];
#pragma GCC unroll 2
    for (int h = 0; h < (k.sub == 16 ? 2 : 1); ++h)
      bias[h] = k.off ? _mm512_fmadd_ps(dsc[h], _mm512_set1_ps(float(k.off)), dmm[h]) : dmm[h];  // exact
    const int64_t k0 = G * kGroup;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int h = k.sub == 16 ? i / 4 : 0;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512i u = _mm512_and_si512(j ? _mm512_srli_epi32(wv[i], 8 * j) : wv[i], m8);
        const __m512 wf = _mm512_fmsub_ps(_mm512_cvtepi32_ps(u), dsc[h], bias[h]);
#pragma GCC unroll 16
        for (int t = 0; t < tt; ++t) acc[t] = _mm512_fmadd_ps(wf, _mm512_set1_ps(x[t * ldx + k0 + 4 * i + j]), acc[t]);
      }
    }
  });
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

// fn(std::integral_constant<WeightFormat, F>) for a K type f; nothing for other formats.
template <class Fn>
static HY_ALWAYS_INLINE void z_with_kq_format(WeightFormat f, Fn&& fn) {
  switch (f) {
    case WeightFormat::Q4_K: fn(std::integral_constant<WeightFormat, WeightFormat::Q4_K>{}); break;
    case WeightFormat::Q5_K: fn(std::integral_constant<WeightFormat, WeightFormat::Q5_K>{}); break;
    case WeightFormat::Q6_K: fn(std::integral_constant<WeightFormat, WeightFormat::Q6_K>{}); break;
    case WeightFormat::Q3_K: fn(std::integral_constant<WeightFormat, WeightFormat::Q3_K>{}); break;
    case WeightFormat::Q2_K: fn(std::integral_constant<WeightFormat, WeightFormat::Q2_K>{}); break;
    case WeightFormat::IQ4_XS: fn(std::integral_constant<WeightFormat, WeightFormat::IQ4_XS>{}); break;
    case WeightFormat::IQ2_XXS: fn(std::integral_constant<WeightFormat, WeightFormat::IQ2_XXS>{}); break;
    case WeightFormat::IQ2_XS: fn(std::integral_constant<WeightFormat, WeightFormat::IQ2_XS>{}); break;
    case WeightFormat::IQ3_XXS: fn(std::integral_constant<WeightFormat, WeightFormat::IQ3_XXS>{}); break;
    case WeightFormat::IQ1_S: fn(std::integral_constant<WeightFormat, WeightFormat::IQ1_S>{}); break;
    case WeightFormat::IQ1_M: fn(std::integral_constant<WeightFormat, WeightFormat::IQ1_M>{}); break;
    default: break;
  }
}

[[maybe_unused]] static void z_matmul_f32(const PackedMatrix& w, int64_t b0, int64_t b1, const float* x, int64_t t,
                         int64_t ldx, float* out, int64_t ldo) {
  for (int64_t b = b0; b < b1; ++b) {
    float* ob = out + (b - b0) * kRowBlock;
    for (int64_t t0 = 0; t0 < t; t0 += HY_Z_F32_TT_MAX) {
      const float* xt = x + t0 * ldx;
      float* ot = ob + t0 * ldo;
      with_tile_width<HY_Z_F32_TT_MAX>(int(t - t0), [&](auto tt) {
        if (w.format == WeightFormat::BF16) return z_f32_bf16_tile(w, b, xt, ldx, tt, ot, ldo);
        z_with_kq_format(w.format, [&](auto f) { z_kq_f32_tile<decltype(f)::value>(w, b, xt, ldx, tt, ot, ldo); });
        z_with_int_format(w.format, [&](auto nibbles, auto scales) {
          using Sc = decltype(scales);
          if constexpr (decltype(nibbles)::value) z_f32_i4_tile<Sc>(w, b, xt, ldx, tt, ot, ldo);
          else z_f32_i8_tile<Sc>(w, b, xt, ldx, tt, ot, ldo);
        });
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// matmul_a8: one scaffold, z_matmul_a8_tile16xTT<Dot>, for every int8-activation kernel of the
// AVX-512 units: a tile is one row block (16 rows, one zmm) x TT <= 8 tokens (16 for VNNI) of fp32
// accumulators; per group of 32 inputs Dot::load prepares the group's weight operands once, and
// per token Dot::dot gives the exact int32 sums sum_k q_w * q_a of the 16 rows, scaled by
// (weight scale x activation scale) into the accumulator with one FMA. The int32 sums are exact
// whatever the instruction sequence, so every Dot gives the same output bits for the same input.
// Dots (one per format and instruction set, ggml's naming habit):
//   bw_q4g32, bw_q8g32      this header, AVX-512 BW: vpmaddubsw (u8 weight x s8 activation ->
//                           s16 pairs) + vpmaddwd;
//   vnni_q4g32, vnni_q8g32  simd_vnni.h: vpdpbusd.
// INT4 (bw): |nibble * a| <= 15 * 128, so the s16 sums of all 8 (chunk, half) products of a group
// (16 products per s16 lane) stay below 32767: one vpmaddwd per group, then the +8 offset is
// removed with gsum. INT8 (bw): u8 * s8 pairs can reach 64770 and would saturate, so the weight is
// made signed (u8 ^ 0x80 = q) and the usual |w| x sign(a, w) form is used (|q| <= 127: pairs <= 32258).
// ---------------------------------------------------------------------------------------------
#define HY_Z_A8_TT_MAX 8
// The widest token tile a driver may ask z_matmul_a8_tile16xTT or z_kq_a8_tile16xTT for (their
// accumulator arrays): the VNNI driver runs 16 for both (simd_vnni.h), the others HY_Z_A8_TT_MAX.
#define HY_Z_A8_TT_INT_MAX 16

struct bw_q4g32 {
  static constexpr int kGroupBytes = 256;
  static constexpr bool kPrefetchNextBlock = false;
  struct Operands { __m512i wv[8]; };
  static HY_ALWAYS_INLINE void load(const uint8_t* p, Operands& o) { z_q4g32_operands(p, o.wv); }
  static HY_ALWAYS_INLINE __m512i dot(const Operands& o, const int8_t* a, int32_t gsum) {
    const __m512i ones = _mm512_set1_epi16(1);
    __m512i s16 = _mm512_maddubs_epi16(o.wv[0], z_bcast4(a));
#pragma GCC unroll 16
    for (int i = 1; i < 8; ++i) s16 = _mm512_add_epi16(s16, _mm512_maddubs_epi16(o.wv[i], z_bcast4(a + 4 * i)));
    return _mm512_sub_epi32(_mm512_madd_epi16(s16, ones), _mm512_set1_epi32(8 * gsum));
  }
};

struct bw_q8g32 {
  static constexpr int kGroupBytes = 512;
  static constexpr bool kPrefetchNextBlock = false;
  struct Operands {
    __m512i wabs[8];
    __mmask64 neg[8];
  };
  static HY_ALWAYS_INLINE void load(const uint8_t* p, Operands& o) {
    const __m512i flip = _mm512_set1_epi8(int8_t(0x80));
#pragma GCC unroll 16
    for (int c = 0; c < 8; ++c) {
      const __m512i ws = _mm512_xor_si512(_mm512_loadu_si512(p + c * 64), flip);  // q as s8
      o.neg[c] = _mm512_movepi8_mask(ws);
      o.wabs[c] = _mm512_abs_epi8(ws);
    }
  }
  static HY_ALWAYS_INLINE __m512i dot(const Operands& o, const int8_t* a, int32_t) {
    const __m512i ones = _mm512_set1_epi16(1);
    __m512i s32 = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int c = 0; c < 8; ++c) {
      const __m512i ab = z_bcast4(a + 4 * c);
      const __m512i as = _mm512_mask_sub_epi8(ab, o.neg[c], _mm512_setzero_si512(), ab);  // sign(a, q)
      s32 = _mm512_add_epi32(s32, _mm512_madd_epi16(_mm512_maddubs_epi16(o.wabs[c], as), ones));
    }
    return s32;
  }
};

// Row block b x tokens [t0, t0 + tt); out points at (token t0, block b's column). Sc: the scale
// policy of the format (z_scales_bf16 / z_scales_f16).
template <class Dot, class Sc>
static HY_ALWAYS_INLINE void z_matmul_a8_tile16xTT(const PackedMatrix& w, int64_t b, const QuantizedActs& x,
                                                   int64_t t0, int tt, float* out, int64_t ldo) {
  const int64_t ng = w.k / kGroup, gbytes = Dot::kGroupBytes;
  const uint8_t* qw = w.qweight + b * ng * gbytes;
  const uint16_t* sc = w.scales + b * ng * kRowBlock;
  __m512 acc[HY_Z_A8_TT_INT_MAX];
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* p = qw + g * gbytes;
    z_prefetch_bytes(p, int(gbytes));  // see kPrefetchBytes
    if (Dot::kPrefetchNextBlock && tt > 1) z_prefetch_next_block(p, int(gbytes), ng * gbytes);
    typename Dot::Operands ops;
    Dot::load(p, ops);
    const __m512 sw = Sc::load(sc + g * kRowBlock);
#pragma GCC unroll 16
    for (int t = 0; t < tt; ++t) {
      const int64_t row = t0 + t;
      const __m512i s32 = Dot::dot(ops, x.q + row * x.ldq + g * kGroup, x.gsum[row * ng + g]);
      const __m512 sc2 = _mm512_mul_ps(sw, _mm512_set1_ps(x.scale[row * ng + g]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), sc2, acc[t]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

// The K types' a8 tile (see above). DotK: dot(wv, a, lo, hi) gives the int32 sums over operands
// 0-3 (lo) and 4-7 (hi) of sum u q_a, or of sum (u - 128) q_a for table types when
// DotK::kSignedTable (then off counts as 0).
template <WeightFormat F, class DotK>
static HY_ALWAYS_INLINE void z_kq_a8_tile16xTT(const PackedMatrix& w, int64_t b, const QuantizedActs& x,
                                               int64_t t0, int tt, float* out, int64_t ldo) {
  constexpr KQ k = kq_of(F);
  constexpr int off = (k.table && DotK::kSignedTable) ? 0 : k.off;
  const int64_t ng = w.k / kGroup;
  __m512 acc[HY_Z_A8_TT_INT_MAX];
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) acc[t] = _mm512_setzero_ps();
  z_kq_groups<F>(w, b, [&](int64_t G, const __m512i* wv, const __m512* dsc, const __m512* dmm) HY_INLINE_LAMBDA {
#pragma GCC unroll 16
    for (int t = 0; t < tt; ++t) {
      const int64_t row = t0 + t;
      const float xs = x.scale[row * ng + G];
      const int32_t gs = x.gsum[row * ng + G];
      __m512i lo, hi;
      DotK::dot(wv, x.q + row * x.ldq + G * kGroup, lo, hi);
      if constexpr (k.sub == 32) {
        __m512i v = _mm512_add_epi32(lo, hi);
        if constexpr (off != 0) v = _mm512_sub_epi32(v, _mm512_set1_epi32(off * gs));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(dsc[0], _mm512_set1_ps(xs)), acc[t]);
        if constexpr (k.min) acc[t] = _mm512_fnmadd_ps(dmm[0], _mm512_set1_ps(xs * float(gs)), acc[t]);
      } else {
        const int32_t a0 = x.hsum[row * ng + G], a1 = gs - a0;
        if constexpr (off != 0) {
          lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(off * a0));
          hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(off * a1));
        }
        const __m512 xv = _mm512_set1_ps(xs);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(dsc[0], xv), acc[t]);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(dsc[1], xv), acc[t]);
        if constexpr (k.min) {
          acc[t] = _mm512_fnmadd_ps(dmm[0], _mm512_set1_ps(xs * float(a0)), acc[t]);
          acc[t] = _mm512_fnmadd_ps(dmm[1], _mm512_set1_ps(xs * float(a1)), acc[t]);
        }
      }
    }
  });
#pragma GCC unroll 16
  for (int t = 0; t < tt; ++t) _mm512_storeu_ps(out + t * ldo, acc[t]);
}

// AVX-512 BW dot of the K types: vpmaddubsw + vpmaddwd per operand (u <= 63 x |a| <= 127: pairs
// below 16002, no saturation); IQ4_XS's u = t + 128 would saturate, so its table value t is made
// signed again (u ^ 0x80) and |t| x sign(a, t) is used (pairs <= 2 x 127 x 127).
struct bw_kq {
  static constexpr bool kSignedTable = true;
  template <bool kTable>
  static HY_ALWAYS_INLINE __m512i one(__m512i w, const int8_t* a) {
    const __m512i ones = _mm512_set1_epi16(1);
    const __m512i ab = z_bcast4(a);
    if constexpr (kTable) {
      const __m512i ws = _mm512_xor_si512(w, _mm512_set1_epi8(int8_t(0x80)));
      const __m512i as = _mm512_mask_sub_epi8(ab, _mm512_movepi8_mask(ws), _mm512_setzero_si512(), ab);
      return _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(ws), as), ones);
    } else {
      return _mm512_madd_epi16(_mm512_maddubs_epi16(w, ab), ones);
    }
  }
  template <bool kTable = false>
  static HY_ALWAYS_INLINE void dot_t(const __m512i* wv, const int8_t* a, __m512i& lo, __m512i& hi) {
    lo = _mm512_add_epi32(_mm512_add_epi32(one<kTable>(wv[0], a), one<kTable>(wv[1], a + 4)),
                          _mm512_add_epi32(one<kTable>(wv[2], a + 8), one<kTable>(wv[3], a + 12)));
    hi = _mm512_add_epi32(_mm512_add_epi32(one<kTable>(wv[4], a + 16), one<kTable>(wv[5], a + 20)),
                          _mm512_add_epi32(one<kTable>(wv[6], a + 24), one<kTable>(wv[7], a + 28)));
  }
  // Bit-plane types: up to kDepth operands' vpmaddubsw pairs summed in int16 before each
  // vpmaddwd (kquant.h's kq_s16_depth: exact, no lane saturates); 16-input sub-blocks' sums stay
  // apart.
  template <int kDepth, bool kSub32>
  static HY_ALWAYS_INLINE void dot_planes(const __m512i* wv, const int8_t* a, __m512i& lo, __m512i& hi) {
    constexpr int span = (kSub32 || kDepth < 4) ? kDepth : 4;
    const __m512i ones = _mm512_set1_epi16(1);
    __m512i s32[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
#pragma GCC unroll 8
    for (int i0 = 0; i0 < 8; i0 += span) {
      __m512i s16 = _mm512_maddubs_epi16(wv[i0], z_bcast4(a + 4 * i0));
#pragma GCC unroll 8
      for (int i = i0 + 1; i < i0 + span; ++i) s16 = _mm512_add_epi16(s16, _mm512_maddubs_epi16(wv[i], z_bcast4(a + 4 * i)));
      s32[span == 8 ? 0 : i0 / 4] = _mm512_add_epi32(s32[span == 8 ? 0 : i0 / 4], _mm512_madd_epi16(s16, ones));
    }
    lo = s32[0];
    hi = s32[1];
  }
};

// The table flag is the format's: a thin wrapper per format so the scaffold's DotK::dot stays one name.
template <WeightFormat F, class Base>
struct kq_dot : Base {
  static HY_ALWAYS_INLINE void dot(const __m512i* wv, const int8_t* a, __m512i& lo, __m512i& hi) {
    constexpr KQ k = kq_of(F);
    if constexpr (std::is_same_v<Base, bw_kq> && !k.table)
      Base::template dot_planes<kq_s16_depth(k), k.sub == 32>(wv, a, lo, hi);
    else
      Base::template dot_t<k.table>(wv, a, lo, hi);
  }
};

// Tokens [t_begin, t_end) of x for blocks [b0, b1) with the Dots of one instruction set;
// out points at block b0's column of token 0. kIntTile, kKTile: token-tile widths of the group-32
// integer formats and of the K types (<= HY_Z_A8_TT_INT_MAX each).
template <class DotQ4, class DotQ8, class DotK, int kIntTile = HY_Z_A8_TT_MAX, int kKTile = HY_Z_A8_TT_MAX>
static HY_ALWAYS_INLINE void z_matmul_a8_range(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                                               int64_t t_begin, int64_t t_end, float* out, int64_t ldo) {
  static_assert(kIntTile >= 1 && kIntTile <= HY_Z_A8_TT_INT_MAX, "token tile wider than the accumulators");
  static_assert(kKTile >= 1 && kKTile <= HY_Z_A8_TT_INT_MAX, "K-type token tile wider than the accumulators");
  const bool kq = ktile_bytes(w.format) != 0;
  const int64_t step = kq ? kKTile : kIntTile;
  for (int64_t b = b0; b < b1; ++b) {
    float* ob = out + (b - b0) * kRowBlock;
    for (int64_t t0 = t_begin; t0 < t_end; t0 += step) {
      float* ot = ob + t0 * ldo;
      if (kq) {
        with_tile_width<kKTile>(int(t_end - t0), [&](auto tt) {
          z_with_kq_format(w.format, [&](auto f) {
            constexpr WeightFormat F = decltype(f)::value;
            z_kq_a8_tile16xTT<F, kq_dot<F, DotK>>(w, b, x, t0, tt, ot, ldo);
          });
        });
        continue;
      }
      with_tile_width<kIntTile>(int(t_end - t0), [&](auto tt) {
        z_with_int_format(w.format, [&](auto nibbles, auto scales) {
          using Sc = decltype(scales);
          if constexpr (decltype(nibbles)::value) z_matmul_a8_tile16xTT<DotQ4, Sc>(w, b, x, t0, tt, ot, ldo);
          else z_matmul_a8_tile16xTT<DotQ8, Sc>(w, b, x, t0, tt, ot, ldo);
        });
      });
    }
  }
}

[[maybe_unused]] static void z_matmul_a8_bw(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                                            float* out, int64_t ldo) {
  z_matmul_a8_range<bw_q4g32, bw_q8g32, bw_kq>(w, b0, b1, x, 0, x.t, out, ldo);
}

}  // namespace
}  // namespace hybrid
