"""Facts about this machine for `hybrid doctor` and the "local" machine preset, as one flat dict.

Every hardware fact comes from hybrid/hardware.py, the project's one source of them (DESIGN.md);
this module only flattens them into the keys doctor and the cost model read, and adds the disk
where a model lives. Without the C++ extension, the facts that need cpuid (brand, ISA paths) and
the bandwidth probe are reported as missing with the reason, never guessed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from hybrid import hardware


def collect(measure_bandwidth: bool = True, path: str | None = None) -> dict:
    """Flat machine facts; the bandwidth probe is hybrid.hardware's (1 GiB read 5 times)."""
    hw = hardware.summary(measure_bandwidth=measure_bandwidth)
    isa = hw["isa"] or {}
    info = {
        "cpu_model": hw["cpu_brand"] or "unknown (C++ extension not built)",
        "logical_cores": hw["cores"]["logical"],
        "physical_cores": hw["cores"]["physical"],
        "numa_nodes": max(1, len(hw["numa_nodes"])),
        "ram_total_bytes": hw["ram"]["total_bytes"],
        "ram_available_bytes": hw["ram"]["available_bytes"],
        "thp": hw["thp"] or "unknown",
        "isa_supported": list(isa.get("available") or ["scalar"]),
        "isa_source": "cpuid + OS state (hybrid.hardware)" if isa else
                      f"not detected: {hw['native_error']}",
        "gpus": hw["gpus"],
    }
    if path:
        target = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        try:
            du = shutil.disk_usage(target)
            info["disk"] = {"path": target, "free_bytes": int(du.free), "total_bytes": int(du.total)}
        except OSError:
            pass
    if measure_bandwidth:
        bw = hw.get("read_bandwidth")
        info["ram_read_gbps"] = float(bw["gbps"]) if bw else None
        info["ram_read_source"] = ("hybrid.hardware.read_bandwidth: engine thread pool, 1 GiB, "
                                   "median of 5" if bw else f"not measured: {hw['native_error']}")
    return info


def _last_level_cache_bytes() -> int:
    """Largest CPU cache size from sysfs (0 when unknown)."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best


def measure_expert_kernel_gbps(seconds: float = 1.0, experts: int = 8, hidden: int = 7168,
                               intermediate: int = 2048) -> dict:
    """Decode-path throughput of the C++ expert engine: one token through `experts` K2.5-sized
    INT4 experts (24.8 MB each), weight bytes read per second, median over the runs.

    Each run picks `experts` experts out of a pool that is at least three times the last-level
    cache (some server CPUs have 300 MB of L3, more than 8 K2.5 experts), rotating so every run
    reads its weights from RAM as decode does. Needs hybrid._native; raises ImportError without.
    """
    import numpy as np
    import torch

    from hybrid.experts.cpu_moe import CpuMoE, PackedLayer

    rng = np.random.default_rng(0)
    expert_bytes = 3 * hidden * intermediate * 9 // 16  # INT4 nibbles (1/2 B) + bf16 scale per 32 (1/16 B)
    pool = max(4 * experts, -(-3 * _last_level_cache_bytes() // expert_bytes))

    # Random nibbles with one power-of-two scale (bf16-exact); every expert shares the arrays,
    # the packed layer still holds `pool` separate copies, which is what is streamed.
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
    return {"gbps": float(np.median(rates)), "isa": moe.isa, "experts": experts,
            "pool_experts": pool, "runs": len(rates),
            "bytes_per_expert": int(layer.expert_nbytes)}
