// kernels_avx2.cpp: AVX2 + FMA kernels (see kernels.h) for CPUs without AVX-512:
// quantize_row_a8, matmul_f32 for all three formats (exact fp32 dequantisation, FMA), matmul_a8
// via vpmaddubsw + vpmaddwd, and the dense GEMVs gemv_bf16, gemv_i8 and gemv_t_bf16, whose bodies
// are in simd_avx2_gemv.h. Compiled with -mavx2 -mfma -mf16c only.
//
// A packed row block (16 rows) is two ymm halves of 8 lanes: bytes [0, 32) of every 64-byte chunk
// hold rows 0-7, bytes [32, 64) rows 8-15.
//
// Everything has internal linkage (static, and the templates and lambdas in the anonymous
// namespace), no STL code (see kernels.h: no AVX2-compiled COMDAT copy may leak into the scalar
// path). Token-tile widths are folded to constants by with_tile_width (tile_width.h) in each
// driver and `#pragma GCC unroll` on the fixed loops.
//
// Legend: RB = 16 rows per block (2 x 8 lanes), G = 32 inputs per group, NG = K / 32,
// TT tokens handled together in registers.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/kernels.h"
#include "core/kquant.h"
#include "core/simd_avx2_gemv.h"
#include "core/simd_iq.h"
#include "core/tile_width.h"

namespace hybrid {
namespace {

constexpr int kTileTokens = 4;  // TT max: 2 halves x 4 tokens of fp32 accumulators in 16 ymm
// Software prefetch distance for the weight stream (decode): see simd_avx512.h, kPrefetchBytes.
constexpr int64_t kPrefetchBytes = 4096;

static HY_ALWAYS_INLINE void y_prefetch_bytes(const uint8_t* p, int bytes) {
#pragma GCC unroll 8
  for (int i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + i), _MM_HINT_T0);
}

// Per-(row, group) weight scales of 8 rows as fp32: the scale policies of the integer formats
// (kernels.h), a template argument of the integer tiles below.
struct y_scales_bf16 {  // INT4_G32, INT8_G32
  static HY_ALWAYS_INLINE __m256 load(const uint16_t* p) { return y_load_bf16x8(p); }
};
struct y_scales_f16 {  // Q4_0, Q8_0 (GGUF's fp16 block scales): vcvtph2ps (F16C), exact
  static HY_ALWAYS_INLINE __m256 load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

// fn(nibbles, scales) for an integer group-32 format: nibbles is std::true_type for the INT4_G32
// operand layout (INT4_G32, Q4_0), std::false_type for the INT8_G32 one (INT8_G32, Q8_0); scales
// the policy above. One place maps formats to (layout, scales) for both AVX2 drivers.
template <class Fn>
static HY_ALWAYS_INLINE void y_with_int_format(WeightFormat f, Fn&& fn) {
  switch (f) {
    case WeightFormat::INT4_G32: fn(std::true_type{}, y_scales_bf16{}); break;
    case WeightFormat::Q4_0: fn(std::true_type{}, y_scales_f16{}); break;
    case WeightFormat::INT8_G32: fn(std::false_type{}, y_scales_bf16{}); break;
    case WeightFormat::Q8_0: fn(std::false_type{}, y_scales_f16{}); break;
    default: break;  // BF16 and the K types: the callers handle them first
  }
}

static HY_ALWAYS_INLINE __m256i y_bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

static HY_ALWAYS_INLINE float y_hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

static HY_ALWAYS_INLINE int32_t y_hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// ---------------------------------------------------------------------------------------------
// quantize_row_a8: scale = amax / 127, q = round-to-nearest-even(x * 127 / amax), as the scalar
// reference computes it (bit for bit); a group holding NaN or Inf gets scale NaN, q 0.
// ---------------------------------------------------------------------------------------------
static void y_quantize_row_a8(const float* x, int64_t k, int8_t* q, float* scale, int32_t* gsum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    __m256 v[4];
    __m256 a = _mm256_setzero_ps(), nonfinite = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xg + 8 * i);
      const __m256 av = _mm256_and_ps(v[i], absmask);
      a = _mm256_max_ps(a, av);
      nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(av, fmax, _CMP_NLE_UQ));  // Inf or NaN
    }
    if (_mm256_movemask_ps(nonfinite) != 0) {
      std::memset(q + g * kGroup, 0, kGroup);
      scale[g] = kNonFiniteScale;
      gsum[g] = 0;
      continue;
    }
    const float amax = y_hmax(a);
    const float s = amax / 127.0f;
    if (!(s > 0.0f)) {
      std::memset(q + g * kGroup, 0, kGroup);
      scale[g] = 0.0f;
      gsum[g] = 0;
      continue;
    }
    const __m256 inv = _mm256_set1_ps(127.0f / amax);
    __m256i iv[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // nearest even (default MXCSR)
      iv[i] = _mm256_max_epi32(_mm256_min_epi32(iv[i], lim), nlim);
    }
    // packs work per 128-bit lane: dword d of the result holds inputs of vector d%4, half d/4.
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    p = _mm256_permutevar8x32_epi32(p, order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * kGroup), p);
    scale[g] = s;
    gsum[g] = y_hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3])));
  }
}

