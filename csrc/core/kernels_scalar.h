// kernels_scalar.h: scalar reference entries that are not part of the scalar KernelTable.
#pragma once
#include "core/kernels.h"

namespace hybrid {

// Reference for KernelTable::matmul_a16 (bf16-rounded activations, bf16 weights, fp32
// accumulation). Not in the scalar table on purpose: kernels.h says matmul_a16 stays null below
// avx512_bf16, so the operator uses matmul_f32 there. Tests compare the SIMD entries with it.
void reference_matmul_a16(const PackedMatrix& w, int64_t b0, int64_t b1, const float* x,
                          int64_t t, int64_t ldx, float* out, int64_t ldo);

}  // namespace hybrid
