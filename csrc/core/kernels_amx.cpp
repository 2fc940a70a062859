// kernels_amx.cpp: AMX-INT8 matmul_a8 (see kernels.h), the prefill GEMM for INT4/INT8 weights.
// Compiled with the avx512 + vnni + bf16 flags and -mamx-tile -mamx-int8 -mamx-bf16 only.
// The OS permission for tile data (arch_prctl ARCH_REQ_XCOMP_PERM) is requested by dispatch.cpp
// before this table is chosen.
//
// Shapes per tile instruction (one quantization group at a time, because every group has its own
// weight and activation scale and the int32 sums must be scaled before they are added):
//   A  = activations       [M <= 16 tokens][32 inputs]   s8, straight from QuantizedActs.q
//   B  = weights, one group [8 rows][16 lanes x 4 inputs] (the packed chunk layout *is* the
//        AMX "VNNI" B layout: row kk holds inputs 4kk..4kk+3 of all 16 output rows)
//   C  = [M tokens][16 rows] int32
// INT4: the 4 chunks of a group are split into low/high nibbles minus 8 (s8) in a small buffer,
//       B row order lo0, hi0, lo1, hi1, ... (inputs 0-3, 4-7, 8-11, ...), then TDPBSSD.
// INT8: B is loaded straight from the packed bytes (u8 = q + 128) and TDPBSUD is used; the
//       offset comes out with -128 * gsum while C is scaled.
// Then per token row: fp32 acc[row] += float(C[row]) * (weight scales x activation scale).
// That per-group round trip of C through memory is the price of group-32 scales: a TDP can only
// cover one group (K = 32, half of a full tile's K = 64). Below kAmxMinTokensInt4 / Int8 tokens
// the VNNI path (simd_vnni.h) is used: the round trip then costs more than it saves.
//
// Legend: M tokens in a tile (<= 16), RB = 16 rows per block, G = 32, NG = K / 32.
#include "core/simd_vnni.h"

namespace hybrid {
namespace {

// Token counts from which the AMX path beats VNNI (measured, one Xeon core, K = 7168, Gop/s
// VNNI / AMX): INT4 T = 4: 260 / 175, 6: 285 / 275, 7: 305 / 310, 8: 307 / 340, 11: 290 / 410,
// 16: 300 / 495. INT8 (B tiles read straight from the weights) only draws level at 16 tokens:
// T = 8: 326 / 271, 11: 266 / 306, 16: 325 / 308.
constexpr int64_t kAmxMinTokensInt4 = 8;
constexpr int64_t kAmxMinTokensInt8 = 16;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static void amx_configure(int m) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 2; ++i) {  // tmm0, tmm1: A (activations of group g, g + 1)
    cfg.rows[i] = uint8_t(m);
    cfg.colsb[i] = 32;
  }
  for (int i = 2; i < 4; ++i) {  // tmm2, tmm3: B (weights of group g, g + 1)
    cfg.rows[i] = 8;
    cfg.colsb[i] = 64;
  }
  for (int i = 4; i < 6; ++i) {  // tmm4, tmm5: C (int32 sums of group g, g + 1)
    cfg.rows[i] = uint8_t(m);
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

// INT4 group -> B tile buffer of 8 x 64 signed bytes (nibble - 8), rows in operand order
// (z_q4g32_operands: inputs 0-3, 4-7, 8-11, ...).
static HY_ALWAYS_INLINE void amx_unpack_i4(const uint8_t* p, int8_t* dst, int64_t block_bytes) {
  z_prefetch_bytes(p, 256);
  z_prefetch_next_block(p, 256, block_bytes);
  const __m512i eight = _mm512_set1_epi8(8);
  __m512i wv[8];
  z_q4g32_operands(p, wv);
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) _mm512_store_si512(dst + i * 64, _mm512_sub_epi8(wv[i], eight));
}

// acc[r] += float(C[r] - offset * gsum[r][g]) * sw * sa[r][g] for the m live token rows.
static HY_ALWAYS_INLINE void amx_scale_rows(const int32_t* cbuf, __m512* acc, int m, __m512 sw,
                                            const QuantizedActs& x, int64_t t0, int64_t g,
                                            int64_t ng, int offset) {
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    if (r < m) {
      const int64_t row = t0 + r;
      __m512i c = _mm512_load_si512(cbuf + 16 * r);
      if (offset) c = _mm512_sub_epi32(c, _mm512_set1_epi32(offset * x.gsum[row * ng + g]));
      const __m512 cs = _mm512_mul_ps(_mm512_cvtepi32_ps(c), sw);
      acc[r] = _mm512_fmadd_ps(cs, _mm512_set1_ps(x.scale[row * ng + g]), acc[r]);
    }
  }
}

// Groups per pass. A pass runs three sweeps over kPassGroups groups of one row block, so no
// instruction waits on a just-written buffer: (1) INT4 only: unpack the B tiles to bbuf;
// (2) tiles: load A and B, TDP, store C to cbuf; (3) vector: scale the int32 sums into the fp32
// accumulators. Done per group instead, each group's TDP waited for its B stores and each
// scaling for its tile store, and AMX ran no faster than vpdpbusd. Measured on a Xeon with AMX
// (bench/kernels.py, T = 16): 2 groups 400 Gop/s, 4: 470, 8: 515, 12: 495, 16: 450, 32: 300
// (bbuf + cbuf outgrow L1 from 32 on). 8 groups: bbuf 4 KiB + cbuf 8 KiB.
constexpr int kPassGroups = 8;