// ---------------------------------------------------------------------------------------------
// Tiles: one row block (16 rows, two ymm halves) x TT <= 4 tokens of fp32 accumulators; out points
// at (token t0, block b's column). The integer formats share one scaffold per path, given the
// format as a small traits struct (ggml's naming habit: q4g32 = INT4_G32, q8g32 = INT8_G32).
// ---------------------------------------------------------------------------------------------
static HY_ALWAYS_INLINE void y_zero_tile(__m256 (*acc)[2], int tt) {
#pragma GCC unroll 4
  for (int t = 0; t < tt; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
}

static HY_ALWAYS_INLINE void y_store_tile(const __m256 (*acc)[2], int tt, float* out, int64_t ldo) {
#pragma GCC unroll 4
  for (int t = 0; t < tt; ++t) {
    _mm256_storeu_ps(out + t * ldo, acc[t][0]);
    _mm256_storeu_ps(out + t * ldo + 8, acc[t][1]);
  }
}

// ---------------------------------------------------------------------------------------------
// matmul_f32: weight (q - offset) * scale computed exactly as fmsub(q, s, offset * s), fp32 FMA,
// inputs of a group in increasing order. A group is kChunks chunks of 64 bytes (two halves of
// 32); input j of a chunk is (lane >> shift(j)) & kMask.
// ---------------------------------------------------------------------------------------------
struct f32_q4g32 {  // chunk c: inputs 8c..8c+7, the low nibbles of bytes 0-3, then their high nibbles
  static constexpr int kGroupBytes = 256, kChunks = 4, kPerChunk = 8, kMask = 0x0F;
  static constexpr float kOffset = 8.0f;
  static constexpr int shift(int j) { return j < 4 ? 8 * j : 8 * (j - 4) + 4; }
};
struct f32_q8g32 {  // chunk c: inputs 4c..4c+3, bytes 0-3 (u8 = q + 128)
  static constexpr int kGroupBytes = 512, kChunks = 8, kPerChunk = 4, kMask = 0xFF;
  static constexpr float kOffset = 128.0f;
  static constexpr int shift(int j) { return 8 * j; }
};

template <class Q, class Sc>
static HY_ALWAYS_INLINE void y_matmul_f32_tile16xTT(const PackedMatrix& w, int64_t b, const float* x, int64_t ldx,
                                                    int tt, float* out, int64_t ldo) {
  const int64_t ng = w.k / kGroup;
  const uint8_t* qw = w.qweight + b * ng * Q::kGroupBytes;
  const uint16_t* sc = w.scales + b * ng * kRowBlock;
  const __m256i mask = _mm256_set1_epi32(Q::kMask);
  __m256 acc[kTileTokens][2];
  y_zero_tile(acc, tt);
  for (int64_t g = 0; g < ng; ++g) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256 s = Sc::load(sc + g * kRowBlock + 8 * h);
      const __m256 soff = _mm256_mul_ps(s, _mm256_set1_ps(Q::kOffset));
      for (int c = 0; c < Q::kChunks; ++c) {
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + g * Q::kGroupBytes + c * 64 + 32 * h));
        const int64_t k0 = g * kGroup + Q::kPerChunk * c;
#pragma GCC unroll 8
        for (int j = 0; j < Q::kPerChunk; ++j) {
          const __m256i q = _mm256_and_si256(_mm256_srli_epi32(v, Q::shift(j)), mask);
          const __m256 wv = _mm256_fmsub_ps(_mm256_cvtepi32_ps(q), s, soff);
#pragma GCC unroll 4
          for (int t = 0; t < tt; ++t)
            acc[t][h] = _mm256_fmadd_ps(wv, _mm256_set1_ps(x[t * ldx + k0 + j]), acc[t][h]);
        }
      }
    }
  }
  y_store_tile(acc, tt, out, ldo);
}

