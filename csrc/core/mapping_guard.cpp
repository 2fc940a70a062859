// mapping_guard.cpp: see mapping_guard.h.
#include "core/mapping_guard.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <mutex>

namespace hybrid {
namespace {

struct Slot {
  std::atomic<bool> used{false};            // claimed by a guard
  std::atomic<uintptr_t> begin{0}, end{0};  // end == 0: nothing guarded here
  std::atomic<bool> faulted{false};
};

Slot g_slots[kMaxGuardedRanges];
std::atomic<int> g_high{0};  // slots [0, g_high) may be in use
struct sigaction g_previous {};
std::mutex g_install_mu;
bool g_installed = false;

void chain(int sig, siginfo_t* info, void* ctx) {
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction != nullptr) return g_previous.sa_sigaction(sig, info, ctx);
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    return g_previous.sa_handler(sig);
  }
  // Default action: restore it and return; the faulting instruction runs again and the fault
  // then ends the process with SIGBUS, as it would have without us.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(sig, &dfl, nullptr);
  if (info == nullptr || info->si_code <= 0) raise(sig);  // sent, not a fault: deliver it now
}

// A SIGBUS this process sent itself, not a fault: Python's faulthandler, enabled after our handler,
// runs first on a fault, then restores ours and re-raises. Returning lets the faulting read run
// again, and that fault comes to us.
bool sent_by_this_process(const siginfo_t* info) {
  return info != nullptr && info->si_code <= 0 && info->si_pid == getpid();
}

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  if (info != nullptr && info->si_code > 0) {  // a fault (BUS_ADRERR), not a kill()
    const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
    const int high = g_high.load(std::memory_order_acquire);
    for (int i = 0; i < high; ++i) {
      Slot& s = g_slots[i];
      const uintptr_t b = s.begin.load(std::memory_order_acquire), e = s.end.load(std::memory_order_acquire);
      if (e == 0 || a < b || a >= e) continue;
      const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
      const uintptr_t from = a & ~(page - 1);
      // Zeros from the faulting page to the end of the range: a file only shrinks from its end.
      void* p = mmap(reinterpret_cast<void*>(from), e - from, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                     -1, 0);
      if (p == MAP_FAILED) break;  // cannot repair: let the fault take its course
      s.faulted.store(true, std::memory_order_release);
      return;
    }
  }
  if (sent_by_this_process(info)) return;
  chain(sig, info, ctx);
}

void install_once() {
  std::lock_guard<std::mutex> lock(g_install_mu);
  if (g_installed) return;
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, &sa, &g_previous) == 0) g_installed = true;
}

}  // namespace

MappingGuard::MappingGuard(const void* begin, size_t bytes) {
  if (bytes == 0) return;
  install_once();
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin);
  for (int i = 0; i < kMaxGuardedRanges; ++i) {
    Slot& s = g_slots[i];
    if (s.used.exchange(true, std::memory_order_acq_rel)) continue;
    s.begin.store(b, std::memory_order_relaxed);
    s.faulted.store(false, std::memory_order_relaxed);
    s.end.store(b + bytes, std::memory_order_release);  // the handler reads end, then begin
    int high = g_high.load();
    while (high < i + 1 && !g_high.compare_exchange_weak(high, i + 1)) {
    }
    slot_ = i;
    return;
  }
}

MappingGuard::~MappingGuard() {
  if (slot_ < 0) return;
  g_slots[slot_].end.store(0, std::memory_order_release);
  g_slots[slot_].used.store(false, std::memory_order_release);
}

bool MappingGuard::faulted() const {
  return slot_ >= 0 && g_slots[slot_].faulted.load(std::memory_order_acquire);
}

}  // namespace hybrid
