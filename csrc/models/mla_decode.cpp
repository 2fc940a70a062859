// mla_decode.cpp: see mla_decode.h. Compiled with the default flags: the ISA-specific work is the
// KernelTable's gemv_bf16 / gemv_t_bf16; the rest is short fp32 loops (norm, RoPE, softmax).
#include "models/mla_decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace hybrid {
namespace {

constexpr int kHeadGroup = 4;  // heads per work item: gemv_bf16 reuses each cache row for 4 queries
// Below this many multiply-adds the pool round trip (~6 us, more on a busy machine) costs more
// than it saves; the demo model's decode (4 heads, C+R = 80) stays inline, K2.5's 64 heads and
// C+R = 576 go to the pool from a few keys on.
constexpr int64_t kPoolMacs = 256 * 1024;

// x [R] -> out [R]: RoPE with cos/sin [R/2], output de-interleaved (deepseek_v3.apply_rope).
inline void rope(const float* x, const float* cs, const float* sn, int64_t r, bool interleave, float* out) {
  const int64_t half = r / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = interleave ? x[2 * i] : x[i];
    const float x2 = interleave ? x[2 * i + 1] : x[half + i];
    out[i] = x1 * cs[i] - x2 * sn[i];
    out[half + i] = x2 * cs[i] + x1 * sn[i];
  }
}

// Token t's latent + rope key into cache[slot][pos] (transformers' RMSNorm rounding: normalise
// in fp32, round to bf16, times the bf16 weight, round).
void write_cache_row(const MlaDecodeArgs& a, int64_t t) {
  const int64_t C = a.c, R = a.r, W = C + R;
  const uint16_t* kv = a.kv + t * a.ldkv;
  uint16_t* row = a.cache + (a.slot[t] * a.max_len + a.pos[t]) * W;
  float ss = 0.f;
  for (int64_t i = 0; i < C; ++i) {
    const float x = bf16_to_f32(kv[i]);
    ss += x * x;
  }
  const float inv = 1.f / std::sqrt(ss / float(C) + a.eps);
  for (int64_t i = 0; i < C; ++i) {
    const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(kv[i]) * inv));
    row[i] = f32_to_bf16(bf16_to_f32(a.kv_norm[i]) * normed);
  }
  float xr[256], yr[256];  // R <= 256 (checked at the binding)
  for (int64_t i = 0; i < R; ++i) xr[i] = bf16_to_f32(kv[C + i]);
  rope(xr, a.cos + t * (R / 2), a.sin + t * (R / 2), R, a.interleave, yr);
  for (int64_t i = 0; i < R; ++i) row[C + i] = f32_to_bf16(yr[i]);
}

struct Scratch {
  std::vector<float> qf, scores, olat, tmp;
  std::vector<uint16_t> qb, ob;
};

