// kernels.h: the contract between the MoE operator (moe.cpp), the dense GEMV driver (dense.cpp)
// and the per-ISA matmul kernels.
//
// Every ISA variant lives in its own translation unit (kernels_scalar.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp, kernels_avx512_vnni.cpp, kernels_avx512_bf16.cpp, kernels_amx.cpp), compiled
// with that ISA's target flags and nothing else, and exports one `const KernelTable*` getter.
// dispatch.cpp picks the table at load time from cpuid + OS support (never a host-specific -march flag).
//
// Legend: N output rows of a weight matrix, K inputs (reduction), T tokens (activation rows),
// RB = 16 rows per packed block, G = 32 inputs per quantization group.
#pragma once
#include <cstddef>
#include <cstdint>
#include <limits>

namespace hybrid {

constexpr int kRowBlock = 16;  // RB: output rows per packed block (one zmm of fp32/int32 lanes)
constexpr int kGroup = 32;     // G: inputs per quantization group (Kimi K2.5 ships group 32)
// The activation scale of a group holding NaN or Inf (quantize_row_a8): NaN, which every kernel
// multiplies into the outputs the group feeds.
constexpr float kNonFiniteScale = std::numeric_limits<float>::quiet_NaN();

// INT4_G32 / INT8_G32 / BF16: hybrid's own formats (Kimi's shipped INT4 and what we quantise to).
// Q4_0 / Q8_0: GGUF's block types of the same names kept in their own bits (pack_gguf, pack.h): the
// operand layouts of INT4_G32 / INT8_G32 with GGUF's fp16 block scales in place of bf16 ones.
// Q4_K .. IQ4_XS and the lattice types IQ2_XXS .. IQ1_M: GGUF's super-block types, in tiles of 16
// rows x 256 inputs (kquant.h).
enum class WeightFormat : int {
  INT4_G32 = 0, INT8_G32 = 1, BF16 = 2, Q4_0 = 3, Q8_0 = 4,
  Q4_K = 5, Q5_K = 6, Q6_K = 7, Q3_K = 8, Q2_K = 9, IQ4_XS = 10,
  IQ2_XXS = 11, IQ2_XS = 12, IQ3_XXS = 13, IQ1_S = 14, IQ1_M = 15,  // lattice types (kquant.h)
};
constexpr int kNumWeightFormats = 16;

// Bytes of one packed tile (16 rows x 256 inputs) of a K type, 0 for the other formats; kquant.h
// derives the same numbers from its layout and checks them (static_assert).
static inline constexpr int ktile_bytes(WeightFormat f) {
  switch (f) {
    case WeightFormat::Q4_K: return 2368;
    case WeightFormat::Q5_K: return 2880;
    case WeightFormat::Q6_K: return 3360;
    case WeightFormat::Q3_K: return 1824;
    case WeightFormat::Q2_K: return 1344;
    case WeightFormat::IQ4_XS: return 2208;
    case WeightFormat::IQ2_XXS: return 1184;
    case WeightFormat::IQ2_XS: return 1312;
    case WeightFormat::IQ3_XXS: return 1696;
    case WeightFormat::IQ1_S: return 928;
    case WeightFormat::IQ1_M: return 1056;
    default: return 0;
  }
}
// Inputs a matrix's K must be a multiple of: 256 for the K types, else 32.
static inline int64_t k_multiple(WeightFormat f) { return ktile_bytes(f) ? 256 : 32; }

// The weight operand of a group-32 integer format: 4-bit nibbles (INT4_G32 layout) or bytes
// (INT8_G32 layout); and the dtype of its per-(row, group) scales.
static inline bool nibble_layout(WeightFormat f) { return f == WeightFormat::INT4_G32 || f == WeightFormat::Q4_0; }
static inline bool f16_scales(WeightFormat f) { return f == WeightFormat::Q4_0 || f == WeightFormat::Q8_0; }

// ---------------------------------------------------------------------------------------------
// Packed layouts. A matrix W [N, K] needs N % 16 == 0 and K % 32 == 0 (K2.5: N, K in {7168,
// 2048, 4096}). Data is ordered block-major so a kernel working on row blocks [b0, b1) reads one
// contiguous byte range: that is what lets the decode path stream at full bandwidth and lets the
// thread pool hand each thread (and each NUMA node) a contiguous slice.
//
// INT4_G32 (symmetric, q in [-8, 7], stored as the unsigned nibble q + 8 exactly as
// compressed-tensors pack-quantized stores it, so packing never dequantises):
//   qweight: [N/16][K/32][4 chunks][16 lanes][4 bytes]          256 bytes per (block, group)
//     chunk c of group g covers inputs k0 = 32*g + 8*c ... k0 + 7; in lane r (row 16*b + r),
//     byte j (0..3): low nibble = q[row][k0 + j] + 8, high nibble = q[row][k0 + 4 + j] + 8.
//     So `qbytes & 0x0F` is a [16 lanes x 4 inputs] u8 operand for vpdpbusd against the
//     broadcast activations k0..k0+3, and `(qbytes >> 4) & 0x0F` the one for k0+4..k0+7.
//   scales:  [N/16][K/32][16] bf16 (as uint16_t)                32 bytes per (block, group)
//   W[row][k] = (nibble - 8) * bf16_to_f32(scale[row][k / 32])
//
// INT8_G32 (symmetric, q in [-127, 127], stored as u8 = q + 128):
//   qweight: [N/16][K/32][8 chunks][16 lanes][4 bytes]          512 bytes per (block, group)
//     chunk c covers inputs k0 = 32*g + 4*c ... k0 + 3; byte j of lane r = q[row][k0 + j] + 128
//   scales:  [N/16][K/32][16] bf16, as INT4_G32.
//
// Q4_0 (GGUF): qweight exactly as INT4_G32 (GGUF stores the nibble q + 8 too), scales
//   [N/16][K/32][16] fp16 (IEEE half bits, GGUF's block scale d as stored):
//   W[row][k] = (nibble - 8) * f16_to_f32(d[row][k / 32]).
// Q8_0 (GGUF): qweight as INT8_G32 (u8 = q + 128, q in [-128, 127]: GGUF's int8 as stored, so
//   -128 is legal), scales fp16 as Q4_0: W[row][k] = q * f16_to_f32(d[row][k / 32]).
//
// BF16:
//   qweight: [N/16][K/2][16 lanes][2] bf16: lane r holds W[row][2k], W[row][2k + 1]
//            (the operand order of vdpbf16ps); scales: none (nullptr).
// ---------------------------------------------------------------------------------------------

// Bytes of the packed qweight / scales arrays for one [N, K] matrix.
static inline size_t packed_qweight_bytes(WeightFormat f, int64_t n, int64_t k) {
  switch (f) {
    case WeightFormat::INT4_G32:
    case WeightFormat::Q4_0: return size_t(n) * size_t(k) / 2;
    case WeightFormat::INT8_G32:
    case WeightFormat::Q8_0: return size_t(n) * size_t(k);
    case WeightFormat::BF16: return size_t(n) * size_t(k) * 2;
    default: return size_t(n / kRowBlock) * size_t(k / 256) * size_t(ktile_bytes(f));  // K types
  }
}
static inline size_t packed_scale_bytes(WeightFormat f, int64_t n, int64_t k) {  // K types: in the tiles
  return (f == WeightFormat::BF16 || ktile_bytes(f)) ? 0 : size_t(n) * size_t(k / kGroup) * 2;
}

// One packed matrix as the kernels see it: plain pointers, no ownership.
struct PackedMatrix {
  WeightFormat format;
  int64_t n;                // N rows (outputs), multiple of 16
  int64_t k;                // K inputs, multiple of 32 (k_multiple: 256 for the K types)
  const uint8_t* qweight;   // layout above (K types: the tiles of kquant.h)
  const uint16_t* scales;   // bf16 (fp16 for Q4_0 / Q8_0) bits, [N/16][K/32][16]; nullptr for BF16
                            // and the K types
};

// Activations quantised for the int8 paths: per token, per group of 32 inputs,
// symmetric int8 with one fp32 scale: x[t][k] ~= q[t][k] * scale[t][k / 32].
// gsum[t][g] = sum of the 32 q values of group g (the kernels use it to remove the +8 / +128
// offset of the unsigned weight operand: sum (q_w + 8) * q_a = sum q_w * q_a + 8 * gsum).
struct QuantizedActs {
  const int8_t* q;       // [T][K], row stride ldq (elements)
  const float* scale;    // [T][K/32], row stride K/32
  const int32_t* gsum;   // [T][K/32], row stride K/32
  int64_t t;             // T
  int64_t k;             // K
  int64_t ldq;           // >= K
  // [T][K/32]: the sum of q over inputs 0..15 of each group (half_sums below), which the K types
  // with 16-input sub-blocks (Q6_K, Q3_K, Q2_K) need; may be nullptr for the other formats.
  const int32_t* hsum = nullptr;
};

// hsum[g] = sum of q[32g .. 32g + 15] for the k / 32 groups of one quantised row.
static inline void half_sums(const int8_t* q, int64_t k, int32_t* hsum) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) s += q[g * kGroup + i];
    hsum[g] = s;
  }
}

