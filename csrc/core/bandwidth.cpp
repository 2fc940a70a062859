// bandwidth.cpp: see bandwidth.h.
#include "core/bandwidth.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include <immintrin.h>

#include "core/dispatch.h"
#include "core/thread_pool.h"

namespace hybrid {
namespace {

// Eight independent accumulators so the loads are not serialised by one add chain; plain C++
// that the baseline (SSE2) compiler vectorises. Returns the sum so the reads cannot be dropped.
uint64_t read_sum(const uint64_t* p, size_t words) {
  uint64_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= words; i += 8)
    for (int j = 0; j < 8; ++j) a[j] += p[i + size_t(j)];
  for (; i < words; ++i) a[0] += p[i];
  return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

// The decode kernels read weights with 64-byte (zmm) or 32-byte (ymm) loads; a 16-byte SSE2
// loop reads measurably slower (15-45% here), which would make the kernels look faster than the
// machine. These variants use the widest load the CPU and OS allow, picked at run time through
// dispatch.h (function-level target attributes: no ISA flag leaks into the rest of the file).
// `words` is a multiple of 512 (whole 4 KiB pages).
__attribute__((target("avx512f"))) uint64_t read_sum_avx512(const uint64_t* p, size_t words) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < words; i += 32) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 8));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 16));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 24));
  }
  // The lanes summed through memory: GCC 12 warns on _mm512_reduce_add_epi64's undefined-source
  // extract ("'__Y' is used uninitialized").
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
  uint64_t sum = 0;
  for (uint64_t v : lanes) sum += v;
  return sum;
}

__attribute__((target("avx2"))) uint64_t read_sum_avx2(const uint64_t* p, size_t words) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < words; i += 16) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

using ReadFn = uint64_t (*)(const uint64_t*, size_t);

ReadFn widest_reader() {
  if (isa_unavailable_reason("avx512").empty()) return read_sum_avx512;
  if (isa_unavailable_reason("avx2").empty()) return read_sum_avx2;
  return read_sum;
}

}  // namespace

BandwidthResult measure_read_bandwidth(ThreadPool& pool, size_t bytes, int repeats) {
  if (bytes < (1u << 20)) throw std::invalid_argument("nbytes must be >= 1 MiB, got " + std::to_string(bytes));
  if (repeats < 1) throw std::invalid_argument("repeats must be >= 1, got " + std::to_string(repeats));
  constexpr size_t kHuge = 2u << 20;
  size_t total = bytes + kHuge;
  void* raw = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED)
    throw std::runtime_error("cannot allocate " + std::to_string(bytes) + " bytes for the bandwidth probe");
  struct Unmap { void* p; size_t n; ~Unmap() { munmap(p, n); } } unmap{raw, total};
  auto* buf = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + kHuge - 1) / kHuge * kHuge);

  BandwidthResult res;
  res.hugepage_advised = madvise(buf, bytes, MADV_HUGEPAGE) == 0;
  res.threads = pool.size();
  const size_t pages = bytes / 4096;
  res.bytes = pages * 4096;

  // First touch by the reading thread (same split as the read), so each node reads local pages.
  pool.run({[&](int tid, int team) {
    auto [p0, p1] = pool.split(int64_t(pages), tid, team);
    std::memset(buf + size_t(p0) * 4096, int(tid + 1), size_t(p1 - p0) * 4096);
  }});

  const ReadFn reader = widest_reader();
  std::atomic<uint64_t> sink{0};
  for (int r = 0; r < repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    pool.run({[&](int tid, int team) {
      auto [p0, p1] = pool.split(int64_t(pages), tid, team);
      sink.fetch_add(reader(reinterpret_cast<const uint64_t*>(buf + size_t(p0) * 4096),
                              size_t(p1 - p0) * 512),
                     std::memory_order_relaxed);
    }});
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    res.runs.push_back(double(res.bytes) / s / 1e9);
  }
  std::vector<double> sorted = res.runs;
  std::sort(sorted.begin(), sorted.end());
  res.gbps = sorted[sorted.size() / 2];
  if (sink.load() == 0x5eed) res.gbps += 0;  // keep `sink` observable
  return res;
}

BandwidthResult measure_region_read_bandwidth(ThreadPool& pool, const std::vector<ReadRegion>& regions,
                                              int repeats) {
  if (repeats < 1) throw std::invalid_argument("repeats must be >= 1, got " + std::to_string(repeats));
  if (regions.empty()) throw std::invalid_argument("no regions to read");
  BandwidthResult res;
  res.threads = pool.size();
  for (size_t i = 0; i < regions.size(); ++i) {
    const ReadRegion& r = regions[i];
    if (reinterpret_cast<uintptr_t>(r.data) % 4096 || r.bytes % 4096 || r.bytes == 0)
      throw std::invalid_argument("region " + std::to_string(i) + ": start and size must be non-zero 4 KiB "
                                  "multiples (got size " + std::to_string(r.bytes) + ")");
    res.bytes += r.bytes;
  }
  const ReadFn reader = widest_reader();
  std::atomic<uint64_t> sink{0};
  for (int rep = 0; rep < repeats; ++rep) {
    auto start = std::chrono::steady_clock::now();
    pool.run({[&](int tid, int team) {
      uint64_t s = 0;
      for (const ReadRegion& r : regions) {
        auto [p0, p1] = pool.split(int64_t(r.bytes / 4096), tid, team);
        s += reader(reinterpret_cast<const uint64_t*>(r.data + size_t(p0) * 4096), size_t(p1 - p0) * 512);
      }
      sink.fetch_add(s, std::memory_order_relaxed);
    }});
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    res.runs.push_back(double(res.bytes) / s / 1e9);
  }
  std::vector<double> sorted = res.runs;
  std::sort(sorted.begin(), sorted.end());
  res.gbps = sorted[sorted.size() / 2];
  if (sink.load() == 0x5eed) res.gbps += 0;  // keep `sink` observable
  return res;
}

}  // namespace hybrid
