// kernels_avx512_bf16.cpp: AVX-512 BF16 kernels (see kernels.h): matmul_a16 for BF16 weights
// with vdpbf16ps (fp32 += bf16 x bf16 pairs). The activations are rounded to bf16 (nearest even,
// vcvtne2ps2bf16) once per token tile and K chunk into a stack buffer, then every row block of
// the call reuses them; the packed BF16 layout ([16 lanes][2 inputs] per 64 bytes) is the
// vdpbf16ps operand as it is. gemv_bf16 (unpacked bf16 weights and activations) with vdpbf16ps
// too, on the tile code of simd_avx512_gemv.h. matmul_a8 is the VNNI kernel (simd_vnni.h) compiled
// again here with VBMI, which this level also requires (dispatch.cpp): the lattice types' operands
// are built by byte permutes instead of codebook gathers (simd_iq.h). Other entries are left null:
// dispatch.cpp fills them from the avx512 table. Compiled with the avx512 flags + -mavx512vnni
// -mavx512bf16 -mavx512vbmi only.
//
// Legend: RB = 16 rows per block, P = K / 2 input pairs, TT tokens per tile, PC pairs per chunk.
#include "core/simd_avx512.h"
#include "core/simd_avx512_gemv.h"
#include "core/simd_vnni.h"

namespace hybrid {
namespace {

constexpr int kTileTokens = 8;    // TT: 8 fp32 accumulators + operands fit 32 zmm with room
constexpr int64_t kChunkPairs = 256;  // PC: 512 inputs x 8 tokens of bf16 = 8 KiB on the stack

// out[t][16b..16b+15] (+)= W[block b][pairs p0..p0+pc) . xb[t][pairs], for blocks [b0, b1).
static HY_ALWAYS_INLINE void b_a16_tile(const PackedMatrix& w, int64_t b0, int64_t b1,
                                        const uint32_t (*xb)[kChunkPairs], int64_t p0, int64_t pc,
                                        bool first, int tt, float* out, int64_t ldo) {
  const int64_t kp = w.k / 2;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* qw = w.qweight + (b * kp + p0) * 64;
    float* ob = out + (b - b0) * kRowBlock;
    __m512 acc[kTileTokens];
#pragma GCC unroll 8
    for (int t = 0; t < tt; ++t) acc[t] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(ob + t * ldo);
    for (int64_t p = 0; p < pc; ++p) {
      z_prefetch_bytes(qw + p * 64, 64);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(qw + p * 64);
#pragma GCC unroll 8
      for (int t = 0; t < tt; ++t)
        acc[t] = _mm512_dpbf16_ps(acc[t], wv, (__m512bh)_mm512_set1_epi32(int32_t(xb[t][p])));
    }
#pragma GCC unroll 8
    for (int t = 0; t < tt; ++t) _mm512_storeu_ps(ob + t * ldo, acc[t]);
  }
}

static void b_matmul_a16(const PackedMatrix& w, int64_t b0, int64_t b1, const float* x, int64_t t,
                         int64_t ldx, float* out, int64_t ldo) {
  const int64_t kp = w.k / 2;
  alignas(64) uint32_t xb[kTileTokens][kChunkPairs];  // bf16 pairs (x[2p] low, x[2p + 1] high)
  for (int64_t t0 = 0; t0 < t; t0 += kTileTokens) {
    const int tt = int(t - t0 < kTileTokens ? t - t0 : kTileTokens);
    for (int64_t p0 = 0; p0 < kp; p0 += kChunkPairs) {
      const int64_t pc = kp - p0 < kChunkPairs ? kp - p0 : kChunkPairs;  // multiple of 16
      for (int i = 0; i < tt; ++i) {
        const float* xr = x + (t0 + i) * ldx + 2 * p0;
        for (int64_t p = 0; p < pc; p += 16) {  // 32 floats -> 32 bf16 in input order
          __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + 2 * p + 16), _mm512_loadu_ps(xr + 2 * p));
          _mm512_store_si512(&xb[i][p], (__m512i)h);
        }
      }
      float* ot = out + t0 * ldo;
      const bool first = p0 == 0;
      switch (tt) {
        case 1: b_a16_tile(w, b0, b1, xb, p0, pc, first, 1, ot, ldo); break;
        case 2: b_a16_tile(w, b0, b1, xb, p0, pc, first, 2, ot, ldo); break;
        case 3: b_a16_tile(w, b0, b1, xb, p0, pc, first, 3, ot, ldo); break;
        case 4: b_a16_tile(w, b0, b1, xb, p0, pc, first, 4, ot, ldo); break;
        case 5: b_a16_tile(w, b0, b1, xb, p0, pc, first, 5, ot, ldo); break;
        case 6: b_a16_tile(w, b0, b1, xb, p0, pc, first, 6, ot, ldo); break;
        case 7: b_a16_tile(w, b0, b1, xb, p0, pc, first, 7, ot, ldo); break;
        default: b_a16_tile(w, b0, b1, xb, p0, pc, first, 8, ot, ldo); break;
      }
    }
  }
}

// gemv_bf16: the tile code of simd_avx512_gemv.h with vdpbf16ps steps (W rows and x are bf16 pairs
// already, loaded as they are).
static void b_gemv_bf16(const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k, const uint16_t* x,
                        int64_t t, int64_t ldx, float* out, int64_t ldo) {
  z_gemv_bf16_body(w, ldw, n0, n1, k, x, t, ldx, out, ldo, true);
}

const KernelTable kTable = {
    "avx512_bf16",
    nullptr,  // quantize_row_a8: avx512's
    v_matmul_a8,  // simd_vnni.h's, with VBMI
    nullptr,  // matmul_f32: avx512's
    b_matmul_a16,
    b_gemv_bf16,
};

}  // namespace

const KernelTable* kernels_avx512_bf16() { return &kTable; }

}  // namespace hybrid
