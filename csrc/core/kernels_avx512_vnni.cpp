// kernels_avx512_vnni.cpp: AVX-512 VNNI kernels (see kernels.h): matmul_a8 with vpdpbusd, the
// decode (GEMV) and small-batch workhorse for INT4/INT8 weights; body in simd_vnni.h.
// quantize_row_a8 and matmul_f32 gain nothing from VNNI and are left null: dispatch.cpp fills
// them from the avx512 table. Compiled with the avx512 flags + -mavx512vnni only.
#include "core/simd_vnni.h"

namespace hybrid {
namespace {

const KernelTable kTable = {
    "avx512_vnni",
    nullptr,  // quantize_row_a8: avx512's
    v_matmul_a8,
    nullptr,  // matmul_f32: avx512's
    nullptr,  // matmul_a16 needs avx512_bf16
};

}  // namespace

const KernelTable* kernels_avx512_vnni() { return &kTable; }

}  // namespace hybrid
