"""How the machine's cores are split between the expert engine and torch, set once at load."""

from __future__ import annotations

import torch


def split_threads(device: torch.device, threads: int | None) -> None:
    """With no GPU the "device" work (attention, router, shared expert, dense MLP, LM head) runs
    on the same cores as the expert engine, one part after the other. Decode steps do it in
    native calls (csrc/models/mla_decode.h, models/router.h, core/norm.h, core/dense.h: the bf16
    GEMV up to a few tokens) on the engine's threads: the Python thread plus `threads - 1` pool workers (caller jobs,
    thread_pool.h), so each core runs one thread and nothing spins on a core another needs.
    Measured on the 2-vCPU dev box: a pool of one worker per core plus a waiting Python thread
    paid ~110 us per pool round trip, one worker fewer ~6 us; demo-model decode went from
    ~150 to 610-850 tok/s with these calls.

    torch keeps what is left: prefill-sized matmuls and attention, and everything in fp32. It
    gets the cores the engine was not given, or 1/8 of them (at least 1) when the engine has
    them all: its OpenMP workers spin after each op, and a 2-thread torch beside a 2-thread
    engine measured 500-860 ms per tiny-model step against 3-16 ms with 1 torch thread.

    Experts a profile caches "on the device" (GpuExpertCache on a CPU device) run on the Python
    thread after the submit, while the pool's workers run their share of the CPU experts; the
    Python thread takes its own share at sync."""
    if device.type != "cpu":
        return
    from hybrid import native
    from hybrid.hardware import cores as machine_cores

    c = machine_cores()
    n = max(1, min(c["physical"], c["usable"]))
    engine = min(threads or n, n)
    torch.set_num_threads(n - engine if engine < n else max(1, n // 8))
    # The Python thread computes a share of every expert job (CpuMoE caller=, set by the
    # loader on a CPU device), so the engine's `engine` threads are it + engine-1 pool workers:
    # a worker per core plus the caller left one core with two spinning threads, and each
    # decode layer paid ~110 us for the pool round trip on 2 vCPUs (6 us this way).
    # The synchronous native calls (dense GEMV, MLA decode) use the same caller + workers, capped
    # at `engine` (a pool keeps at least one worker, which a 1-thread run must not use).
    workers = max(1, engine - 1)
    if native.num_threads() != workers:
        native.set_num_threads(workers)
    native.lib().set_sync_threads(engine)
