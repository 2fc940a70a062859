"""Measurements of this machine that need the expert engine (the planner's hostinfo has the rest):
`hybrid doctor` reports them beside the probe's bandwidth."""

from __future__ import annotations

import time

from hybrid.planner.hostinfo import _last_level_cache_bytes


def measure_expert_kernel_gbps(seconds: float = 1.0, experts: int = 8, hidden: int = 7168,
                               intermediate: int = 2048, gguf_type: str | None = None) -> dict:
    """Decode-path throughput of the C++ expert engine: one token through `experts` K2.5-sized
    experts, weight bytes read per second, median over the runs. The experts are INT4 (24.8 MB
    each), or with `gguf_type` (a type the kernels run in its blocks, e.g. "q4_k", "iq1_s") random
    blocks of that type: the lattice types are compute-bound, so their rate is their own.

    Each run picks `experts` experts out of a pool that is at least three times the last-level
    cache (some server CPUs have 300 MB of L3, more than 8 K2.5 experts), rotating so every run
    reads its weights from RAM as decode does. Needs hybrid._native; raises ImportError without.
    """
    import numpy as np
    import torch

    from hybrid.experts.cpu_moe import CpuMoE, PackedLayer

    rng = np.random.default_rng(0)
    if gguf_type is not None:
        from hybrid.runtime.random_gguf import GGUF_BLOCK, gguf_row_bytes, gguf_rows

        if gguf_type not in GGUF_BLOCK:
            raise ValueError(f"gguf_type {gguf_type!r}: not a type the kernels run ({', '.join(GGUF_BLOCK)})")
        expert_bytes = 2 * intermediate * gguf_row_bytes(gguf_type, hidden) + hidden * gguf_row_bytes(gguf_type, intermediate)
    else:
        expert_bytes = 3 * hidden * intermediate * 9 // 16  # INT4 nibbles (1/2 B) + bf16 scale per 32 (1/16 B)
    pool = max(4 * experts, -(-3 * _last_level_cache_bytes() // expert_bytes))

    # Every expert shares the arrays; the packed layer still holds `pool` separate copies, which
    # is what is streamed.
    if gguf_type is not None:
        g = gguf_rows(rng, gguf_type, intermediate, hidden)
        d = gguf_rows(rng, gguf_type, hidden, intermediate)
        layer = PackedLayer.from_gguf([g] * pool, [g] * pool, [d] * pool, gguf_type, gguf_type, gguf_type)
        del g, d
    else:  # random nibbles with one power-of-two scale (bf16-exact)
        def packed(o, i):
            return rng.integers(-2**31, 2**31 - 1, size=(o, i // 8), dtype=np.int64).astype(np.int32)

        def scale(o, i):
            return np.full((o, i // 32), 2.0**-7, dtype=np.float32)

        gp, gs = packed(intermediate, hidden), scale(intermediate, hidden)
        dp, ds = packed(hidden, intermediate), scale(hidden, intermediate)
        layer = PackedLayer.from_compressed_int4([gp] * pool, [gs] * pool, [gp] * pool,
                                                 [gs] * pool, [dp] * pool, [ds] * pool)
        del gp, dp
    moe = CpuMoE(layer, mode="fast")
    x = torch.randn(1, hidden)
    w = torch.full((1, experts), 1.0 / experts)
    picks = [torch.arange(i, i + experts, dtype=torch.int32)[None, :]
             for i in range(0, pool - experts + 1, experts)]
    for ids in picks:                           # first touch of every page, outside the timing
        moe.forward(x, ids, w)
    rates, t_end = [], time.perf_counter() + seconds
    while len(rates) < 3 * len(picks) and (time.perf_counter() < t_end or len(rates) < 5):
        ids = picks[len(rates) % len(picks)]
        t0 = time.perf_counter()
        moe.forward(x, ids, w)
        rates.append(experts * layer.expert_nbytes / (time.perf_counter() - t0) / 1e9)
    return {"gbps": float(np.median(rates)), "isa": moe.isa, "experts": experts, "format": gguf_type or "int4",
            "pool_experts": pool, "runs": len(rates),
            "bytes_per_expert": int(layer.expert_nbytes)}