static HY_ALWAYS_INLINE void y_matmul_f32_bf16_tile16xTT(const PackedMatrix& w, int64_t b, const float* x,
                                                         int64_t ldx, int tt, float* out, int64_t ldo) {
  const int64_t kp = w.k / 2;
  const uint8_t* qw = w.qweight + b * kp * 64;
  const __m256i hi = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  __m256 acc[kTileTokens][2];
  y_zero_tile(acc, tt);
  for (int64_t p = 0; p < kp; ++p) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + p * 64 + 32 * h));
      const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));  // W[row][2p]
      const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(v, hi));   // W[row][2p + 1]
#pragma GCC unroll 4
      for (int t = 0; t < tt; ++t) {
        acc[t][h] = _mm256_fmadd_ps(w0, _mm256_set1_ps(x[t * ldx + 2 * p]), acc[t][h]);
        acc[t][h] = _mm256_fmadd_ps(w1, _mm256_set1_ps(x[t * ldx + 2 * p + 1]), acc[t][h]);
      }
    }
  }
  y_store_tile(acc, tt, out, ldo);
}

// ---------------------------------------------------------------------------------------------
// The K types (kquant.h), simd_avx512.h's scheme on ymm halves: per tile, group g and half h (rows
// 8h..8h+7: bytes [32h, 32h + 32) of every 64-byte chunk), the 8 u8 operands (y_kq_operands) and
// the fp32 lanes D sc_j, Dm m_j of the group's sub-blocks; f32: W = fmsub(u, D sc_j, D sc_j off +
// Dm m_j), one FMA per input and token; a8: vpmaddubsw + vpmaddwd per operand (u <= 63; IQ4_XS's
// table value t as |t| x sign(a, t), so its off counts as 0), then (I_j - off A_j) (D sc_j xs) -
// Dm m_j xs A_j into the accumulators.
// ---------------------------------------------------------------------------------------------
template <WeightFormat F>
static HY_ALWAYS_INLINE void y_kq_operands(const uint8_t* tile, int g, int h, __m256i* wv) {
  constexpr KQ k = kq_of(F);
  if constexpr (k.grid) {  // the lattice types: codebook lookups (simd_iq.h)
    y_iq_operands<F>(tile, g, h, wv);
    return;
  }
  auto ld = [&](int at) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + at + 32 * h)); };
  if constexpr (k.nib) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256i v = ld(k.nib_at + g * 256 + c * 64);
      wv[2 * c] = _mm256_and_si256(v, m4);
      wv[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) wv[i] = _mm256_setzero_si256();
  }
  if constexpr (k.crumb) {
    const __m256i m3 = _mm256_set1_epi8(3);
#pragma GCC unroll 2
    for (int c = 0; c < 2; ++c) {
      const __m256i v = ld(k.crumb_at + g * 128 + c * 64);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        __m256i cr = _mm256_and_si256(s ? _mm256_srli_epi16(v, 2 * s) : v, m3);
        if constexpr (k.crumb_shift > 0) cr = _mm256_slli_epi16(cr, k.crumb_shift);
        wv[4 * c + s] = _mm256_or_si256(wv[4 * c + s], cr);
      }
    }
  }
  if constexpr (k.bit) {
    const __m256i v = ld(k.bit_at + g * 64);
    const __m256i m1 = _mm256_set1_epi8(1 << k.bit_shift);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {  // bit i of each byte to bit bit_shift
      const __m256i b = i > k.bit_shift ? _mm256_srli_epi16(v, i - k.bit_shift)
                        : i < k.bit_shift ? _mm256_slli_epi16(v, k.bit_shift - i) : v;
      wv[i] = _mm256_or_si256(wv[i], _mm256_and_si256(b, m1));
    }
  }
  if constexpr (k.table && k.nib) {  // nibble -> table value + 128 (u8)
    int8_t tb[16];
    for (int i = 0; i < 16; ++i) tb[i] = int8_t(kIq4Values[i] ^ 0x80);
    const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb)));
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) wv[i] = _mm256_shuffle_epi8(tab, wv[i]);
  }
}