// What every ISA provides. A kernel may leave an entry null when the ISA brings nothing over a
// lower one; dispatch.cpp then fills it from the next lower table (amx -> avx512_bf16 ->
// avx512_vnni -> avx512 -> avx2 -> scalar), so every entry of the chosen table is callable,
// except matmul_a16 which stays null below avx512_bf16.
// Two activation modes, chosen per operator: "fast" (int8 activations for INT4/INT8 weights,
// bf16 activations for BF16 weights where the ISA has it) and "precise" (fp32 activations).
struct KernelTable {
  const char* name;  // "scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"

  // x [K] fp32 -> q [K] int8, scale [K/32], gsum [K/32]. Round to nearest, scale = amax / 127
  // (scale 0 -> all-zero group). A group holding NaN or Inf gets q 0, gsum 0 and scale
  // kNonFiniteScale (NaN), so every output the group feeds comes out NaN, as the fp32 and bf16
  // paths give, never a plausible number (clamping NaN/Inf to +-127 did that).
  void (*quantize_row_a8)(const float* x, int64_t k, int8_t* q, float* scale, int32_t* gsum);

  // out[t * ldo + (16*b - 16*b0) + r] = sum_k W[16*b + r][k] * x[t][k]
  //   for blocks b in [b0, b1), r in [0, 16), t in [0, T).  (out points at block b0's column.)
  // Integer-activation path (quantised x); INT4_G32 and INT8_G32 weights.
  void (*matmul_a8)(const PackedMatrix& w, int64_t b0, int64_t b1, const QuantizedActs& x,
                    float* out, int64_t ldo);
  // Float-activation path: x fp32 [T][K] with row stride ldx; all three formats. This is the
  // reference-quality path (activations and accumulation stay fp32).
  void (*matmul_f32)(const PackedMatrix& w, int64_t b0, int64_t b1, const float* x, int64_t t,
                     int64_t ldx, float* out, int64_t ldo);
  // Bf16-activation path for BF16 weights (vdpbf16ps): x fp32 [T][K] is rounded to bf16 inside
  // the kernel, accumulation stays fp32. Null below avx512_bf16 (the operator then uses
  // matmul_f32 for BF16 weights in the fast mode too).
  void (*matmul_a16)(const PackedMatrix& w, int64_t b0, int64_t b1, const float* x, int64_t t,
                     int64_t ldx, float* out, int64_t ldo);

