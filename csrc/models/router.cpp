// router.cpp: see router.h.
#include "models/router.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/kernels.h"  // bf16 helpers

namespace hybrid {
namespace {

// logits[e] = gate[e] . xf for e < E. 16 interleaved partial sums: a single fp32 accumulator is
// a serial dependency chain the compiler may not reorder; independent lanes vectorise (4x faster
// on the demo's 64 x 256).
void router_logits(const float* xf, const float* gate, int64_t h, int64_t experts, float* logits) {
  for (int64_t e = 0; e < experts; ++e) {
    const float* g = gate + e * h;
    float part[16] = {};
    int64_t j = 0;
    for (; j + 16 <= h; j += 16)
      for (int l = 0; l < 16; ++l) part[l] += g[j + l] * xf[j + l];
    float acc = 0.f;
    for (; j < h; ++j) acc += g[j] * xf[j];
    for (int l = 0; l < 16; ++l) acc += part[l];
    logits[e] = acc;
  }
}

// Token i of x [T][H] bf16 widened to fp32.
void widen_row(const uint16_t* x, int64_t i, int64_t h, float* xf) {
  for (int64_t j = 0; j < h; ++j) xf[j] = bf16_to_f32(x[i * h + j]);
}

// Descending by value, ties to the lower index (a strict weak order, so sort is well defined).
auto descending(const std::vector<float>& v) {
  return [&v](int64_t a, int64_t b) { return v[size_t(a)] > v[size_t(b)] || (v[size_t(a)] == v[size_t(b)] && a < b); };
}

}  // namespace

void route_bf16(const uint16_t* x, const float* gate, const float* bias, int64_t t, int64_t h,
                const RouterConfig& cfg, int32_t* ids, float* weights) {
  const int64_t E = cfg.experts, G = cfg.groups, per = E / G, K = cfg.top_k;
  std::vector<float> xf(static_cast<size_t>(h)), score(static_cast<size_t>(E)), choice(static_cast<size_t>(E)),
      gscore(static_cast<size_t>(G));
  std::vector<int64_t> order(static_cast<size_t>(std::max(E, G)));
  std::vector<char> eligible(static_cast<size_t>(E));
  for (int64_t i = 0; i < t; ++i) {
    widen_row(x, i, h, xf.data());
    router_logits(xf.data(), gate, h, E, score.data());
    for (int64_t e = 0; e < E; ++e) {
      score[size_t(e)] = 1.f / (1.f + std::exp(-score[size_t(e)]));
      choice[size_t(e)] = score[size_t(e)] + (bias != nullptr ? bias[e] : 0.f);
    }
    std::fill(eligible.begin(), eligible.end(), char(G <= 1));
    if (G > 1) {
      for (int64_t g = 0; g < G; ++g) {  // sum of the group's two best choice values
        float b1 = -INFINITY, b2 = -INFINITY;
        for (int64_t e = g * per; e < (g + 1) * per; ++e) {
          const float c = choice[size_t(e)];
          if (c > b1) { b2 = b1; b1 = c; } else if (c > b2) { b2 = c; }
        }
        gscore[size_t(g)] = b1 + (per > 1 ? b2 : 0.f);
      }
      for (int64_t g = 0; g < G; ++g) order[size_t(g)] = g;
      std::partial_sort(order.begin(), order.begin() + cfg.topk_groups, order.begin() + G, descending(gscore));
      for (int64_t r = 0; r < cfg.topk_groups; ++r)
        std::fill(eligible.begin() + order[size_t(r)] * per, eligible.begin() + (order[size_t(r)] + 1) * per, 1);
    }
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e)
      if (eligible[size_t(e)]) order[size_t(n++)] = e;
    std::partial_sort(order.begin(), order.begin() + K, order.begin() + n, descending(choice));
    float sum = 0.f;
    for (int64_t k = 0; k < K; ++k) sum += score[size_t(order[size_t(k)])];
    const float mul = cfg.norm_topk_prob ? cfg.scaling / (sum + 1e-20f) : cfg.scaling;
    for (int64_t k = 0; k < K; ++k) {
      ids[i * K + k] = int32_t(order[size_t(k)]);
      weights[i * K + k] = score[size_t(order[size_t(k)])] * mul;
    }
  }
}

void route_softmax_bf16(const uint16_t* x, const float* gate, int64_t t, int64_t h, int64_t experts,
                        int64_t top_k, bool norm_topk_prob, int32_t* ids, float* weights) {
  const int64_t E = experts, K = top_k;
  std::vector<float> xf(static_cast<size_t>(h)), prob(static_cast<size_t>(E));
  std::vector<int64_t> order(static_cast<size_t>(E));
  for (int64_t i = 0; i < t; ++i) {
    widen_row(x, i, h, xf.data());
    router_logits(xf.data(), gate, h, E, prob.data());
    const float mx = *std::max_element(prob.begin(), prob.end());
    float sum = 0.f;
    for (float& p : prob) sum += (p = std::exp(p - mx));
    for (float& p : prob) p /= sum;
    for (int64_t e = 0; e < E; ++e) order[size_t(e)] = e;
    std::partial_sort(order.begin(), order.begin() + K, order.end(), descending(prob));
    float picked = 0.f;
    for (int64_t k = 0; k < K; ++k) picked += prob[size_t(order[size_t(k)])];
    for (int64_t k = 0; k < K; ++k) {
      const float p = prob[size_t(order[size_t(k)])];
      ids[i * K + k] = int32_t(order[size_t(k)]);
      weights[i * K + k] = norm_topk_prob ? p / picked : p;
    }
  }
}

}  // namespace hybrid
