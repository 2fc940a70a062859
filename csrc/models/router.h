// router.h: the small per-token steps of a decode layer that torch runs as many tiny ops on a
// CPU device: RMSNorm (optionally fused with the residual add before it) and the DeepSeek-V3
// "noaux_tc" router. On a CPU each torch op costs 2-15 us of dispatch; a decode layer of the
// demo model had ~10 ops of norms and ~12 of routing, more time than their arithmetic.
// Plain fp32 loops (the compiler vectorises them); numerics follow transformers.
//
// Legend: T tokens, H hidden, E experts, G groups, K picked.
#pragma once
#include <cstdint>

namespace hybrid {

// out[t] = bf16(w * bf16(x[t] * rsqrt(mean(x[t]^2) + eps))), x/w/out bf16 bits. When `residual`
// is given, x[t] += residual[t] first (rounded to bf16, as torch's bf16 add) and written back.
void rms_norm_bf16(uint16_t* x, const uint16_t* residual, const uint16_t* w, int64_t t, int64_t h,
                   float eps, uint16_t* out);

struct RouterConfig {
  int64_t experts = 0, groups = 1, topk_groups = 1, top_k = 1;
  bool norm_topk_prob = true;
  float scaling = 1.f;
};

// x [T][H] bf16, gate [E][H] fp32, bias [E] fp32 or null -> ids [T][K] int32, weights [T][K] fp32:
// scores = sigmoid(gate . x); choice = scores + bias; with G > 1 only the topk_groups groups
// with the largest sum of their two best choice values are eligible; the K best eligible
// choices are picked (descending; ties to the lower id); weights are their unbiased scores,
// divided by their sum (+1e-20) when norm_topk_prob, times scaling.
void route_bf16(const uint16_t* x, const float* gate, const float* bias, int64_t t, int64_t h,
                const RouterConfig& cfg, int32_t* ids, float* weights);

}  // namespace hybrid
