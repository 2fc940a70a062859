// thread_pool.cpp: see thread_pool.h.
#include "core/thread_pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <map>
#include <new>
#include <set>
#include <sstream>
#include <stdexcept>
#include <system_error>

namespace hybrid {
namespace {

constexpr int kSpinMicros = 50;  // spin this long before sleeping on the futex

void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}

inline void cpu_relax() { __builtin_ia32_pause(); }

// Spin (bounded by time), then sleep, until `word` differs from `seen` or ready() holds.
template <class Ready>
void wait_until(std::atomic<uint32_t>& word, Ready ready) {
  auto start = std::chrono::steady_clock::now();
  for (int i = 0;; ++i) {
    if (ready()) return;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() - start >
                              std::chrono::microseconds(kSpinMicros))
      break;
  }
  for (;;) {
    uint32_t seen = word.load(std::memory_order_acquire);
    if (ready()) return;
    futex_wait(&word, seen);
  }
}

std::vector<int> parse_cpulist(const std::string& s) {  // "0-3,8,10-11"
  std::vector<int> out;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (part.empty() || part == "\n") continue;
    size_t dash = part.find('-');
    try {
      int a = std::stoi(part.substr(0, dash));
      int b = dash == std::string::npos ? a : std::stoi(part.substr(dash + 1));
      for (int c = a; c <= b; ++c) out.push_back(c);
    } catch (const std::exception&) {
      return {};
    }
  }
  return out;
}

int read_int(const std::string& path, int fallback) {
  std::ifstream f(path);
  int v;
  return (f >> v) ? v : fallback;
}

}  // namespace

CpuTopology detect_topology() {
  CpuTopology t;
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> allowed;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) allowed.push_back(c);
  }
  if (allowed.empty()) {
    unsigned n = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned c = 0; c < n; ++c) allowed.push_back(int(c));
  }

  std::map<int, int> node_of_cpu;
  for (int node = 0; node < 1024; ++node) {
    std::ifstream f("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist");
    if (!f) continue;
    std::string line;
    std::getline(f, line);
    for (int c : parse_cpulist(line)) node_of_cpu[c] = node;
  }

  // First logical CPU of each physical core (package, core_id), then the siblings.
  std::set<std::pair<int, int>> seen;
  std::vector<int> primary, siblings;
  for (int c : allowed) {
    std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
    auto key = std::make_pair(read_int(base + "physical_package_id", 0),
                              read_int(base + "core_id", c));
    (seen.insert(key).second ? primary : siblings).push_back(c);
  }
  t.physical_cores = int(primary.size());

  // Round-robin over nodes within each list so a team of the first n workers spreads over nodes.
  auto interleave = [&](const std::vector<int>& cpus) {
    std::map<int, std::vector<int>> by_node;
    for (int c : cpus) by_node[node_of_cpu.count(c) ? node_of_cpu[c] : 0].push_back(c);
    std::vector<int> out;
    for (size_t i = 0; out.size() < cpus.size(); ++i)
      for (auto& [node, list] : by_node)
        if (i < list.size()) out.push_back(list[i]);
    return out;
  };
  for (int c : interleave(primary)) t.cpus.push_back(c);
  for (int c : interleave(siblings)) t.cpus.push_back(c);
  std::set<int> nodes;
  for (int c : t.cpus) {
    int n = node_of_cpu.count(c) ? node_of_cpu[c] : 0;
    t.node_of.push_back(n);
    nodes.insert(n);
  }
  t.node_ids.assign(nodes.begin(), nodes.end());
  t.num_nodes = int(nodes.size());
  return t;
}

int default_threads() {
  if (const char* env = std::getenv("HYBRID_NUM_THREADS")) {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v > 0 && v <= kMaxThreads) return int(v);
    throw std::invalid_argument(std::string("HYBRID_NUM_THREADS='") + env +
                                "' is not a thread count (an integer in 1.." + std::to_string(kMaxThreads) + ")");
  }
  return std::max(1, detect_topology().physical_cores);
}

