// pack.h: one-time conversion of weights into the packed layouts of kernels.h, and back.
//
// Every function works on the row blocks [b0, b1) of one [N, K] matrix so callers can spread a
// matrix over the thread pool (and so over NUMA nodes: the thread that writes a block first
// decides where its pages live). Destination block i goes to block slot i * block_mult +
// block_off of the destination arrays: that is how gate and up interleave into one gate_up
// matrix (gate block j -> slot 2j, up block j -> slot 2j + 1).
#pragma once
#include <cstdint>

#include "core/kernels.h"

namespace hybrid {

enum class SrcDtype : int { F32 = 0, BF16 = 1 };

struct PackDest {
  uint8_t* qweight;        // start of the destination matrix's packed qweight
  uint16_t* scales;        // its scales (nullptr for BF16)
  int64_t block_mult = 1;  // destination slot of source block i: i * block_mult + block_off
  int64_t block_off = 0;
};

// Bytes of one packed 16-row block (qweight / scales) of a matrix with K inputs.
size_t block_qweight_bytes(WeightFormat f, int64_t k);
size_t block_scale_count(WeightFormat f, int64_t k);  // uint16 elements

// compressed-tensors pack-quantized INT4 (weight_packed int32 [N, K/8], nibble j of word w is
// input 8w + j stored as q + 8; weight_scale [N, K/32] bf16 bits or fp32) -> INT4_G32, bit-exact.
// fp32 scales must be exactly representable in bf16 (throws std::invalid_argument otherwise).
void pack_int4_from_ct(const int32_t* packed, const void* scale, SrcDtype scale_dtype, int64_t n,
                       int64_t k, int64_t b0, int64_t b1, const PackDest& dst);

// Float weights W [N, K] (fp32 or bf16 bits, row-major) -> `format`.
//   INT4_G32: compressed-tensors' symmetric int4 group-32 rule, computed in the source dtype:
//     scale = amax / 7.5 (0 -> dtype eps), q = round_half_even(clamp(x / scale, -8, 7));
//     the stored scale is bf16(scale) (exact for bf16 sources).
//   INT8_G32: s = bf16(amax / 127), q = round_half_even(clamp(x / s, -127, 127)) (s = 0: q = 0).
//   BF16:     round to nearest even.
// INT formats throw std::invalid_argument naming the row and inputs of a group holding NaN/Inf;
// GGUF formats (Q4_0, Q8_0) throw: they come from their own blocks (pack_gguf).
void quantize_pack(WeightFormat format, const void* w, SrcDtype dtype, int64_t n, int64_t k,
                   int64_t b0, int64_t b1, const PackDest& dst);

// GGUF block types kept in their own bits (kernels.h: Q4_0, Q8_0, the K types). The source is one
// [N, K] matrix as a GGUF file stores it: row r is consecutive blocks, gguf_row_bytes(f, K) bytes,
// rows back to back (src + r * gguf_row_bytes). Blocks (ggml's block_q4_0 / block_q8_0):
//   Q4_0: 18 bytes: fp16 d, 16 bytes qs; input j < 16 is the low nibble of qs[j], input j + 16 its
//         high nibble; W = (nibble - 8) * d
//   Q8_0: 34 bytes: fp16 d, 32 int8 qs; W = qs[j] * d
// The repack is lossless: the nibbles / int8 values and the fp16 d bits are moved, never recomputed,
// so unpack() gives back exactly what the GGUF dequantiser does. Any bit pattern is accepted (a NaN
// or Inf scale stays one: the loader, not the packer, decides what a valid file is).
// The K types (Q4_K, Q5_K, Q6_K, Q3_K, Q2_K, IQ4_XS) have blocks of 256 inputs (ggml's block_q4_K
// and kin, their fields listed in pack.cpp) and pack into the tiles of kquant.h, decoded to plain
// integers and re-encoded: the same integers and fp16 bits, so again unpack() == the dequantiser.
size_t gguf_block_bytes(WeightFormat f);   // bytes of one GGUF block; 0: not a GGUF type
int64_t gguf_block_inputs(WeightFormat f);  // inputs of one block: 32, or 256 for the K types
size_t gguf_row_bytes(WeightFormat f, int64_t k);
void pack_gguf(WeightFormat f, const uint8_t* src, int64_t n, int64_t k, int64_t b0, int64_t b1,
               const PackDest& dst);

// Packed -> fp32 rows [16*b0, 16*b1) of W, written to out [(b1 - b0) * 16, K] row-major.
void unpack(const PackedMatrix& w, int64_t b0, int64_t b1, float* out);

}  // namespace hybrid