  // Dense bf16 GEMV / small GEMM on an UNPACKED row-major weight (the device Linear on CPU at
  // decode: attention projections, router, dense MLP, shared expert, LM head; driver dense.h):
  //   out[tt * ldo + (n - n0)] = sum_{i < k} W[n][i] * X[tt][i]   for n in [n0, n1), tt in [0, t)
  // W: bf16 bits [N][K], row n at w + n * ldw (a torch weight as it is: no packing, no copy);
  // X: bf16 bits [T][K], row tt at x + tt * ldx; out points at column n0. Any k >= 1, any row
  // range, any t >= 1. A bf16 x bf16 product is exact in fp32 (8 + 8 significant bits), so
  // implementations differ from the scalar reference only in fp32 summation order (and the
  // avx512_bf16 one flushes subnormal inputs and outputs to zero: vdpbf16ps does).
  // Declared last with a default so tables that leave it out (vnni, amx) need not name it;
  // dispatch fills it from below, down to scalar.
  void (*gemv_bf16)(const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k,
                    const uint16_t* x, int64_t t, int64_t ldx, float* out, int64_t ldo) = nullptr;

  // Transposed bf16 GEMV in axpy form, for weights and caches stored [K][N] (MLA decode:
  // q_nope . W_uk, where W_uk is a [D][C] slice of a torch weight; softmax probabilities . latent
  // cache rows, where K = cache length is huge and N = latent width small):
  //   out[tt * ldo + (j - n0)] = s + sum_{i < k} x[tt * ldx + i] * W[i][j]   for j in [n0, n1), tt in [0, t)
  //   with s = out[tt * ldo + (j - n0)] when accumulate, else 0 (out is then never read: it may
  //   hold garbage, NaN included).
  // W: bf16 bits [K][N], row i at w + i * ldw (column j of row i at w + i * ldw + j; w is the
  // matrix's base, not column n0's; only W[i][n0, n1) is read); x: fp32 [T][K], row tt at
  // x + tt * ldx; out: fp32 [T][n1 - n0], row stride ldo, pointing at column n0. Any k >= 1, any
  // column range 0 <= n0 < n1 (no multiple of 16 needed), any t >= 1; out must not overlap w or x.
  // Each column's sum runs over i in increasing order, starting from s: the scalar reference
  // rounds x * w and then the sum, the SIMD paths do one FMA per step, so they differ only by that
  // product rounding (both are within about (k + 1) * 2^-24 * (|s| + sum_i |x_i W[i][j]|) of the
  // exact value). A NaN in token tt reaches only row tt of out.
  // Declared after gemv_bf16 with a default for the same reason. Scalar, avx2 and avx512 provide
  // it; the tables above avx512 take avx512's (vdpbf16ps would round the fp32 x to bf16).
  void (*gemv_t_bf16)(const uint16_t* w, int64_t ldw, int64_t k, int64_t n0, int64_t n1, const float* x,
                      int64_t t, int64_t ldx, float* out, int64_t ldo, bool accumulate) = nullptr;

