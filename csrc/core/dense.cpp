// dense.cpp: see dense.h.
#include "core/dense.h"

#include <algorithm>
#include <vector>

namespace hybrid {
namespace {

constexpr int64_t kSplitRows = 16;    // rows per work unit of the pool split (one cache line of fp32 out)
constexpr int64_t kChunkRows = 32;    // bf16 out: rows per fp32 scratch tile
constexpr int64_t kChunkTokens = 32;  // bf16 out: tokens per fp32 scratch tile (32 x 32 x 4 B = 4 KiB)
constexpr int64_t kPackedChunkRows = 256;  // dense_packed, bf16 out: rows per fp32 scratch [T][256]

// Rows [r0, r1) for all tokens through kern(c0, c1, x, tc, out, ldo) (a KernelTable GEMV over
// rows [c0, c1)), each row's sums times scale[row] when scale is given. fp32 out: the kernel
// writes straight into out (then scaled in place). bf16 out: the kernel fills a small fp32
// scratch tile (stack, L1) that is scaled and rounded once into out; a tile is 32 rows so that
// for T > 32 the re-read rows (32 x K x 2 B, 1.2 MiB at K = 18432) stay in L2.
template <class Kern>
void gemv_rows(const Kern& kern, const float* scale, int64_t r0, int64_t r1, const uint16_t* x, int64_t t,
               int64_t ldx, void* out, int64_t ldo, bool out_bf16) {
  if (!out_bf16) {
    float* o = static_cast<float*>(out) + r0;
    kern(r0, r1, x, t, o, ldo);
    if (scale != nullptr)
      for (int64_t tt = 0; tt < t; ++tt)
        for (int64_t r = r0; r < r1; ++r) o[tt * ldo + (r - r0)] *= scale[r];
    return;
  }
  uint16_t* ob = static_cast<uint16_t*>(out);
  float scratch[kChunkTokens * kChunkRows];  // [tokens][rows]
  for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
    const int64_t c1 = std::min(r1, c0 + kChunkRows), rows = c1 - c0;
    for (int64_t t0 = 0; t0 < t; t0 += kChunkTokens) {
      const int64_t tc = std::min(t - t0, kChunkTokens);
      kern(c0, c1, x + t0 * ldx, tc, scratch, rows);
      for (int64_t i = 0; i < tc; ++i)
        for (int64_t r = 0; r < rows; ++r) {
          const float v = scratch[i * rows + r];
          ob[(t0 + i) * ldo + c0 + r] = f32_to_bf16(scale != nullptr ? v * scale[c0 + r] : v);
        }
    }
  }
}

// Threads for a matrix of `weight_bytes` in `units` work units: the caller + pool workers, at most
// one per unit, and the caller alone without a pool or under kDenseParallelMinBytes.
int team_for(const ThreadPool* pool, int64_t units, int64_t weight_bytes) {
  if (pool == nullptr || weight_bytes < kDenseParallelMinBytes) return 1;
  return int(std::min<int64_t>(sync_team(*pool), units));
}

// Rows [0, n) in units of kSplitRows over a caller job of the pool, or inline (see dense_gemv).
template <class Rows>
void split_rows(ThreadPool* pool, int64_t n, int64_t weight_bytes, const Rows& rows) {
  const int64_t units = (n + kSplitRows - 1) / kSplitRows;
  const int team = team_for(pool, units, weight_bytes);
  if (team <= 1) {
    rows(0, n);
    return;
  }
  // A caller job: the calling thread, which would otherwise only wait, takes the last share and
  // team - 1 workers the others (thread_pool.h: a waiting caller and a spinning worker fight for
  // a core when the pool has one worker per core).
  pool->run({[&](int tid, int team_size) {
               auto [u0, u1] = pool->split(units, tid, team_size);
               const int64_t r0 = u0 * kSplitRows, r1 = std::min(n, u1 * kSplitRows);
               if (r0 < r1) rows(r0, r1);
             }},
            team, /*caller=*/true);
}

}  // namespace

// Where the pool starts to pay. One thread streams a bf16 matrix at ~40 GB/s from L2 and ~20 GB/s
// from L3 / ~13 GB/s from RAM (T = 1, measured on the 2-vCPU Sapphire Rapids KVM guest), so
// 256 KiB takes ~6.5 us inline and 512 KiB ~13 us. A caller job's round trip with a free core
// for the worker is ~4-7 us (thread_pool.h; 1 worker + caller), so halving the work gains nothing
// at 256 KiB and ~1.2x at 512 KiB, ~1.4x at 1 MiB. When the worker's core is busy (another
// process, or more pool threads than free cores) the round trip measured ~110 us and the pool
// only paid from ~4 MiB; callers on such machines should pass threads=False.
// The demo model's decode settled it at 4 MiB: with its 2 MiB LM head split over the caller and
// one worker, 2-thread steps on this guest swung between 1.2 and 2.2 ms (the worker, asleep
// between steps, wakes late on a KVM vCPU; spinning longer made it worse, the two vCPUs behave
// like one core's hyperthreads), against a steady 1.2-1.4 ms inline. K2.5's matrices are
// 1.1-264 MiB, all but kv_a (8 MiB) far above.
const int64_t kDenseParallelMinBytes = int64_t(4) << 20;

