// mapping_guard.h: a file mapping that shrinks under us (the file truncated, or rewritten in
// place, while mapped) is an error at the next check, not a SIGBUS.
//
// Reading a page of a MAP_SHARED file mapping past the file's current end raises SIGBUS. Checking
// the size at open cannot prevent that (the file may shrink later), and copying every read
// through a checked buffer would cost the decode path its bandwidth. So a guarded range gets a
// process-wide SIGBUS handler: a fault inside it maps anonymous zero pages over the rest of the
// range (the reading kernel then finishes on zeros instead of dying) and marks the range
// faulted; the owner checks faulted() after each job and throws, naming the file. A SIGBUS
// outside every guarded range goes to the handler that was installed before ours (Python's
// faulthandler, or the default action: the process dies as it would have).
//
// The handler is installed when the first range is guarded (never at load time); ranges are
// kept in a fixed table of kMaxGuardedRanges slots (a range that finds no free slot is simply not
// guarded). Async-signal-safe: the handler reads atomics and calls mmap only.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace hybrid {

constexpr int kMaxGuardedRanges = 4096;

class MappingGuard {
 public:
  MappingGuard() = default;
  MappingGuard(const void* begin, size_t bytes);  // guard [begin, begin + bytes), page aligned
  ~MappingGuard();
  MappingGuard(const MappingGuard&) = delete;
  MappingGuard& operator=(const MappingGuard&) = delete;

  bool guarded() const { return slot_ >= 0; }
  bool faulted() const;  // a read in the range hit a page past the file's end

 private:
  int slot_ = -1;
};

}  // namespace hybrid
