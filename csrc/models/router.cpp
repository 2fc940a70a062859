// router.cpp: see router.h.
#include "router.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"  // bf16 helpers

namespace hybrid {

void rms_norm_bf16(uint16_t* x, const uint16_t* residual, const uint16_t* w, int64_t t, int64_t h,
                   float eps, uint16_t* out) {
  for (int64_t i = 0; i < t; ++i) {
    uint16_t* xr = x + i * h;
    if (residual != nullptr)
      for (int64_t j = 0; j < h; ++j)
        xr[j] = f32_to_bf16(bf16_to_f32(xr[j]) + bf16_to_f32(residual[i * h + j]));
    float ss = 0.f;
    for (int64_t j = 0; j < h; ++j) {
      const float v = bf16_to_f32(xr[j]);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / float(h) + eps);
    for (int64_t j = 0; j < h; ++j)
      out[i * h + j] = f32_to_bf16(bf16_to_f32(w[j]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[j]) * inv)));
  }
}

void route_bf16(const uint16_t* x, const float* gate, const float* bias, int64_t t, int64_t h,
                const RouterConfig& cfg, int32_t* ids, float* weights) {
  const int64_t E = cfg.experts, G = cfg.groups, per = E / G, K = cfg.top_k;
  std::vector<float> xf(static_cast<size_t>(h)), score(static_cast<size_t>(E)), choice(static_cast<size_t>(E)),
      gscore(static_cast<size_t>(G));
  std::vector<int64_t> order(static_cast<size_t>(std::max(E, G)));
  std::vector<char> eligible(static_cast<size_t>(E));
  // Descending by value, ties to the lower index (a strict weak order, so sort is well defined).
  auto desc = [](const std::vector<float>& v) {
    return [&v](int64_t a, int64_t b) { return v[size_t(a)] > v[size_t(b)] || (v[size_t(a)] == v[size_t(b)] && a < b); };
  };
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < h; ++j) xf[size_t(j)] = bf16_to_f32(x[i * h + j]);
    for (int64_t e = 0; e < E; ++e) {
      // 16 interleaved partial sums: a single fp32 accumulator is a serial dependency chain the
      // compiler may not reorder; independent lanes vectorise (4x faster on the demo's 64 x 256).
      const float* g = gate + e * h;
      float part[16] = {};
      int64_t j = 0;
      for (; j + 16 <= h; j += 16)
        for (int l = 0; l < 16; ++l) part[l] += g[j + l] * xf[size_t(j + l)];
      float acc = 0.f;
      for (; j < h; ++j) acc += g[j] * xf[size_t(j)];
      for (int l = 0; l < 16; ++l) acc += part[l];
      score[size_t(e)] = 1.f / (1.f + std::exp(-acc));
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
      std::partial_sort(order.begin(), order.begin() + cfg.topk_groups, order.begin() + G, desc(gscore));
      for (int64_t r = 0; r < cfg.topk_groups; ++r)
        std::fill(eligible.begin() + order[size_t(r)] * per, eligible.begin() + (order[size_t(r)] + 1) * per, 1);
    }
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e)
      if (eligible[size_t(e)]) order[size_t(n++)] = e;
    std::partial_sort(order.begin(), order.begin() + K, order.begin() + n, desc(choice));
    float sum = 0.f;
    for (int64_t k = 0; k < K; ++k) sum += score[size_t(order[size_t(k)])];
    const float mul = cfg.norm_topk_prob ? cfg.scaling / (sum + 1e-20f) : cfg.scaling;
    for (int64_t k = 0; k < K; ++k) {
      ids[i * K + k] = int32_t(order[size_t(k)]);
      weights[i * K + k] = score[size_t(order[size_t(k)])] * mul;
    }
  }
}

}  // namespace hybrid