// Tokens [t0, t0 + m) x blocks [b0, b1); tiles already configured for m rows.
static HY_ALWAYS_INLINE void amx_tokens_body(const PackedMatrix& w, int64_t b0, int64_t b1,
                                            const QuantizedActs& x, int64_t t0, int m, float* out,
                                            int64_t ldo) {
  const int64_t ng = w.k / kGroup;
  const bool int4 = w.format == WeightFormat::INT4_G32;
  const int64_t gbytes = int4 ? 256 : 512;
  const int offset = int4 ? 0 : 128;
  alignas(64) int8_t bbuf[kPassGroups][8 * 64];
  alignas(64) int32_t cbuf[kPassGroups][16 * 16];
  const int8_t* a = x.q + t0 * x.ldq;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* qw = w.qweight + b * ng * gbytes;
    const uint16_t* sc = w.scales + b * ng * kRowBlock;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < ng; g0 += kPassGroups) {
      const int np = int(ng - g0 < kPassGroups ? ng - g0 : kPassGroups);
      // (1) B tiles: INT4 unpacked to s8; INT8 read in place (u8, TDPBSUD), only prefetched.
      if (int4)
        for (int i = 0; i < np; ++i) amx_unpack_i4(qw + (g0 + i) * 256, bbuf[i], ng * 256);
      else
        for (int i = 0; i < np; ++i) {
          z_prefetch_bytes(qw + (g0 + i) * 512, 512);
          z_prefetch_next_block(qw + (g0 + i) * 512, 512, ng * 512);
        }
      // (2) tiles, two groups in flight on tile sets (0, 2, 4) and (1, 3, 5).
      int i = 0;
      for (; i + 2 <= np; i += 2) {
        const int64_t g = g0 + i;
        _tile_loadd(0, a + g * kGroup, x.ldq);
        _tile_loadd(1, a + (g + 1) * kGroup, x.ldq);
        _tile_zero(4);
        _tile_zero(5);
        if (int4) {
          _tile_loadd(2, bbuf[i], 64);
          _tile_loadd(3, bbuf[i + 1], 64);
          _tile_dpbssd(4, 0, 2);
          _tile_dpbssd(5, 1, 3);
        } else {
          _tile_loadd(2, qw + g * 512, 64);
          _tile_loadd(3, qw + (g + 1) * 512, 64);
          _tile_dpbsud(4, 0, 2);
          _tile_dpbsud(5, 1, 3);
        }
        _tile_stored(4, cbuf[i], 64);
        _tile_stored(5, cbuf[i + 1], 64);
      }
      if (i < np) {
        const int64_t g = g0 + i;
        _tile_loadd(0, a + g * kGroup, x.ldq);
        _tile_zero(4);
        if (int4) {
          _tile_loadd(2, bbuf[i], 64);
          _tile_dpbssd(4, 0, 2);
        } else {
          _tile_loadd(2, qw + g * 512, 64);
          _tile_dpbsud(4, 0, 2);
        }
        _tile_stored(4, cbuf[i], 64);
      }
      // (3) scaling
      for (int j = 0; j < np; ++j)
        amx_scale_rows(cbuf[j], acc, m, z_load_bf16x16(sc + (g0 + j) * kRowBlock), x, t0, g0 + j, ng,
                       offset);
    }
    float* ob = out + (b - b0) * kRowBlock + t0 * ldo;
    for (int r = 0; r < m; ++r) _mm512_storeu_ps(ob + r * ldo, acc[r]);
  }
}

// Full 16-row tiles get a copy with m folded to a constant (no per-row checks: +7% at T = 16).
static void amx_tokens(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                       int64_t t0, int m, float* out, int64_t ldo) {
  if (m == 16)
    amx_tokens_body(w, b0, b1, x, t0, 16, out, ldo);
  else
    amx_tokens_body(w, b0, b1, x, t0, m, out, ldo);
}

static void amx_matmul_a8(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                          float* out, int64_t ldo) {
  // The GGUF formats (fp16 scales) take the VNNI path: amx_scale_rows reads bf16 scales, and no
  // machine with AMX has been at hand to measure (or test) an fp16 twin.
  if (w.format != WeightFormat::INT4_G32 && w.format != WeightFormat::INT8_G32) {
    v_matmul_a8(w, b0, b1, x, out, ldo);
    return;
  }
  const int64_t min_tokens =
      w.format == WeightFormat::INT4_G32 ? kAmxMinTokensInt4 : kAmxMinTokensInt8;
  if (x.t < min_tokens) {
    v_matmul_a8(w, b0, b1, x, out, ldo);
    return;
  }
  int configured = 0;
  for (int64_t t0 = 0; t0 < x.t; t0 += 16) {
    const int m = int(x.t - t0 < 16 ? x.t - t0 : 16);
    if (m < min_tokens) {  // a short last tile: VNNI is as fast and needs no reconfigure
      v_matmul_a8_range(w, b0, b1, x, t0, x.t, out, ldo);
      break;
    }
    if (m != configured) {
      amx_configure(m);
      configured = m;
    }
    amx_tokens(w, b0, b1, x, t0, m, out, ldo);
  }
  if (configured) _tile_release();
}

const KernelTable kTable = {
    "amx",
    nullptr,  // quantize_row_a8: avx512's
    amx_matmul_a8,
    nullptr,  // matmul_f32: avx512's
    nullptr,  // matmul_a16: avx512_bf16's
};

}  // namespace

const KernelTable* kernels_amx() { return &kTable; }

}  // namespace hybrid