void dense_gemv(const KernelTable& kt, ThreadPool* pool, const uint16_t* w, int64_t ldw, int64_t n,
                int64_t k, const uint16_t* x, int64_t t, int64_t ldx, void* out, int64_t ldo,
                bool out_bf16) {
  auto kern = [&](int64_t c0, int64_t c1, const uint16_t* xs, int64_t tc, float* o, int64_t ld) {
    kt.gemv_bf16(w, ldw, c0, c1, k, xs, tc, ldx, o, ld);
  };
  split_rows(pool, n, n * k * 2, [&](int64_t r0, int64_t r1) {
    gemv_rows(kern, nullptr, r0, r1, x, t, ldx, out, ldo, out_bf16);
  });
}

void dense_gemv_i8(const KernelTable& kt, ThreadPool* pool, const int8_t* w, int64_t ldw, const float* scale,
                   int64_t n, int64_t k, const uint16_t* x, int64_t t, int64_t ldx, void* out, int64_t ldo,
                   bool out_bf16) {
  auto kern = [&](int64_t c0, int64_t c1, const uint16_t* xs, int64_t tc, float* o, int64_t ld) {
    kt.gemv_i8(w, ldw, c0, c1, k, xs, tc, ldx, o, ld);
  };
  split_rows(pool, n, n * k, [&](int64_t r0, int64_t r1) {
    gemv_rows(kern, scale, r0, r1, x, t, ldx, out, ldo, out_bf16);
  });
}

void dense_packed(const KernelTable& kt, ThreadPool* pool, const PackedMatrix& w, int64_t packed_bytes,
                  const uint16_t* x, int64_t t, int64_t ldx, void* out, int64_t ldo, bool out_bf16) {
  const int64_t k = w.k, ng = k / kGroup, units = w.n / kSplitRows;
  std::vector<int8_t> q(size_t(t * k));
  std::vector<float> sc(size_t(t * ng));
  std::vector<int32_t> gs(size_t(t * ng)), hs(size_t(t * ng));
  const QuantizedActs a{q.data(), sc.data(), gs.data(), t, k, k, hs.data()};
  auto quantize = [&](int64_t t0, int64_t t1) {
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t tt = t0; tt < t1; ++tt) {
      const uint16_t* xr = x + tt * ldx;
      for (int64_t i = 0; i < k; ++i) row[size_t(i)] = bf16_to_f32(xr[i]);
      kt.quantize_row_a8(row.data(), k, &q[size_t(tt * k)], &sc[size_t(tt * ng)], &gs[size_t(tt * ng)]);
      half_sums(&q[size_t(tt * k)], k, &hs[size_t(tt * ng)]);
    }
  };
  // Rows [r0, r1) (multiples of 16): fp32 out straight from the kernel; bf16 out through an fp32
  // scratch of kPackedChunkRows x all tokens, rounded once.
  auto rows = [&](int64_t r0, int64_t r1) {
    if (!out_bf16) {
      kt.matmul_a8(w, r0 / kRowBlock, r1 / kRowBlock, a, static_cast<float*>(out) + r0, ldo);
      return;
    }
    uint16_t* ob = static_cast<uint16_t*>(out);
    std::vector<float> scratch(size_t(t * std::min(kPackedChunkRows, r1 - r0)));
    for (int64_t c0 = r0; c0 < r1; c0 += kPackedChunkRows) {
      const int64_t c1 = std::min(r1, c0 + kPackedChunkRows), nr = c1 - c0;
      kt.matmul_a8(w, c0 / kRowBlock, c1 / kRowBlock, a, scratch.data(), nr);
      for (int64_t tt = 0; tt < t; ++tt)
        for (int64_t r = 0; r < nr; ++r) ob[tt * ldo + c0 + r] = f32_to_bf16(scratch[size_t(tt * nr + r)]);
    }
  };
  const int team = team_for(pool, units, packed_bytes);
  if (team <= 1) {
    quantize(0, t);
    rows(0, w.n);
    return;
  }
  pool->run({[&](int tid, int team_size) {
               auto [t0, t1] = pool->split(t, tid, team_size);
               quantize(t0, t1);
             },
             [&](int tid, int team_size) {
               auto [u0, u1] = pool->split(units, tid, team_size);
               if (u0 < u1) rows(u0 * kSplitRows, u1 * kSplitRows);
             }},
            team, /*caller=*/true);
}

}  // namespace hybrid