ThreadPool::ThreadPool(int threads) : topo_(detect_topology()) {
  if (threads > kMaxThreads)
    throw std::invalid_argument("threads must be at most " + std::to_string(kMaxThreads) + ", got " +
                                std::to_string(threads));
  if (threads <= 0) threads = std::max(1, topo_.physical_cores);
  for (int i = 0; i < threads; ++i) {
    size_t slot = size_t(i) % topo_.cpus.size();
    worker_cpu_.push_back(topo_.cpus[slot]);
    worker_node_.push_back(topo_.node_of[slot]);
  }
  workers_.reserve(size_t(threads));
  for (int i = 0; i < threads; ++i) {
    try {
      workers_.emplace_back([this, i] { worker_main(i); });
    } catch (const std::system_error& e) {  // the destructor does not run for a throwing ctor
      stop_workers();
      throw std::runtime_error("cannot start worker thread " + std::to_string(i + 1) + " of " +
                               std::to_string(threads) + ": " + e.what() +
                               " (ask for fewer threads, or raise the process's thread or memory limit)");
    }
  }
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
  stop_.store(true);
  epoch_.fetch_add(1);
  futex_wake_all(&epoch_);
  for (auto& w : workers_) w.join();
}

ThreadPool::Handle ThreadPool::submit(std::vector<Phase> phases, int team, bool caller) {
  auto job = std::make_shared<Job>();
  job->phases = std::move(phases);
  const int most = size() + (caller ? 1 : 0);
  job->team = (team <= 0 || team > most) ? most : team;
  job->caller = caller;
  job->pool = this;
  if (caller && job->team == 1) {  // the caller alone: no queue, no wake-up (wait() runs it)
    job->remaining.store(1);
    return job;
  }
  job->remaining.store(size() + (caller ? 1 : 0));
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(job);
    published_.store(base_seq_ + queue_.size() - 1, std::memory_order_release);
  }
  epoch_.fetch_add(1, std::memory_order_release);
  futex_wake_all(&epoch_);
  return job;
}

void ThreadPool::wait(const Handle& job) {
  if (job->caller && job->done.load(std::memory_order_acquire) == 0 &&
      !job->caller_ran.exchange(true)) {
    job->pool->run_job(*job, job->team - 1);
    if (job->team == 1) {
      job->done.store(1, std::memory_order_release);  // never queued: nothing to drop
    } else if (job->remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      job->pool->finish(job);
    }
  }
  wait_until(job->done, [&] { return job->done.load(std::memory_order_acquire) != 0; });
  if (job->failed.load()) {
    std::exception_ptr e;
    {
      std::lock_guard<std::mutex> lock(job->err_mu);
      e = job->error;
    }
    std::rethrow_exception(e);
  }
}

void ThreadPool::finish(const Handle& job) {
  {
    // Every thread is past this job: drop finished jobs from the queue front.
    std::lock_guard<std::mutex> lock(mu_);
    size_t drop = 0;
    while (drop < queue_.size() && queue_[drop]->remaining.load() == 0) ++drop;
    queue_.erase(queue_.begin(), queue_.begin() + long(drop));
    base_seq_ += drop;
  }
  job->done.store(1, std::memory_order_release);
  futex_wake_all(&job->done);
}

void ThreadPool::barrier(Job& job) {
  uint32_t gen = job.barrier_gen.load(std::memory_order_acquire);
  if (job.arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == job.team) {
    job.arrived.store(0, std::memory_order_relaxed);
    job.barrier_gen.fetch_add(1, std::memory_order_acq_rel);
    futex_wake_all(&job.barrier_gen);
    return;
  }
  wait_until(job.barrier_gen, [&] { return job.barrier_gen.load(std::memory_order_acquire) != gen; });
}

void ThreadPool::run_job(Job& job, int tid) {  // tid: a team member (worker_main checks)
  for (size_t p = 0; p < job.phases.size(); ++p) {
    if (!job.failed.load(std::memory_order_acquire)) {
      try {
        job.phases[p](tid, job.team);
      } catch (...) {
        std::lock_guard<std::mutex> lock(job.err_mu);
        if (!job.failed.load()) job.error = std::current_exception();
        job.failed.store(true, std::memory_order_release);
      }
    }
    if (p + 1 < job.phases.size()) barrier(job);
  }
}