// Heads [h0, h1) (h1 - h0 <= kHeadGroup) of token t.
void attend(const KernelTable& kt, const MlaDecodeArgs& a, int64_t t, int64_t h0, int64_t h1, Scratch& s) {
  const int64_t D = a.d, R = a.r, V = a.v, C = a.c, W = C + R, hg = h1 - h0;
  const int64_t L = a.pos[t] + 1;
  const uint16_t* rows = a.cache + a.slot[t] * a.max_len * W;  // [L][W], this slot
  s.qf.resize(size_t(W));
  s.qb.resize(size_t(hg * W));
  s.scores.resize(size_t(hg * L));
  s.olat.resize(size_t(hg * C));
  s.tmp.resize(size_t(std::max(V, R)));
  s.ob.resize(size_t(C));

  // Queries in latent space: [q_nope . W_uk[h], RoPE(q_rope)] as bf16 [hg][W].
  for (int64_t h = h0; h < h1; ++h) {
    const uint16_t* qh = a.q + t * a.ldq + h * (D + R);
    const uint16_t* wuk = a.wkvb + h * (D + V) * C;  // [D][C]
    float* ql = s.qf.data();
    float qn[512];  // D <= 512 (checked at the binding)
    for (int64_t d = 0; d < D; ++d) qn[d] = bf16_to_f32(qh[d]);
    kt.gemv_t_bf16(wuk, C, D, 0, C, qn, 1, D, ql, C, false);  // ql[c] = sum_d qn[d] * W_uk[d][c]
    float xr[256];
    for (int64_t i = 0; i < R; ++i) xr[i] = bf16_to_f32(qh[D + i]);
    rope(xr, a.cos + t * (R / 2), a.sin + t * (R / 2), R, a.interleave, ql + C);
    uint16_t* qb = s.qb.data() + (h - h0) * W;
    for (int64_t i = 0; i < W; ++i) qb[i] = f32_to_bf16(ql[i]);
  }

  // Scores [hg][L]: each cache row against the hg queries (one gemv, rows read once).
  kt.gemv_bf16(rows, W, 0, L, W, s.qb.data(), hg, W, s.scores.data(), L);

  // Softmax per head, then o_lat[h] = sum_j p[h][j] * latent_j, rows read once for all heads.
  for (int64_t i = 0; i < hg; ++i) {
    float* sc = s.scores.data() + i * L;
    float mx = -INFINITY;
    for (int64_t j = 0; j < L; ++j) mx = std::max(mx, sc[j] * a.scale);
    float sum = 0.f;
    for (int64_t j = 0; j < L; ++j) sum += (sc[j] = std::exp(sc[j] * a.scale - mx));
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < L; ++j) sc[j] *= inv;
  }
  // o_lat[i][c] = sum_j p[i][j] * latent_j[c]: the cache rows streamed once for the hg heads.
  kt.gemv_t_bf16(rows, W, L, 0, C, s.scores.data(), hg, L, s.olat.data(), C, false);

  // Values: out[t][h] = W_uv[h] [V][C] . o_lat[h].
  for (int64_t h = h0; h < h1; ++h) {
    const float* o = s.olat.data() + (h - h0) * C;
    for (int64_t c = 0; c < C; ++c) s.ob[size_t(c)] = f32_to_bf16(o[c]);
    const uint16_t* wuv = a.wkvb + (h * (D + V) + D) * C;
    kt.gemv_bf16(wuv, C, 0, V, C, s.ob.data(), 1, C, s.tmp.data(), V);
    uint16_t* out = a.out + t * a.nh * V + h * V;
    for (int64_t i = 0; i < V; ++i) out[i] = f32_to_bf16(s.tmp[size_t(i)]);
  }
}

}  // namespace

void mla_decode(const KernelTable& kt, ThreadPool* pool, int team, const MlaDecodeArgs& a) {
  for (int64_t t = 0; t < a.t; ++t) write_cache_row(a, t);  // every row before any read

  const int64_t groups = (a.nh + kHeadGroup - 1) / kHeadGroup, items = a.t * groups;
  int64_t macs = 0;
  for (int64_t t = 0; t < a.t; ++t)
    macs += a.nh * (a.d * a.c + 2 * (a.pos[t] + 1) * (a.c + a.r) + a.v * a.c);
  auto run_items = [&](int64_t i0, int64_t i1) {
    thread_local Scratch s;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / groups, g = i % groups;
      attend(kt, a, t, g * kHeadGroup, std::min(a.nh, (g + 1) * kHeadGroup), s);
    }
  };
  if (pool == nullptr || team <= 1 || items < 2 || macs < kPoolMacs) {
    run_items(0, items);
    return;
  }
  // Contiguous item ranges (token-major); tokens with longer contexts cost more, which a batch of
  // mixed lengths leaves a little unbalanced.
  pool->run({[&](int tid, int n) {
    auto [i0, i1] = pool->split(items, tid, n);
    run_items(i0, i1);
  }}, team, /*caller=*/true);
}

}  // namespace hybrid
