// moe.cpp: see moe.h.
#include "core/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "core/dispatch.h"
#include "core/pack.h"

namespace hybrid {
namespace {

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

template <class T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

MoeOperator::MoeOperator(std::shared_ptr<PackedLayer> layer, ActMode mode, int team,
                         const std::string& isa, bool caller)
    : layer_(std::move(layer)), mode_(mode), team_req_(team), caller_(caller) {
  if (!layer_) throw std::invalid_argument("layer: a packed layer is required");
  isa_ = isa.empty() ? active_isa() : isa;
  table_ = resolved_table(isa_);  // throws std::invalid_argument with the reason
}

MoeOperator::~MoeOperator() {
  std::lock_guard<std::mutex> lock(mu_);
  if (job_) {
    try {
      ThreadPool::wait(job_);
    } catch (const std::exception&) {
      // The owner dropped the operator without sync(); the error has nobody to go to.
    }
  }
}

bool MoeOperator::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return job_ != nullptr;
}

bool MoeOperator::int8_acts(bool hidden_side) const {
  const WeightFormat f = hidden_side ? layer_->format() : layer_->down_format();
  return mode_ == ActMode::Fast && f != WeightFormat::BF16;
}

void MoeOperator::inject_fault(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  fault_ = message;
}

void MoeOperator::submit(const MoeCall& c) {
  std::lock_guard<std::mutex> lock(mu_);
  if (job_)
    throw std::logic_error(
        "submit() called while this operator's previous submit() is still pending: call sync() "
        "first (one job in flight per operator)");
  const int64_t E = layer_->num_experts(), H = layer_->hidden(), I = layer_->intermediate();
  const int64_t B = c.b, K = c.k;

  // Routing: pairs grouped by expert (ascending id). A token that picks the same expert twice
  // gets one pair whose weight is the sum of its picks' weights (same result, half the work).
  std::vector<int64_t> count(size_t(E), 0), last_tok(size_t(E), -1);
  auto id_at = [&](int64_t i) -> int64_t {
    return c.ids_type == ElemType::I64 ? static_cast<const int64_t*>(c.ids)[i]
                                       : int64_t(static_cast<const int32_t*>(c.ids)[i]);
  };
  for (int64_t i = 0; i < B * K; ++i) {
    int64_t e = id_at(i);
    if (e < 0 || e >= E)
      throw std::invalid_argument("ids[" + std::to_string(i / K) + ", " + std::to_string(i % K) +
                                  "] = " + std::to_string(e) + " is out of range [0, " +
                                  std::to_string(E) + ")");
    if ((c.skip == nullptr || c.skip[e] == 0) && last_tok[size_t(e)] != i / K) {
      ++count[size_t(e)];
      last_tok[size_t(e)] = i / K;
    }
  }
  act_expert_.clear();
  act_start_.assign(1, 0);
  std::vector<int64_t> cursor(size_t(E), -1);
  for (int64_t e = 0; e < E; ++e) {
    if (count[size_t(e)] == 0) continue;
    cursor[size_t(e)] = act_start_.back();
    act_expert_.push_back(int32_t(e));
    act_start_.push_back(act_start_.back() + count[size_t(e)]);
  }
  const int64_t P = act_start_.back();
  pair_token_.resize(size_t(P));
  pair_weight_.resize(size_t(P));
  tok_start_.assign(size_t(B + 1), 0);
  tok_pairs_.resize(size_t(P));
  std::vector<int64_t> first(cursor);  // first pair of each active expert
  for (int64_t i = 0; i < B * K; ++i) {
    const int64_t e = id_at(i), t = i / K;
    if (cursor[size_t(e)] < 0) continue;  // masked (or unused)
    int64_t& cur = cursor[size_t(e)];
    if (cur > first[size_t(e)] && pair_token_[size_t(cur - 1)] == t) {  // repeated pick
      pair_weight_[size_t(cur - 1)] += c.weights[i];
      continue;
    }
    pair_token_[size_t(cur)] = int32_t(t);
    pair_weight_[size_t(cur)] = c.weights[i];
    ++cur;
    tok_start_[size_t(t + 1)]++;
  }
  for (int64_t t = 0; t < B; ++t) tok_start_[size_t(t + 1)] += tok_start_[size_t(t)];
  {
    std::vector<int64_t> fill(tok_start_.begin(), tok_start_.end() - 1);
    for (int64_t p = 0; p < P; ++p) tok_pairs_[size_t(fill[size_t(pair_token_[size_t(p)])]++)] = p;
  }

  // Scratch.
  if (int8_acts(true)) {
    grow(xq_, size_t(P * H));
    grow(xs_, size_t(P * H / kGroup));
    grow(xgs_, size_t(P * H / kGroup));
    grow(xhs_, size_t(P * H / kGroup));
  } else {
    grow(xf_, size_t(P * H));
  }
  if (int8_acts(false)) {
    grow(hq_, size_t(P * I));
    grow(hs_, size_t(P * I / kGroup));
    grow(hgs_, size_t(P * I / kGroup));
    grow(hhs_, size_t(P * I / kGroup));
  } else {
    grow(hf_, size_t(P * I));
  }
  if (!(c.y_type == ElemType::F32 && !c.accumulate)) grow(yacc_, size_t(B * H));

  pool_ = global_pool();
  const int most = pool_->size() + (caller_ ? 1 : 0);
  team_ = (team_req_ <= 0 || team_req_ > most) ? most : team_req_;
  // A caller job this small runs on the caller alone: splitting ~13 us of work (512 KiB of
  // weights from L2/L3) gains less than the pool round trip costs (~5 us on a free core, ~110 us
  // when the worker's core is busy, thread_pool.h). The demo model's decode layer is 8 experts
  // x 48 KiB; a K2.5 layer's is 8 x 24.8 MB.
  if (caller_ && int64_t(act_expert_.size()) * int64_t(layer_->expert_nbytes()) < int64_t(kChunkBytes) &&
      P * 3 * H * I < (int64_t(4) << 20))
    team_ = 1;
  const int64_t cu = std::max<int64_t>(1, int64_t(kChunkBytes / layer_->gate_up_unit_bytes()));
  const int64_t cd = std::max<int64_t>(1, int64_t(kChunkBytes / block_qweight_bytes(layer_->down_format(), I)));
  const size_t tmp_floats =
      size_t(std::max({kTokenTile * 4 * kRowBlock * cu, kTokenTile * kRowBlock * cd, H}));
  if (tmp_.size() < size_t(team_)) tmp_.resize(size_t(team_));
  for (int i = 0; i < team_; ++i) grow(tmp_[size_t(i)], tmp_floats);

  call_ = c;
  job_fault_ = std::move(fault_);
  fault_.clear();
  job_ = pool_->submit({[this](int tid, int team) { phase_prep(tid, team); },
                        [this](int tid, int team) { phase_gate_up(tid, team); },
                        [this](int tid, int team) { phase_down(tid, team); }},
                       team_, caller_);
}

void MoeOperator::sync() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!job_) return;
  ThreadPool::Handle job = std::move(job_);
  job_.reset();
  ThreadPool::wait(job);
  layer_->check_intact();  // a layer file that shrank under the job: an error, not a SIGBUS
}

