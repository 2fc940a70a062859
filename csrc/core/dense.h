// dense.h: the dense bf16 and int8 GEMV drivers (the device Linear's decode path when the device
// is the CPU): out [T, N] = X [T, K] . W [N, K]^T on an unpacked row-major bf16 weight, with the
// KernelTable's gemv_bf16 doing the arithmetic (kernels.h). It splits the rows over the thread
// pool when the matrix is large enough to pay for waking it, and rounds to bf16 on the way out
// when asked.
//
// Legend: N output rows of W, K inputs, T tokens (rows of X and of out).
#pragma once
#include <cstdint>

#include "core/kernels.h"
#include "core/thread_pool.h"

namespace hybrid {

// Below this many weight bytes (4 MiB) the call runs on the calling thread: see dense.cpp for
// the measurement behind it.
extern const int64_t kDenseParallelMinBytes;

// out[tt * ldo + n] = sum_k W[n][k] * X[tt][k] for n < N, tt < T.
//   w: bf16 bits, row n at w + n * ldw (ldw >= k); x: bf16 bits, token tt at x + tt * ldx;
//   out: fp32 (out_bf16 = false) or bf16 bits rounded to nearest even (out_bf16 = true), row
//   stride ldo elements (ldo >= n). n, k, t >= 1; the caller checks shapes (binding.cpp).
// pool == nullptr, or a matrix under kDenseParallelMinBytes: inline on the calling thread.
// Otherwise a caller job of up to pool->size() + 1 threads (the calling thread is one of them,
// as MoeOperator's caller mode counts it) takes contiguous row ranges of multiples of 16 rows;
// the call returns when all are done. Results do not depend on the split (each row's sum is
// computed the same way whichever thread owns it).
void dense_gemv(const KernelTable& kt, ThreadPool* pool, const uint16_t* w, int64_t ldw, int64_t n,
                int64_t k, const uint16_t* x, int64_t t, int64_t ldx, void* out, int64_t ldo,
                bool out_bf16);

// The same for an int8 weight with a per-row scale: out[tt * ldo + n] = scale[n] * sum_k W[n][k] *
// X[tt][k] (KernelTable::gemv_i8, then the scale in fp32 and one rounding when out_bf16).
// w: int8, row n at w + n * ldw; scale: fp32 [n]. The same split and threading rules (by weight
// bytes: 1 per element).
void dense_gemv_i8(const KernelTable& kt, ThreadPool* pool, const int8_t* w, int64_t ldw, const float* scale,
                   int64_t n, int64_t k, const uint16_t* x, int64_t t, int64_t ldx, void* out, int64_t ldo,
                   bool out_bf16);

// The same product for a packed weight (kernels.h's PackedMatrix in any format matmul_a8 takes:
// INT4 / INT8 group-32 and the GGUF block types, e.g. a GGUF file's attention tensors kept in their
// Q4_K / Q6_K blocks on a CPU device): X's rows are quantised to int8 per 32 inputs once
// (KernelTable::quantize_row_a8, the MoE operator's activation rounding), then
// KernelTable::matmul_a8 runs over row blocks. x: bf16 bits [t][w.k], row stride ldx; out as
// above. Threads: the same rules by the packed bytes (a two-phase caller job: tokens quantised,
// then rows). Results do not depend on the split.
void dense_packed(const KernelTable& kt, ThreadPool* pool, const PackedMatrix& w, int64_t packed_bytes,
                  const uint16_t* x, int64_t t, int64_t ldx, void* out, int64_t ldo, bool out_bf16);

}  // namespace hybrid