// D sc_j (dsc) and Dm m_j (dmm) of sub-block j, rows 8h..8h+7; d, dm: those rows' D, Dm.
template <WeightFormat F>
static HY_ALWAYS_INLINE void y_kq_scales(const uint8_t* tile, int j, int h, __m256 d, __m256 dm, __m256& dsc,
                                         __m256& dmm) {
  constexpr KQ k = kq_of(F);
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(tile + k.sc_at + 16 * j + 8 * h));
  if constexpr (k.scale_nibbles) {
    const __m256i b = _mm256_cvtepu8_epi32(raw);
    dsc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))));
    dmm = _mm256_mul_ps(dm, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)));
  } else {
    dsc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
    if constexpr (k.min) {
      const __m128i mr = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(tile + k.m_at + 16 * j + 8 * h));
      dmm = _mm256_mul_ps(dm, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mr)));
    } else {
      dmm = _mm256_setzero_ps();
    }
  }
}

template <WeightFormat F>
static HY_ALWAYS_INLINE void y_kq_prefetch(const uint8_t* tile, int g) {
  constexpr int share = (kq_of(F).tile_bytes + 8 * 64 - 1) / (8 * 64) * 64;
  y_prefetch_bytes(tile + g * share, share);
}

// The walk over one 16-row block's groups for a K type, shared by its f32 and a8 tiles: per group
// G = 8 sb + g and ymm half h (rows 8h..8h+7), body(G, h, wv, dsc, dmm) with that half's 8
// operands (y_kq_operands) and its sub-blocks' scales and mins (y_kq_scales; [1]: the second
// 16-input half when k.sub == 16).
template <WeightFormat F, class Body>
static HY_ALWAYS_INLINE void y_kq_groups(const PackedMatrix& w, int64_t b, Body&& body) {
  constexpr KQ k = kq_of(F);
  const int64_t ns = w.k / kSuper;
  for (int64_t sb = 0; sb < ns; ++sb) {
    const uint8_t* tile = w.qweight + (b * ns + sb) * k.tile_bytes;
    for (int g = 0; g < 8; ++g) {
      y_kq_prefetch<F>(tile, g);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256 d = _mm256_mul_ps(y_scales_f16::load(reinterpret_cast<const uint16_t*>(tile + k.d_at) + 8 * h),
                                       _mm256_set1_ps(kq_dscale(k)));  // 2^-dshift (lattice types): exact
        const __m256 dm = k.min ? y_scales_f16::load(reinterpret_cast<const uint16_t*>(tile + k.dm_at) + 8 * h)
                                : _mm256_setzero_ps();
        __m256i wv[8];
        y_kq_operands<F>(tile, g, h, wv);
        __m256 dsc[2], dmm[2];
#pragma GCC unroll 2
        for (int j = 0; j < (k.sub == 16 ? 2 : 1); ++j) y_kq_scales<F>(tile, k.sub == 16 ? 2 * g + j : g, h, d, dm, dsc[j], dmm[j]);
        body(sb * 8 + g, h, wv, dsc, dmm);
      }
    }
  }
}