// Phase 1: each token's activations -> fp32 -> (int8 once) -> its pair slots.
void MoeOperator::phase_prep(int tid, int team) {
  const int64_t H = layer_->hidden(), G = H / kGroup;
  auto [t0, t1] = pool_->split(call_.b, tid, team);
  float* row = tmp_[size_t(tid)].data();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t q0 = tok_start_[size_t(t)], q1 = tok_start_[size_t(t + 1)];
    if (q0 == q1) continue;
    if (call_.x_type == ElemType::BF16) {
      const uint16_t* xr = static_cast<const uint16_t*>(call_.x) + t * H;
      for (int64_t i = 0; i < H; ++i) row[i] = bf16_to_f32(xr[i]);
    } else {
      std::memcpy(row, static_cast<const float*>(call_.x) + t * H, size_t(H) * 4);
    }
    const int64_t first = tok_pairs_[size_t(q0)];
    if (int8_acts(true)) {
      table_.quantize_row_a8(row, H, &xq_[size_t(first * H)], &xs_[size_t(first * G)],
                             &xgs_[size_t(first * G)]);
      half_sums(&xq_[size_t(first * H)], H, &xhs_[size_t(first * G)]);
      for (int64_t q = q0 + 1; q < q1; ++q) {
        const int64_t p = tok_pairs_[size_t(q)];
        std::memcpy(&xq_[size_t(p * H)], &xq_[size_t(first * H)], size_t(H));
        std::memcpy(&xs_[size_t(p * G)], &xs_[size_t(first * G)], size_t(G) * 4);
        std::memcpy(&xgs_[size_t(p * G)], &xgs_[size_t(first * G)], size_t(G) * 4);
        std::memcpy(&xhs_[size_t(p * G)], &xhs_[size_t(first * G)], size_t(G) * 4);
      }
    } else {
      for (int64_t q = q0; q < q1; ++q)
        std::memcpy(&xf_[size_t(tok_pairs_[size_t(q)] * H)], row, size_t(H) * 4);
    }
  }
}

