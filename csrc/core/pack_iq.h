// pack_iq.h: GGUF's lattice-type blocks (ggml's block_iq2_xxs, block_iq2_xs, block_iq3_xxs,
// block_iq1_s, block_iq1_m; field byte ranges in pack_iq.cpp) into row r of a kquant.h tile,
// losslessly: the grid indices and fp16 bits are moved, the 4- or 3-bit sub-scales s become
// sc = 2 s + 1, the sign indices their ksigns masks (IQ2_XXS, IQ3_XXS), so kq_decode_tile gives
// back gguf's dequantised values exactly.
#pragma once
#include <cstdint>

#include "core/kernels.h"

namespace hybrid {

// Bytes of one GGUF block of a lattice type (256 inputs); 0 for the other formats.
size_t iq_block_bytes(WeightFormat f);
// One block b of row r -> tile t (its other rows untouched). f must be a lattice type.
void iq_pack_super(WeightFormat f, const uint8_t* b, int r, uint8_t* t);

}  // namespace hybrid