template <WeightFormat F>
static HY_ALWAYS_INLINE void y_kq_f32_tile16xTT(const PackedMatrix& w, int64_t b, const float* x, int64_t ldx, int tt,
                                                float* out, int64_t ldo) {
  constexpr KQ k = kq_of(F);
  const __m256i m8 = _mm256_set1_epi32(0xFF);
  __m256 acc[kTileTokens][2];
  y_zero_tile(acc, tt);
  y_kq_groups<F>(w, b, [&](int64_t G, int h, const __m256i* wv, const __m256* dsc, const __m256* dmm) HY_INLINE_LAMBDA {
    __m256 bias[2];
#pragma GCC unroll 2
    for (int j = 0; j < (k.sub == 16 ? 2 : 1); ++j)
      bias[j] = k.off ? _mm256_fmadd_ps(dsc[j], _mm256_set1_ps(float(k.off)), dmm[j]) : dmm[j];  // exact
    const int64_t k0 = G * kGroup;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int j = k.sub == 16 ? i / 4 : 0;
#pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) {
        const __m256i u = _mm256_and_si256(jj ? _mm256_srli_epi32(wv[i], 8 * jj) : wv[i], m8);
        const __m256 wf = _mm256_fmsub_ps(_mm256_cvtepi32_ps(u), dsc[j], bias[j]);
#pragma GCC unroll 4
        for (int t = 0; t < tt; ++t)
          acc[t][h] = _mm256_fmadd_ps(wf, _mm256_set1_ps(x[t * ldx + k0 + 4 * i + jj]), acc[t][h]);
      }
    }
  });
  y_store_tile(acc, tt, out, ldo);
}

// fn(std::integral_constant<WeightFormat, F>) for a K type f; nothing for other formats.
template <class Fn>
static HY_ALWAYS_INLINE void y_with_kq_format(WeightFormat f, Fn&& fn) {
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

// sum over one operand (4 inputs) of u q_a as int32 lanes: vpmaddubsw + vpmaddwd (see above).
template <bool kTable>
static HY_ALWAYS_INLINE __m256i y_kq_dot1(__m256i w, const int8_t* a) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i ab = y_bcast4(a);
  if constexpr (kTable) {
    const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8(int8_t(0x80)));  // the signed table value
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws), _mm256_sign_epi8(ab, ws)), ones);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, ab), ones);
  }
}


// The int32 sums over operands 0-3 (lo) and 4-7 (hi) of one token's group. Bit-plane types sum
// up to kq_s16_depth (kquant.h) operands in int16 before each vpmaddwd (exact: no lane can
// saturate); when the whole group fits one int16 sum (Q4_K) it is all in lo and hi is zero. The
// table types (IQ4_XS, the lattice types) keep one vpmaddwd per operand (|t| x sign: pairs up to
// 2 x 127 x 128).
template <WeightFormat F>
static HY_ALWAYS_INLINE void y_kq_dot(const __m256i* wv, const int8_t* a, __m256i& lo, __m256i& hi) {
  constexpr KQ k = kq_of(F);
  if constexpr (k.table) {
    lo = _mm256_add_epi32(_mm256_add_epi32(y_kq_dot1<true>(wv[0], a), y_kq_dot1<true>(wv[1], a + 4)),
                          _mm256_add_epi32(y_kq_dot1<true>(wv[2], a + 8), y_kq_dot1<true>(wv[3], a + 12)));
    hi = _mm256_add_epi32(_mm256_add_epi32(y_kq_dot1<true>(wv[4], a + 16), y_kq_dot1<true>(wv[5], a + 20)),
                          _mm256_add_epi32(y_kq_dot1<true>(wv[6], a + 24), y_kq_dot1<true>(wv[7], a + 28)));
  } else {
    constexpr int depth = kq_s16_depth(k);
    constexpr int span = (k.sub == 32 || depth < 4) ? depth : 4;  // a 16-input sub-block's sum stays apart
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s32[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 8
    for (int i0 = 0; i0 < 8; i0 += span) {
      __m256i s16 = _mm256_maddubs_epi16(wv[i0], y_bcast4(a + 4 * i0));
#pragma GCC unroll 8
      for (int i = i0 + 1; i < i0 + span; ++i) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv[i], y_bcast4(a + 4 * i)));
      s32[span == 8 ? 0 : i0 / 4] = _mm256_add_epi32(s32[span == 8 ? 0 : i0 / 4], _mm256_madd_epi16(s16, ones));
    }
    lo = s32[0];
    hi = s32[1];
  }
}