void ThreadPool::worker_main(int tid) {
  // Bound to its NUMA node's CPUs, not to one CPU: the pages it reads stay local, and the
  // scheduler may still move it off a CPU another busy thread holds. Pinned to one CPU, a worker
  // woken on the core where the calling thread runs (a caller job: that thread computes too, and
  // it is not pinned) waited for it to block, and 2-thread decode steps on a 2-vCPU guest swung
  // between 1.3 and 2.2 ms.
  cpu_set_t set;
  CPU_ZERO(&set);
  for (size_t i = 0; i < topo_.cpus.size(); ++i)
    if (topo_.node_of[i] == worker_node_[size_t(tid)]) CPU_SET(topo_.cpus[i], &set);
  sched_setaffinity(0, sizeof(set), &set);  // best effort: a refused bind only costs locality

  uint64_t next = 1;
  for (;;) {
    wait_until(epoch_, [&] {
      return published_.load(std::memory_order_acquire) >= next || stop_.load();
    });
    if (published_.load(std::memory_order_acquire) < next) return;  // stop, nothing queued
    Handle job;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job = queue_[size_t(next - base_seq_)];
    }
    // Workers are tids 0..; a caller job's submitting thread is tid team-1, so they stop one short.
    if (tid < (job->caller ? job->team - 1 : job->team)) run_job(*job, tid);
    if (job->remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) finish(job);
    ++next;
  }
}

ThreadPool::NodeShare node_share_of(int64_t units, int tid, const std::vector<int>& team_nodes) {
  const int team = int(team_nodes.size());
  const int node = team_nodes[size_t(tid)];
  int before = 0, mine = 0, rank = 0;  // team threads on lower nodes, on ours, ours before tid
  for (int i = 0; i < team; ++i) {
    const int n = team_nodes[size_t(i)];
    if (n < node) ++before;
    if (n == node) {
      ++mine;
      if (i < tid) ++rank;
    }
  }
  return {units * before / team, units * (before + mine) / team, rank, mine};
}

std::pair<int64_t, int64_t> split_units(int64_t units, int tid, const std::vector<int>& team_nodes) {
  const ThreadPool::NodeShare s = node_share_of(units, tid, team_nodes);
  const int64_t len = s.end - s.begin;
  return {s.begin + len * s.rank / s.count, s.begin + len * (s.rank + 1) / s.count};
}

std::vector<int> ThreadPool::team_nodes(int team) const {
  // Workers' nodes; a caller beyond the workers (a caller job of size() + 1) counts on the node
  // of the CPU the next worker would have been pinned to.
  std::vector<int> nodes(size_t(team), 0);
  for (int i = 0; i < team; ++i)
    nodes[size_t(i)] = i < size() ? worker_node_[size_t(i)]
                                  : topo_.node_of[size_t(i) % topo_.node_of.size()];
  return nodes;
}

std::pair<int64_t, int64_t> ThreadPool::split(int64_t units, int tid, int team) const {
  if (team <= 0 || team > size() + 1) team = size();
  if (team == size()) return split_units(units, tid, worker_node_);
  return split_units(units, tid, team_nodes(team));
}

ThreadPool::NodeShare ThreadPool::node_share(int64_t units, int tid, int team) const {
  if (team <= 0 || team > size() + 1) team = size();
  if (team == size()) return node_share_of(units, tid, worker_node_);
  return node_share_of(units, tid, team_nodes(team));
}

namespace {
std::mutex g_pool_mu;
std::shared_ptr<ThreadPool>* g_pool = nullptr;  // leaked on purpose: exit never joins workers

// A forked child has none of the parent's worker threads: forget the parent's pool (leaked, never
// touched again) so the child's first use starts its own. Jobs pending at the fork are lost to
// the child. The mutex is re-created because another parent thread may have held it.
void forget_pool_in_child() {
  new (&g_pool_mu) std::mutex();
  g_pool = nullptr;
}
}  // namespace

std::shared_ptr<ThreadPool> global_pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (g_pool == nullptr) {
    static const bool registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child) == 0;
    (void)registered;
    g_pool = new std::shared_ptr<ThreadPool>(new ThreadPool(default_threads()));
  }
  return *g_pool;
}

namespace {
std::atomic<int> g_sync_threads{0};
}  // namespace

void set_sync_threads(int threads) { g_sync_threads.store(threads > 0 ? threads : 0); }

int sync_team(const ThreadPool& pool) {
  const int cap = g_sync_threads.load(), most = pool.size() + 1;
  return cap > 0 && cap < most ? cap : most;
}

void set_global_threads(int threads) {
  auto fresh = std::make_shared<ThreadPool>(threads <= 0 ? default_threads() : threads);
  std::shared_ptr<ThreadPool> old;
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (g_pool == nullptr) {
      g_pool = new std::shared_ptr<ThreadPool>(fresh);
      return;
    }
    old = *g_pool;
    *g_pool = fresh;
  }
  // `old` is destroyed here unless an operator still holds it; its destructor runs queued jobs.
}

}  // namespace hybrid