void MoeOperator::run_matmul(const PackedMatrix& w, int64_t b0, int64_t b1, int64_t p0, int64_t n,
                             bool hidden_side, float* out, int64_t ldo) const {
  const int64_t K = w.k, G = K / kGroup;
  if (int8_acts(hidden_side)) {
    QuantizedActs a;
    a.q = (hidden_side ? xq_.data() : hq_.data()) + p0 * K;
    a.scale = (hidden_side ? xs_.data() : hs_.data()) + p0 * G;
    a.gsum = (hidden_side ? xgs_.data() : hgs_.data()) + p0 * G;
    a.hsum = (hidden_side ? xhs_.data() : hhs_.data()) + p0 * G;
    a.t = n;
    a.k = K;
    a.ldq = K;
    table_.matmul_a8(w, b0, b1, a, out, ldo);
    return;
  }
  const float* x = (hidden_side ? xf_.data() : hf_.data()) + p0 * K;
  if (mode_ == ActMode::Fast && w.format == WeightFormat::BF16 && table_.matmul_a16)
    table_.matmul_a16(w, b0, b1, x, n, K, out, ldo);
  else
    table_.matmul_f32(w, b0, b1, x, n, K, out, ldo);
}

// Phase 2: h = SiLU(gate x) * (up x) for this thread's gate_up units of every active expert.
//
// Each NUMA node owns the same unit range of every expert (ThreadPool::node_share, which is also
// how pages were placed). Within a node, when there are at least as many units as threads, each
// thread takes an equal slice of every expert: balanced whatever the token counts. With more
// threads than units (many cores, narrow experts), the node's (expert, unit) items are instead
// dealt out by cost, a unit of expert a costing (n_a + kUnitBytesAsTokens): no thread idles.
void MoeOperator::phase_gate_up(int tid, int team) {
  if (!job_fault_.empty() && tid == team - 1) throw std::runtime_error(job_fault_);
  constexpr int64_t kUnitBytesAsTokens = 16;  // streaming a unit's weights ~ this many tokens
  const int64_t I = layer_->intermediate(), GI = I / kGroup;
  const int64_t cu = std::max<int64_t>(1, int64_t(kChunkBytes / layer_->gate_up_unit_bytes()));
  const bool split = layer_->split_gate_up();
  const ThreadPool::NodeShare ns = pool_->node_share(gate_up_units(I), tid, team);
  const int64_t len = ns.end - ns.begin;
  const bool by_expert = len >= ns.count;
  // Cost-dealt range [lo, hi) along the node's items, expert-major (used when !by_expert).
  int64_t total = 0;
  if (!by_expert)
    for (size_t a = 0; a < act_expert_.size(); ++a)
      total += len * (act_start_[a + 1] - act_start_[a] + kUnitBytesAsTokens);
  const int64_t lo = total * ns.rank / ns.count, hi = total * (ns.rank + 1) / ns.count;
  auto ceil_div = [](int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; };

  float* tmp = tmp_[size_t(tid)].data();
  float hbuf[kGroup];
  int64_t before = 0;  // cost of the node's items of experts < a
  for (size_t a = 0; a < act_expert_.size(); ++a) {
    const int64_t p0 = act_start_[a], n = act_start_[a + 1] - p0;
    int64_t u0, u1;
    if (by_expert) {
      u0 = ns.begin + len * ns.rank / ns.count;
      u1 = ns.begin + len * (ns.rank + 1) / ns.count;
    } else {  // items whose cost start falls in [lo, hi)
      const int64_t c = n + kUnitBytesAsTokens;
      u0 = ns.begin + std::min(len, ceil_div(lo - before, c));
      u1 = ns.begin + std::min(len, ceil_div(hi - before, c));
      before += len * c;
    }
    if (u0 >= u1) continue;
    // Interleaved gate_up: one call, blocks 4(u-uc) .. +3 of its output are gate 2u, up 2u, gate
    // 2u+1, up 2u+1. Split (gate and up of different formats): one call each, gate's output
    // [nt][32 (ue - uc)] and then up's.
    const int32_t ex = act_expert_[a];
    const PackedMatrix gu = split ? layer_->gate(ex) : layer_->gate_up(ex), up = split ? layer_->up(ex) : gu;
    const int64_t gate_step = split ? kRowBlock : 2 * kRowBlock;  // gate block 2u -> 2u+1 in the output
    for (int64_t uc = u0; uc < u1; uc += cu) {
      const int64_t ue = std::min(u1, uc + cu), ldo = (split ? 2 : 4) * kRowBlock * (ue - uc);
      for (int64_t s0 = 0; s0 < n; s0 += kTokenTile) {
        const int64_t nt = std::min(kTokenTile, n - s0);
        if (split) {
          run_matmul(gu, 2 * uc, 2 * ue, p0 + s0, nt, true, tmp, ldo);
          run_matmul(up, 2 * uc, 2 * ue, p0 + s0, nt, true, tmp + nt * ldo, ldo);
        } else {
          run_matmul(gu, 4 * uc, 4 * ue, p0 + s0, nt, true, tmp, ldo);
        }
        const int64_t up_at = split ? nt * ldo : kRowBlock;  // up's block beside its gate block
        for (int64_t i = 0; i < nt; ++i) {
          const int64_t p = p0 + s0 + i;
          for (int64_t u = uc; u < ue; ++u) {
            const float* o = tmp + i * ldo + 2 * gate_step * (u - uc);  // gate block 2u
            for (int half = 0; half < 2; ++half)
              for (int r = 0; r < kRowBlock; ++r)
                hbuf[half * kRowBlock + r] = silu(o[half * gate_step + r]) * o[half * gate_step + up_at + r];
            if (int8_acts(false)) {
              table_.quantize_row_a8(hbuf, kGroup, &hq_[size_t(p * I + u * kGroup)],
                                     &hs_[size_t(p * GI + u)], &hgs_[size_t(p * GI + u)]);
              half_sums(&hq_[size_t(p * I + u * kGroup)], kGroup, &hhs_[size_t(p * GI + u)]);
            } else {
              std::memcpy(&hf_[size_t(p * I + u * kGroup)], hbuf, sizeof(hbuf));
            }
          }
        }
      }
    }
  }
}