  // Dense int8 GEMV on an UNPACKED row-major int8 weight (a device Linear held in int8 on the CPU,
  // device_weights="int8"; driver dense.h, which applies the per-row scale):
  //   out[tt * ldo + (n - n0)] = sum_{i < k} W[n][i] * X[tt][i]   for n in [n0, n1), tt in [0, t)
  // W: int8 [N][K], row n at w + n * ldw; X: bf16 bits [T][K] as gemv_bf16's. An int8 x bf16
  // product is exact in fp32 (7 + 8 significant bits), so implementations differ from the scalar
  // reference only in fp32 summation order. Any k >= 1, any row range, any t >= 1.
  // Declared last with a default for the same reason as gemv_bf16. Scalar, avx2 and avx512
  // provide it; the tables above avx512 take avx512's.
  void (*gemv_i8)(const int8_t* w, int64_t ldw, int64_t n0, int64_t n1, int64_t k, const uint16_t* x,
                  int64_t t, int64_t ldx, float* out, int64_t ldo) = nullptr;
};

// Getters, one per translation unit. Each returns nullptr when this build did not compile that
// ISA (e.g. an old compiler); the CPU check is dispatch.cpp's job, not theirs.
const KernelTable* kernels_scalar();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx512_vnni();
const KernelTable* kernels_avx512_bf16();
const KernelTable* kernels_amx();

// bf16 <-> fp32 helpers shared by the scalar code and packers. `static` on purpose: this header
// is compiled into TUs with different ISA flags, and an `inline` (COMDAT) copy built with
// AVX-512 could be the one the linker keeps for the scalar path.
static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
// IEEE half -> fp32, exact (subnormals, Inf and NaN included), for the scalar code and packers;
// the SIMD paths use vcvtph2ps (F16C / AVX-512), which gives the same bits.
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (man << 13);  // Inf / NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: man * 2^-24, exact in fp32
    float f = float(man) * 5.9604644775390625e-8f;
    __builtin_memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
// The fp32 value of a stored scale of format f (bf16 or fp16 bits).
static inline float scale_to_f32(WeightFormat f, uint16_t bits) {
  return f16_scales(f) ? f16_to_f32(bits) : bf16_to_f32(bits);
}
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

}  // namespace hybrid