template <WeightFormat F>
static HY_ALWAYS_INLINE void y_kq_a8_tile16xTT(const PackedMatrix& w, int64_t b, const QuantizedActs& x, int64_t t0,
                                               int tt, float* out, int64_t ldo) {
  constexpr KQ k = kq_of(F);
  constexpr int off = k.table ? 0 : k.off;
  const int64_t ng = w.k / kGroup;
  __m256 acc[kTileTokens][2];
  y_zero_tile(acc, tt);
  y_kq_groups<F>(w, b, [&](int64_t G, int h, const __m256i* wv, const __m256* dsc, const __m256* dmm) HY_INLINE_LAMBDA {
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) {
      const int64_t row = t0 + t;
      const int8_t* a = x.q + row * x.ldq + G * kGroup;
      const float xs = x.scale[row * ng + G];
      const int32_t gs = x.gsum[row * ng + G];
      __m256i lo, hi;
      y_kq_dot<F>(wv, a, lo, hi);
      const __m256 xv = _mm256_set1_ps(xs);
      if constexpr (k.sub == 32) {
        __m256i v = _mm256_add_epi32(lo, hi);
        if constexpr (off != 0) v = _mm256_sub_epi32(v, _mm256_set1_epi32(off * gs));
        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(dsc[0], xv), acc[t][h]);
        if constexpr (k.min) acc[t][h] = _mm256_fnmadd_ps(dmm[0], _mm256_set1_ps(xs * float(gs)), acc[t][h]);
      } else {
        const int32_t a0 = x.hsum[row * ng + G], a1 = gs - a0;
        if constexpr (off != 0) {
          lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(off * a0));
          hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(off * a1));
        }
        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(dsc[0], xv), acc[t][h]);
        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(dsc[1], xv), acc[t][h]);
        if constexpr (k.min) {
          acc[t][h] = _mm256_fnmadd_ps(dmm[0], _mm256_set1_ps(xs * float(a0)), acc[t][h]);
          acc[t][h] = _mm256_fnmadd_ps(dmm[1], _mm256_set1_ps(xs * float(a1)), acc[t][h]);
        }
      }
    }
  });
  y_store_tile(acc, tt, out, ldo);
}

static void y_matmul_f32(const PackedMatrix& w, int64_t b0, int64_t b1, const float* x, int64_t t,
                         int64_t ldx, float* out, int64_t ldo) {
  for (int64_t b = b0; b < b1; ++b) {
    float* ob = out + (b - b0) * kRowBlock;
    for (int64_t t0 = 0; t0 < t; t0 += kTileTokens) {
      const float* xt = x + t0 * ldx;
      float* ot = ob + t0 * ldo;
      with_tile_width<kTileTokens>(int(t - t0), [&](auto tt) {
        if (w.format == WeightFormat::BF16) return y_matmul_f32_bf16_tile16xTT(w, b, xt, ldx, tt, ot, ldo);
        y_with_kq_format(w.format, [&](auto f) { y_kq_f32_tile16xTT<decltype(f)::value>(w, b, xt, ldx, tt, ot, ldo); });
        y_with_int_format(w.format, [&](auto nibbles, auto scales) {
          using Sc = decltype(scales);
          if constexpr (decltype(nibbles)::value) y_matmul_f32_tile16xTT<f32_q4g32, Sc>(w, b, xt, ldx, tt, ot, ldo);
          else y_matmul_f32_tile16xTT<f32_q8g32, Sc>(w, b, xt, ldx, tt, ot, ldo);
        });
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// matmul_a8: vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd (-> s32). Per group and half, a Dot
// gives the exact int32 sums sum_k q_w * q_a of its 8 rows for every token of the tile; the
// scaffold scales them by (weight scale x activation scale) into the fp32 accumulators.
// INT4: a nibble product is at most 15 x 128, so the s16 sum of a whole group (16 products per
// s16 lane: 4 chunks x lo/hi x 2) stays below 32767; one vpmaddwd per group and half, then the
// +8 offset is removed with gsum. INT8: u8 x s8 pairs could reach 64770 and saturate, so the
// weight is made signed (u8 ^ 0x80 = q) and |q| x sign(a, q) is used (pairs <= 2 x 127 x 128).
// p: the group's half (its bytes [32h, 32h + 32) of every chunk); a(t): token t's group inputs.
// ---------------------------------------------------------------------------------------------
struct a8_q4g32 {
  static constexpr int kGroupBytes = 256;
  static HY_ALWAYS_INLINE void dot(const uint8_t* p, const QuantizedActs& x, int64_t t0, int64_t g, int64_t ng,
                                   int tt, __m256i* s32) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s16[kTileTokens];
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) s16[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + c * 64));
      const __m256i lo = _mm256_and_si256(v, m4);                        // inputs 8c..8c+3
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);  // inputs 8c+4..8c+7
#pragma GCC unroll 4
      for (int t = 0; t < tt; ++t) {
        const int8_t* a = x.q + (t0 + t) * x.ldq + g * kGroup + 8 * c;
        s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(lo, y_bcast4(a)));
        s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(hi, y_bcast4(a + 4)));
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t)
      s32[t] = _mm256_sub_epi32(_mm256_madd_epi16(s16[t], ones), _mm256_set1_epi32(8 * x.gsum[(t0 + t) * ng + g]));
  }
};

