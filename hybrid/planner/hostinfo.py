"""Facts about this machine for `hybrid doctor` and the "local" machine preset.

hybrid/hardware.py (owned by native-core) is the project's one source of hardware facts; this
module asks it first and fills in, from /proc, /sys, psutil and torch.cuda, only what it does
not (yet) provide, so doctor works on a tree where the extension is not built. The RAM read
probe here (numba, all cores summing a buffer) is the fallback when hardware.py has no probe.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path


def _hardware():
    try:
        import hybrid.hardware as hw  # noqa: PLC0415 (optional module of another engineer)
        return hw
    except Exception:  # not written or extension not built: fall back to our own probes
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_model() -> str:
    txt = _read("/proc/cpuinfo") or ""
    for line in txt.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set:
    txt = _read("/proc/cpuinfo") or ""
    for line in txt.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


ISA_FLAGS = {  # the ISA paths csrc/ builds, and the cpuinfo flags each needs
    "avx2": ["avx2", "fma"],
    "avx512": ["avx512f", "avx512bw", "avx512vl", "avx512dq"],
    "avx512_vnni": ["avx512f", "avx512bw", "avx512vl", "avx512_vnni"],
    "avx512_bf16": ["avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"],
    "amx": ["amx_tile", "amx_int8", "amx_bf16"],
}


def isa_paths(flags: set) -> list:
    return ["scalar"] + [name for name, need in ISA_FLAGS.items() if all(f in flags for f in need)]


def numa_nodes() -> int:
    try:
        return len([d for d in os.listdir("/sys/devices/system/node") if d.startswith("node")
                    and d[4:].isdigit()]) or 1
    except OSError:
        return 1


def thp_mode() -> str:
    txt = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    if not txt:
        return "unknown"
    for word in txt.split():
        if word.startswith("["):
            return word.strip("[]")
    return txt


def gpus() -> list:
    """[{name, total_bytes, free_bytes}] from torch.cuda; [] without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append({"index": i, "name": torch.cuda.get_device_name(i),
                    "total_bytes": int(total), "free_bytes": int(free)})
    return out


_PROBE = None


def _probe_kernel():
    global _PROBE
    if _PROBE is None:
        import numba

        @numba.njit(parallel=True, cache=False)
        def chunk_sums(a, nchunks):  # every thread streams its own contiguous slice
            n = a.shape[0]
            out = 0
            step = (n + nchunks - 1) // nchunks
            for c in numba.prange(nchunks):
                s = 0
                for i in range(c * step, min(n, (c + 1) * step)):
                    s += a[i]
                out += s
            return out

        _PROBE = chunk_sums
    return _PROBE


def measure_ram_read_gbps(seconds: float = 1.0, buffer_bytes: int = 1 << 29) -> float:
    """Best-of-N streaming read over a buffer several times the LLC (all cores, numba)."""
    import numpy as np
    import numba

    fn = _probe_kernel()
    a = np.ones(buffer_bytes // 8, dtype=np.int64)
    threads = numba.get_num_threads()
    fn(a[:1024], threads)          # compile outside the timed loop
    best, t_end = 0.0, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn(a, threads * 4)
        dt = time.perf_counter() - t0
        best = max(best, a.nbytes / dt / 1e9)
        if time.perf_counter() > t_end:
            break
    return best


def collect(measure_bandwidth: bool = True, seconds: float = 1.0, path: str | None = None) -> dict:
    import psutil

    hw = _hardware()
    vm = psutil.virtual_memory()
    flags = cpu_flags()
    info = {
        "cpu_model": cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "numa_nodes": numa_nodes(),
        "ram_total_bytes": int(vm.total), "ram_available_bytes": int(vm.available),
        "thp": thp_mode(),
        "isa_supported": isa_paths(flags),
        "isa_source": "/proc/cpuinfo flags",
        "gpus": gpus(),
        "hardware_module": hw is not None,
    }
    if path:
        target = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        try:
            du = shutil.disk_usage(target)
            info["disk"] = {"path": target, "free_bytes": int(du.free), "total_bytes": int(du.total)}
        except OSError:
            pass
    if measure_bandwidth:
        gbps, source = None, None
        for name in ("measure_read_bandwidth", "ram_read_bandwidth", "read_bandwidth_gbps"):
            f = getattr(hw, name, None) if hw is not None else None
            if callable(f):
                try:
                    gbps, source = float(f()), f"hybrid.hardware.{name}"
                except Exception:
                    gbps = None
                break
        if gbps is None:
            gbps = measure_ram_read_gbps(seconds)
            source = "planner numba probe, all threads"
        info["ram_read_gbps"] = gbps
        info["ram_read_source"] = source
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
