"""hybrid.hardware: the one module of hardware facts (no work at import, cached probe)."""

from __future__ import annotations

import os
import subprocess
import sys

import hybrid.hardware as hw
from hybrid import native


def test_import_does_no_work():
    code = ("import sys, hybrid.hardware; "
            "print('hybrid._native' in sys.modules, 'torch' in sys.modules, 'psutil' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "False", "False"], r.stderr


def test_cpu_and_isa_facts():
    assert hw.cpu_brand() == native.lib().cpu_info()["brand"] and hw.cpu_brand()
    assert "sse2" in hw.cpu_flags()
    info = hw.isa()
    assert info["active"] in info["available"] and info["available"][0] == "scalar"


def test_cores_numa_ram_thp():
    c = hw.cores()
    assert 1 <= c["usable"] <= c["logical"] and 1 <= c["physical"] <= c["logical"]
    nodes = hw.numa_nodes()
    cpus = [cpu for n in nodes for cpu in n["cpus"]]
    assert len(cpus) == len(set(cpus)) and set(os.sched_getaffinity(0)) <= set(cpus)
    r = hw.ram()
    assert 0 < r["available_bytes"] <= r["total_bytes"]
    assert hw.thp_mode() in (None, "always", "madvise", "never")


def test_gpus_and_summary():
    import torch

    assert (hw.gpus() == []) == (not torch.cuda.is_available())
    s = hw.summary()
    assert s["native_error"] is None and s["isa"]["active"] in s["isa"]["available"]
    assert set(s) >= {"cores", "numa_nodes", "ram", "thp", "gpus", "cpu_brand"}


def test_bandwidth_is_cached():
    a = hw.read_bandwidth(16 << 20, 2)
    assert a["gbps"] > 0 and a["bytes"] == 16 << 20
    assert hw.read_bandwidth(16 << 20, 2) is a  # measured once per process
