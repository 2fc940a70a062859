// norm.h: RMSNorm of bf16 rows (optionally fused with the residual add before it), the per-token
// step that every decoder layer runs twice; torch runs it as ~5 tiny ops on a CPU device, each
// costing 2-15 us of dispatch, more than the arithmetic. Plain fp32 loops (the compiler
// vectorises them); numerics follow transformers.
//
// Legend: T tokens, H hidden.
#pragma once
#include <cstdint>

namespace hybrid {

// out[t] = bf16(w * bf16(x[t] * rsqrt(mean(x[t]^2) + eps))), x/w/out bf16 bits. When `residual`
// is given, x[t] += residual[t] first (rounded to bf16, as torch's bf16 add) and written back.
void rms_norm_bf16(uint16_t* x, const uint16_t* residual, const uint16_t* w, int64_t t, int64_t h,
                   float eps, uint16_t* out);

}  // namespace hybrid