struct a8_q8g32 {
  static constexpr int kGroupBytes = 512;
  static HY_ALWAYS_INLINE void dot(const uint8_t* p, const QuantizedActs& x, int64_t t0, int64_t g, int64_t,
                                   int tt, __m256i* s32) {
    const __m256i flip = _mm256_set1_epi8(int8_t(0x80));
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
    for (int t = 0; t < tt; ++t) s32[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + c * 64)), flip);  // q
      const __m256i wabs = _mm256_sign_epi8(ws, ws);
#pragma GCC unroll 4
      for (int t = 0; t < tt; ++t) {
        const __m256i a = _mm256_sign_epi8(y_bcast4(x.q + (t0 + t) * x.ldq + g * kGroup + 4 * c), ws);
        s32[t] = _mm256_add_epi32(s32[t], _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, a), ones));
      }
    }
  }
};

template <class Dot, class Sc>
static HY_ALWAYS_INLINE void y_matmul_a8_tile16xTT(const PackedMatrix& w, int64_t b, const QuantizedActs& x,
                                                   int64_t t0, int tt, float* out, int64_t ldo) {
  const int64_t ng = w.k / kGroup;
  const uint8_t* qw = w.qweight + b * ng * Dot::kGroupBytes;
  const uint16_t* sc = w.scales + b * ng * kRowBlock;
  __m256 acc[kTileTokens][2];
  y_zero_tile(acc, tt);
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* p = qw + g * Dot::kGroupBytes;
    y_prefetch_bytes(p, Dot::kGroupBytes);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256i s32[kTileTokens];
      Dot::dot(p + 32 * h, x, t0, g, ng, tt, s32);
      const __m256 sw = Sc::load(sc + g * kRowBlock + 8 * h);
#pragma GCC unroll 4
      for (int t = 0; t < tt; ++t) {
        const __m256 sc2 = _mm256_mul_ps(sw, _mm256_set1_ps(x.scale[(t0 + t) * ng + g]));
        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[t]), sc2, acc[t][h]);
      }
    }
  }
  y_store_tile(acc, tt, out, ldo);
}

static void y_matmul_a8(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                        float* out, int64_t ldo) {
  for (int64_t b = b0; b < b1; ++b) {
    float* ob = out + (b - b0) * kRowBlock;
    for (int64_t t0 = 0; t0 < x.t; t0 += kTileTokens) {
      float* ot = ob + t0 * ldo;
      with_tile_width<kTileTokens>(int(x.t - t0), [&](auto tt) {
        y_with_kq_format(w.format, [&](auto f) { y_kq_a8_tile16xTT<decltype(f)::value>(w, b, x, t0, tt, ot, ldo); });
        y_with_int_format(w.format, [&](auto nibbles, auto scales) {
          using Sc = decltype(scales);
          if constexpr (decltype(nibbles)::value) y_matmul_a8_tile16xTT<a8_q4g32, Sc>(w, b, x, t0, tt, ot, ldo);
          else y_matmul_a8_tile16xTT<a8_q8g32, Sc>(w, b, x, t0, tt, ot, ldo);
        });
      });
    }
  }
}

const KernelTable kTable = {
    "avx2",
    y_quantize_row_a8,
    y_matmul_a8,
    y_matmul_f32,
    nullptr,  // matmul_a16 needs avx512_bf16
    y_gemv_bf16,
    y_gemv_t_bf16,
    y_gemv_i8,
};

}  // namespace

const KernelTable* kernels_avx2() { return &kTable; }

}  // namespace hybrid
