// kernels_avx512.cpp: AVX-512 F/BW/VL/DQ kernels (see kernels.h): quantize_row_a8, matmul_f32
// for all three formats (exact fp32 dequantisation, zmm FMA), matmul_a8 via vpmaddubsw +
// vpmaddwd, gemv_bf16 (bf16 widened to fp32 by shift / mask, FMA), gemv_t_bf16 (the transposed
// axpy form, columns in zmm) and gemv_i8 (int8 rows widened to fp32, FMA). The bodies live in simd_avx512.h so the VNNI and AMX units can reuse the helpers.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq only.
#include "core/simd_avx512.h"
#include "core/simd_avx512_gemv.h"

namespace hybrid {
namespace {

const KernelTable kTable = {
    "avx512",
    z_quantize_row_a8,
    z_matmul_a8_bw,
    z_matmul_f32,
    nullptr,  // matmul_a16 needs avx512_bf16
    z_gemv_bf16,
    z_gemv_t_bf16,
    z_gemv_i8,
};

}  // namespace

const KernelTable* kernels_avx512() { return &kTable; }

}  // namespace hybrid
