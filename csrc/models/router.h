// router.h: the MoE routers of the supported architectures, each one call for a batch of tokens
// (torch runs ~12 tiny ops per layer for them on a CPU device, each costing 2-15 us of dispatch,
// more than their arithmetic):
//   route_bf16          DeepSeek-V3 / Kimi K2 "noaux_tc": sigmoid scores, a selection bias,
//                       group-limited top-k;
//   route_softmax_bf16  Qwen3-MoE / Mixtral: softmax over the experts, top-k.
// Both compute the logits the same way, gate [E][H] fp32 . x [H] (bf16 widened), in fp32 with
// 16 interleaved partial sums. Plain fp32 loops (the compiler vectorises them); numerics follow
// transformers.
//
// Legend: T tokens, H hidden, E experts, G groups, K picked.
#pragma once
#include <cstdint>

namespace hybrid {

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

// x [T][H] bf16, gate [E][H] fp32 -> ids [T][K] int32, weights [T][K] fp32:
// p = softmax(gate . x) over the E experts (exp(l - max l) / sum, fp32); the K most probable
// experts are picked, in descending probability; equal probabilities go to the lower expert
// index first (a stable order, as torch.topk's on the CPU); weights are their probabilities,
// divided by their sum when norm_topk_prob, else as they are. Needs 1 <= K <= E.
void route_softmax_bf16(const uint16_t* x, const float* gate, int64_t t, int64_t h, int64_t experts,
                        int64_t top_k, bool norm_topk_prob, int32_t* ids, float* weights);

}  // namespace hybrid
