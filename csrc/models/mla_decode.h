// mla_decode.h: the MLA attention of decode tokens on a CPU device, in one call.
//
// What it replaces: between the q_b / kv_a projections and o_proj, torch runs ~45 small ops per
// layer (RMSNorm of the latent, RoPE of q and k, the cache write, the absorbed q projection,
// scores, softmax, the latent-weighted sum, the value projection); on a CPU each costs 3-30 us of
// dispatch (bf16 matmuls on tiny shapes ~30 us), which is most of a small model's decode step.
// Here it is one call, math in fp32, every token against its own slot of the latent cache, so a
// batch of decode tokens from many sequences needs no padding or mask either.
//
// Per token t (position p, slot s), per head h (hybrid/models/deepseek_v3.py, absorbed form):
//   latent   = RMSNorm(kv[t][:C]) * kv_norm             (bf16 result, transformers' rounding)
//   k_rope   = RoPE(kv[t][C:], p)                        (de-interleaved as apply_rope writes it)
//   cache[s][p] = [latent, k_rope]                       (all tokens are written before any reads)
//   q_lat    = q[t][h][:D] . W_uk[h]            [C]      (W_uk[h] = kv_b rows h*(D+V) .. +D)
//   score[j] = scale * ([q_lat, RoPE(q[t][h][D:], p)] . cache[s][j])   for j <= p
//   o_lat    = softmax(score) . cache[s][:p+1][:C]       [C]
//   out[t][h] = W_uv[h] . o_lat                  [V]     (W_uv[h] = kv_b rows h*(D+V)+D .. +V)
// The products run in the KernelTable: gemv_bf16 for the dot products over cache rows and W_uv
// (q_lat and o_lat are rounded to bf16 for it, as the torch path holds them), gemv_t_bf16 for the
// sums down the columns (q_lat from W_uk, o_lat from the cache rows).
//
// Legend: T tokens, nh heads, D qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim,
// C kv_lora_rank, S cache slots, Lmax cache length.
#pragma once
#include <cstdint>

#include "core/kernels.h"
#include "core/thread_pool.h"

namespace hybrid {

struct MlaDecodeArgs {
  int64_t t = 0, nh = 0, d = 0, r = 0, v = 0, c = 0;
  const uint16_t* q = nullptr;        // [T][nh*(D+R)] bf16 (q_b_proj output), row stride ldq
  int64_t ldq = 0;
  const uint16_t* kv = nullptr;       // [T][C+R] bf16 (kv_a_proj output), row stride ldkv
  int64_t ldkv = 0;
  const uint16_t* kv_norm = nullptr;  // [C] bf16
  float eps = 1e-6f;
  const float* cos = nullptr;         // [T][R/2] fp32, times the attention factor
  const float* sin = nullptr;         // [T][R/2]
  bool interleave = true;             // rope pairs (x0, x1), (x2, x3)... else halves
  uint16_t* cache = nullptr;          // this layer's cache [S][Lmax][C+R] bf16, contiguous
  int64_t slots = 0, max_len = 0;     // S, Lmax
  const int64_t* slot = nullptr;      // [T], checked < S
  const int64_t* pos = nullptr;       // [T], checked < Lmax
  const uint16_t* wkvb = nullptr;     // kv_b_proj weight [nh][D+V][C] bf16, contiguous
  float scale = 1.f;                  // softmax scale
  uint16_t* out = nullptr;            // [T][nh*V] bf16, contiguous
};

// Runs on `pool` with the calling thread as one of `team` threads (ThreadPool caller job) when
// the work is large enough to pay for it, else inline; pool may be null (inline).
void mla_decode(const KernelTable& kt, ThreadPool* pool, int team, const MlaDecodeArgs& a);

}  // namespace hybrid