// Phase 3: this thread's H row blocks of y, summed over all active experts' down projections.
void MoeOperator::phase_down(int tid, int team) {
  const int64_t H = layer_->hidden(), I = layer_->intermediate(), B = call_.b;
  const int64_t cd = std::max<int64_t>(1, int64_t(kChunkBytes / block_qweight_bytes(layer_->down_format(), I)));
  auto [d0, d1] = pool_->split(down_units(H), tid, team);
  const int64_t c0 = d0 * kRowBlock, c1 = d1 * kRowBlock;
  const bool direct = call_.y_type == ElemType::F32 && !call_.accumulate;
  float* acc = direct ? static_cast<float*>(call_.y) : yacc_.data();
  for (int64_t t = 0; t < B; ++t) std::fill(acc + t * H + c0, acc + t * H + c1, 0.f);
  float* tmp = tmp_[size_t(tid)].data();
  for (size_t a = 0; a < act_expert_.size(); ++a) {
    const PackedMatrix dn = layer_->down(act_expert_[a]);
    const int64_t p0 = act_start_[a], n = act_start_[a + 1] - p0;
    for (int64_t dc = d0; dc < d1; dc += cd) {
      const int64_t de = std::min(d1, dc + cd), ldo = kRowBlock * (de - dc);
      for (int64_t s0 = 0; s0 < n; s0 += kTokenTile) {
        const int64_t nt = std::min(kTokenTile, n - s0);
        run_matmul(dn, dc, de, p0 + s0, nt, false, tmp, ldo);
        for (int64_t i = 0; i < nt; ++i) {
          const int64_t p = p0 + s0 + i;
          const float w = pair_weight_[size_t(p)];
          float* yr = acc + int64_t(pair_token_[size_t(p)]) * H + dc * kRowBlock;
          const float* o = tmp + i * ldo;
          for (int64_t col = 0; col < ldo; ++col) yr[col] += w * o[col];
        }
      }
    }
  }
  if (direct) return;
  for (int64_t t = 0; t < B; ++t) {
    const float* src = acc + t * H;
    if (call_.y_type == ElemType::F32) {
      float* y = static_cast<float*>(call_.y) + t * H;
      for (int64_t col = c0; col < c1; ++col) y[col] += src[col];
    } else {
      uint16_t* y = static_cast<uint16_t*>(call_.y) + t * H;
      for (int64_t col = c0; col < c1; ++col)
        y[col] = f32_to_bf16(call_.accumulate ? bf16_to_f32(y[col]) + src[col] : src[col]);
    }
  }
}

}  // namespace hybrid
