"""Facts about this machine for `hybrid doctor` and the "local" machine preset, as one flat dict.

Every hardware fact comes from hybrid/hardware.py, the project's one source of them (DESIGN.md);
this module only flattens them into the keys doctor and the cost model read, and adds the disk
where a model lives. Without the C++ extension, the facts that need cpuid (brand, ISA paths) and
the bandwidth probe are reported as missing with the reason, never guessed.
"""

from __future__ import annotations

import os
import shutil
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


