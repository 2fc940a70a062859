"""Hardware facts, in one place: CPU brand and ISA paths (from the extension's cpuid), cores,
NUMA nodes, RAM, transparent huge pages, GPUs, and measured RAM read bandwidth.

Nothing runs at import. Each function reads what it needs when called; the bandwidth probe
(about a second of all cores reading 1 GiB) runs once per process per argument set and is
cached. Functions that need the C++ extension raise ImportError with the build command when it
is missing, except summary(), which reports what it can.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

_NODE_DIR = Path("/sys/devices/system/node")
_THP_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def cpu_brand() -> str:
    """cpuid brand string, e.g. 'Intel(R) Xeon(R) Platinum 8480+'."""
    from hybrid import native  # noqa: PLC0415

    return native.lib().cpu_info()["brand"]


def cpu_flags() -> list[str]:
    """CPU features that matter to the kernels (cpuid), e.g. ['avx2', 'avx512f', 'amx_int8']."""
    from hybrid import native  # noqa: PLC0415

    return list(native.lib().cpu_info()["flags"])


def isa() -> dict[str, Any]:
    """The kernel path in use and those available: see hybrid.native.isa()."""
    from hybrid import native  # noqa: PLC0415

    return native.isa()


def cores() -> dict[str, int]:
    """physical / logical cores of the machine, and the CPUs this process may run on."""
    import psutil  # noqa: PLC0415

    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = logical
    return {"physical": int(physical), "logical": int(logical), "usable": int(usable)}


def _cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        a, _, b = part.partition("-")
        cpus.extend(range(int(a), int(b or a) + 1))
    return cpus


def numa_nodes() -> list[dict[str, Any]]:
    """One entry per NUMA node: {"id", "cpus", "mem_total_bytes", "mem_free_bytes"}; a single
    node holding every CPU when /sys has no node information."""
    nodes = []
    for d in sorted(_NODE_DIR.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        entry: dict[str, Any] = {"id": int(d.name[4:]), "cpus": [], "mem_total_bytes": None,
                                 "mem_free_bytes": None}
        try:
            entry["cpus"] = _cpulist((d / "cpulist").read_text())
            for line in (d / "meminfo").read_text().splitlines():
                fields = line.split()  # "Node 0 MemTotal: 24000000 kB"
                if len(fields) >= 4 and fields[2] in ("MemTotal:", "MemFree:"):
                    key = "mem_total_bytes" if fields[2] == "MemTotal:" else "mem_free_bytes"
                    entry[key] = int(fields[3]) * 1024
        except (OSError, ValueError):
            pass
        nodes.append(entry)
    if not nodes:
        nodes.append({"id": 0, "cpus": list(range(os.cpu_count() or 1)), "mem_total_bytes": None,
                      "mem_free_bytes": None})
    return nodes


def ram() -> dict[str, int]:
    """Total and available RAM in bytes."""
    import psutil  # noqa: PLC0415

    vm = psutil.virtual_memory()
    return {"total_bytes": int(vm.total), "available_bytes": int(vm.available)}


def thp_mode() -> str | None:
    """Transparent huge pages mode: 'always', 'madvise' (we madvise our weights) or 'never';
    None when the kernel does not say."""
    try:
        text = _THP_FILE.read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def gpus() -> list[dict[str, Any]]:
    """CUDA GPUs torch sees: {"index", "name", "total_bytes", "free_bytes", "capability"}."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free, total = None, p.total_memory
        out.append({"index": i, "name": p.name, "total_bytes": int(total),
                    "free_bytes": None if free is None else int(free),
                    "capability": f"{p.major}.{p.minor}"})
    return out


@functools.lru_cache(maxsize=None)
def h2d_bandwidth_gbps(index: int = 0, nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Pinned host -> CUDA device `index` copy rate in GB/s (1e9 bytes/s): the best of `repeats`
    copies of `nbytes`, timed with CUDA events (what layerwise prefill's stream reaches per
    copy). Cached per process; ValueError without a CUDA device."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ValueError(f"h2d_bandwidth_gbps: no CUDA device {index}")
    dev = torch.device("cuda", index)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    best = 0.0
    with torch.cuda.device(dev):
        for _ in range(repeats + 1):   # the first copy warms up
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            best = max(best, nbytes / (a.elapsed_time(b) * 1e-3) / 1e9)
    return best


@functools.lru_cache(maxsize=None)
def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """RAM read bandwidth with the engine's thread pool and page policy (csrc/bandwidth.h):
    {"gbps" (median), "runs", "bytes", "threads", "hugepage_advised"}. Cached per process."""
    from hybrid import native  # noqa: PLC0415

    return dict(native.lib().read_bandwidth(int(nbytes), int(repeats)))


def read_bandwidth_gbps() -> float:
    """Median measured RAM read bandwidth in GB/s (1e9 bytes/s), 1 GiB buffer; cached."""
    return float(read_bandwidth()["gbps"])


def summary(measure_bandwidth: bool = False) -> dict[str, Any]:
    """Everything above in one dict (for `hybrid doctor`, profiles, the planner). Fields that need
    the extension are None, with "native_error" set, when it is not built."""
    out: dict[str, Any] = {"cores": cores(), "numa_nodes": numa_nodes(), "ram": ram(),
                           "thp": thp_mode(), "gpus": gpus()}
    try:
        out["cpu_brand"] = cpu_brand()
        out["isa"] = isa()
        out["native_error"] = None
    except (ImportError, ValueError) as e:
        out["cpu_brand"] = out["isa"] = None
        out["native_error"] = str(e)
    if measure_bandwidth and out["native_error"] is None:
        out["read_bandwidth"] = read_bandwidth()
    return out
