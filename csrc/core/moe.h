// moe.h: the fused CPU MoE operator for one layer's routed experts.
//
// Legend: B tokens, K picks per token, E experts, H hidden, I expert intermediate,
// P distinct (token, expert) pairs that run here (picks of masked experts are dropped; a token
// picking one expert twice is one pair with the summed weight), A active experts.
//
//   y[b, :] (+)= sum_k weights[b, k] * down_e( SiLU(gate_e x[b]) * up_e x[b] ),  e = ids[b, k]
//
// Work is grouped by expert: submit() (in the caller's thread, O(B*K)) builds the pair list
// ordered by expert, then one pool job of three phases runs:
//   1 prep     threads split the B tokens: each token's activations are converted to fp32 and,
//              in fast mode, quantised to int8 once, then copied to the token's pair slots.
//   2 gate_up  threads split each active expert's gate_up units (32 h columns = 4 packed blocks)
//              and compute SiLU(g) * u right after the kernel call (gate and up blocks are
//              interleaved); in fast mode h is quantised per 32-group in the same pass. (With
//              more threads on a node than units, the node's (expert, unit) items are dealt out
//              by cost instead, see phase_gate_up.)
//   3 down     threads split the H row blocks; each loops over all active experts and adds
//              w * (down_e h) into its own y columns: one writer per y element, no atomics.
// Every thread reads its slice of every selected expert's bytes exactly once per token tile:
// with at most kTokenTile tokens per expert (decode) that is the GEMV path, weights streamed at
// full bandwidth; with more (prefill) a weight chunk of ~kChunkBytes stays in L2 while token
// tiles run over it: the GEMM path. Thread slices follow ThreadPool::split() and the unit
// definitions of packed_layer.h, which is also how pages were placed on NUMA nodes.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/kernels.h"
#include "core/packed_layer.h"
#include "core/thread_pool.h"

namespace hybrid {

enum class ActMode : int { Fast = 0, Precise = 1 };
enum class ElemType : int { F32 = 0, BF16 = 1, I32 = 2, I64 = 3 };

struct MoeCall {
  const void* x = nullptr;          // [B, H] F32 or BF16, contiguous
  ElemType x_type = ElemType::F32;
  const void* ids = nullptr;        // [B, K] I32 or I64
  ElemType ids_type = ElemType::I32;
  const float* weights = nullptr;   // [B, K]
  const uint8_t* skip = nullptr;    // [E], nonzero: expert runs elsewhere; nullptr: none
  void* y = nullptr;                // [B, H] F32 or BF16
  ElemType y_type = ElemType::F32;
  bool accumulate = false;          // y += result instead of y = result
  int64_t b = 0, k = 0;
};

class MoeOperator {
 public:
  static constexpr int64_t kTokenTile = 64;            // tokens per kernel call
  static constexpr size_t kChunkBytes = 512u << 10;    // weight bytes per kernel call (L2)

  // `team`: threads of the pool this operator uses (<= 0: all of them). `isa`: "" = the
  // process's active ISA (HYBRID_ISA or the best one), else a named one (tests).
  // `caller`: the thread that calls sync() computes a share too (ThreadPool::submit's caller
  // jobs), so `team` counts it and the pool needs one worker fewer; for synchronous use on a
  // CPU-only machine, where that thread would otherwise only wait.
  MoeOperator(std::shared_ptr<PackedLayer> layer, ActMode mode, int team, const std::string& isa,
              bool caller = false);
  ~MoeOperator();  // waits for a pending job (the job uses this operator's buffers)

  // Starts the job and returns. Throws std::invalid_argument for bad ids, std::logic_error when a
  // job of this operator is still pending (call sync() first).
  void submit(const MoeCall& call);
  // Waits for the pending job; rethrows a worker exception as std::runtime_error, and throws one
  // when the layer's file shrank while mapped (PackedLayer::check_intact). No-op when nothing is
  // pending.
  void sync();
  bool pending() const;

  // Tests only: the next submitted job throws std::runtime_error(message) from one worker in its
  // gate_up phase, which is how tests check that worker errors come back at sync().
  void inject_fault(const std::string& message);

  const std::string& isa() const { return isa_; }
  ActMode mode() const { return mode_; }
  const PackedLayer& layer() const { return *layer_; }

 private:
  void phase_prep(int tid, int team);
  void phase_gate_up(int tid, int team);
  void phase_down(int tid, int team);
  // Fast mode with integer weights on that side (gate_up: x, down: h): its activations go through
  // quantize_row_a8. The two sides may differ (a GGUF layer's down often has its own type).
  bool int8_acts(bool hidden_side) const;
  void run_matmul(const PackedMatrix& w, int64_t b0, int64_t b1, int64_t p0, int64_t n,
                  bool hidden_side, float* out, int64_t ldo) const;

  std::shared_ptr<PackedLayer> layer_;
  ActMode mode_;
  int team_req_;
  bool caller_ = false;
  std::string isa_;
  KernelTable table_;
  std::shared_ptr<ThreadPool> pool_;   // the pool the pending job runs on
  ThreadPool::Handle job_;
  mutable std::mutex mu_;

  // The call being run and its routing (valid while a job is pending).
  MoeCall call_;
  int team_ = 1;
  std::string fault_, job_fault_;       // inject_fault(): armed, and for the running job
  std::vector<int32_t> act_expert_;     // [A] active experts, ascending
  std::vector<int64_t> act_start_;      // [A + 1] first pair of each active expert
  std::vector<int32_t> pair_token_;     // [P]
  std::vector<float> pair_weight_;      // [P]
  std::vector<int64_t> tok_start_;      // [B + 1] token -> its pairs in tok_pairs_
  std::vector<int64_t> tok_pairs_;      // [P]

  // Scratch, grown as needed and reused.
  std::vector<int8_t> xq_, hq_;         // [P, H], [P, I] int8 activations (fast, INT weights)
  std::vector<float> xs_, hs_;          // [P, H/32], [P, I/32] their scales
  std::vector<int32_t> xgs_, hgs_;      // [P, H/32], [P, I/32] their group sums
  std::vector<int32_t> xhs_, hhs_;      // [P, H/32], [P, I/32] their half sums (kernels.h, K types)
  std::vector<float> xf_, hf_;          // [P, H], [P, I] fp32 activations (other modes)
  std::vector<float> yacc_;             // [B, H] when y is not an fp32 overwrite
  std::vector<std::vector<float>> tmp_; // per thread: kernel output tile, row buffer
};

}  // namespace hybrid
