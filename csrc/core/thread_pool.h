// thread_pool.h: one persistent pool of pinned worker threads, NUMA-aware, asynchronous.
//
// A Job is a list of phases; each phase runs fn(tid, team) on every thread of the job's team
// (the first `team` workers), with a barrier between phases. submit() returns at once;
// wait() blocks until the job is done and rethrows the first exception a worker threw, as it was
// thrown (the remaining phases of that job are skipped, never left hanging in a barrier).
// Jobs run in submission order, one at a time, so several operators (or Python threads) can
// submit to the same pool.
//
// Waiting, both in workers and in wait(), spins for a few tens of microseconds (decode steps
// are short) and then sleeps on a futex, so an idle pool uses no CPU.
//
// Topology: the pool runs on the CPUs of the process affinity mask, one worker per physical
// core by default (hyperthread siblings only when asked for more threads than cores), each bound
// to the CPUs of its NUMA node (cpu_of() is the CPU it is counted on, not a pin). Workers
// are ordered round-robin over NUMA nodes (tid 0 on node 0, tid 1 on node 1, ...), and split()
// hands each node a contiguous range of work proportional to its team threads, so weights first
// touched through split() live in the memory of the node whose threads later read them.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace hybrid {

struct CpuTopology {
  std::vector<int> cpus;        // allowed logical CPUs, one per physical core first, then siblings
  std::vector<int> node_of;     // node_of[i]: NUMA node of cpus[i]
  int physical_cores = 0;       // distinct physical cores among the allowed CPUs
  int num_nodes = 1;            // NUMA nodes that hold at least one allowed CPU
  std::vector<int> node_ids;    // their ids as the kernel numbers them
};

// Reads sched_getaffinity + /sys/devices/system/{cpu,node}; falls back to one node.
CpuTopology detect_topology();

class ThreadPool {
 public:
  using Phase = std::function<void(int tid, int team)>;

  struct Job {
    std::vector<Phase> phases;
    int team = 0;
    bool caller = false;                 // the submitting thread is tid team-1 (see submit)
    ThreadPool* pool = nullptr;          // for a caller job's wait(): the pool's queue
    std::atomic<bool> caller_ran{false}; // the caller has taken its share (wait() called)
    std::atomic<int> remaining{0};       // workers (all of them) not yet done with this job
    std::atomic<uint32_t> done{0};       // futex word: 1 when finished
    std::atomic<bool> failed{false};
    std::mutex err_mu;
    std::exception_ptr error;            // first worker exception
    std::atomic<int> arrived{0};         // barrier
    std::atomic<uint32_t> barrier_gen{0};
  };
  using Handle = std::shared_ptr<Job>;

  // threads <= 0: one per physical core; more than kMaxThreads: std::invalid_argument. A worker
  // the OS refuses to start (thread limit, memory) is std::runtime_error, the others stopped.
  explicit ThreadPool(int threads);
  ~ThreadPool();                     // finishes queued jobs, then joins
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()); }
  int node_of(int tid) const { return worker_node_[size_t(tid)]; }
  int cpu_of(int tid) const { return worker_cpu_[size_t(tid)]; }
  const CpuTopology& topology() const { return topo_; }

  // team <= 0 or > size(): the whole pool.
  //
  // caller = true: the submitting thread is one of the team, as tid team-1 (team <= size() + 1;
  // <= 0 means size() + 1), and workers 0..team-2 are the others. It runs its share in wait(),
  // which it must call (from the same thread). Why: when the calling thread would otherwise
  // only wait (a synchronous call on a CPU-only machine, where it also runs torch between
  // calls), a pool of one worker per core leaves the caller and a spinning worker fighting for
  // one core; measured on a 2-vCPU KVM guest, a 2-worker round trip took 110 us against 2.3 us
  // with 1 worker + the caller. Give such a pool one worker fewer than the threads wanted.
  // A caller job of team 1 runs entirely on the caller, without waking the pool.
  Handle submit(std::vector<Phase> phases, int team = 0, bool caller = false);
  // Waits for the job (running the caller's share first for a caller job); rethrows the first
  // exception a thread threw.
  static void wait(const Handle& job);
  static bool finished(const Handle& job) { return job->done.load() != 0; }
  void run(std::vector<Phase> phases, int team = 0, bool caller = false) {
    wait(submit(std::move(phases), team, caller));
  }

  // [begin, end) of `units` work units for thread tid of a team of `team` threads: nodes get
  // contiguous ranges proportional to their thread counts in the team, threads of one node split
  // their node's range evenly. Deterministic, so placement and compute agree.
  // team may be size() + 1 for a caller job: the caller (tid size()) counts on the node of the
  // CPU a next worker would get.
  std::pair<int64_t, int64_t> split(int64_t units, int tid, int team) const;

  // The node-level part of split(): the range of `units` owned by tid's node, and tid's rank
  // among that node's `count` team threads.
  struct NodeShare {
    int64_t begin, end;
    int rank, count;
  };
  NodeShare node_share(int64_t units, int tid, int team) const;

 private:
  void worker_main(int tid);
  void run_job(Job& job, int tid);
  void finish(const Handle& job);        // last thread out: drop finished jobs, mark done
  void stop_workers();                   // let the started workers finish the queue, join them
  std::vector<int> team_nodes(int team) const;
  static void barrier(Job& job);

  CpuTopology topo_;
  std::vector<std::thread> workers_;
  std::vector<int> worker_cpu_, worker_node_;
  std::mutex mu_;                        // guards queue_, base_seq_
  std::vector<Handle> queue_;            // queue_[i] is job number base_seq_ + i
  uint64_t base_seq_ = 1;
  std::atomic<uint64_t> published_{0};   // highest submitted job number
  std::atomic<uint32_t> epoch_{0};       // futex word, bumped on submit and stop
  std::atomic<bool> stop_{false};
};

// split() for a team whose thread i runs on NUMA node team_nodes[i]: [begin, end) of `units` for
// thread tid. Nodes (ascending id) get contiguous ranges proportional to their thread counts;
// the threads of a node split its range evenly in tid order.
std::pair<int64_t, int64_t> split_units(int64_t units, int tid, const std::vector<int>& team_nodes);
ThreadPool::NodeShare node_share_of(int64_t units, int tid, const std::vector<int>& team_nodes);

// The process-wide pool, created on first use with `default_threads()` workers. It is never
// destroyed at process exit (exit must not wait on workers); set_global_threads() replaces it.
std::shared_ptr<ThreadPool> global_pool();
// Threads a synchronous caller job (dense GEMV, MLA decode) may use: the calling thread + pool
// workers, at most `pool.size() + 1`. set_sync_threads(n) caps it at n (<= 0: no cap), so a run
// asked for 1 thread on a CPU device computes on the calling thread alone even though the pool
// keeps a worker (a pool has at least one).
void set_sync_threads(int threads);
int sync_team(const ThreadPool& pool);

// The most workers a pool may have (HYBRID_NUM_THREADS, set_global_threads, ThreadPool).
constexpr int kMaxThreads = 4096;

// Replace the global pool by one with `threads` workers (<= 0: default). Waits for queued jobs.
void set_global_threads(int threads);
// HYBRID_NUM_THREADS when set, else the physical cores available to the process.
int default_threads();

}  // namespace hybrid
