// bandwidth.h: RAM read-bandwidth probe. Reads a buffer much larger than the last-level cache
// with the pool's threads, the same page policy as packed layers (2 MiB aligned, MADV_HUGEPAGE,
// first touch by the thread that later reads it), and reports GB/s (1e9 bytes per second).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace hybrid {

class ThreadPool;

struct BandwidthResult {
  double gbps = 0;              // median over repeats
  std::vector<double> runs;     // GB/s of each repeat
  size_t bytes = 0;             // bytes read per repeat
  int threads = 0;
  bool hugepage_advised = false;  // madvise(MADV_HUGEPAGE) accepted
};

// bytes >= 1 MiB (rounded down to 4 KiB per thread), repeats >= 1. Throws std::invalid_argument /
// std::runtime_error (allocation).
BandwidthResult measure_read_bandwidth(ThreadPool& pool, size_t bytes, int repeats);

// The read rate of memory that already holds data (a packed layer's experts): each region split
// over the pool's threads by pages, as the probe splits its buffer, nothing written or allocated.
// It answers whether a kernel that streams these bytes is slow, or the pages it streams are (the
// probe's fresh buffer may land on faster or slower physical memory than a layer packed earlier).
// Regions: 4 KiB aligned, sizes 4 KiB multiples (std::invalid_argument otherwise). gbps is the
// median over repeats of all regions' bytes per second; hugepage_advised is false (not asked).
struct ReadRegion {
  const uint8_t* data;
  size_t bytes;
};
BandwidthResult measure_region_read_bandwidth(ThreadPool& pool, const std::vector<ReadRegion>& regions,
                                              int repeats);

}  // namespace hybrid
