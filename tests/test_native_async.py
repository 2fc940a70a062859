"""submit / sync: asynchronous jobs on the shared pool, Python threads, worker errors coming
back at sync, the pool's barriers, environment overrides, and clean interpreter exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from native_ref import random_experts

from hybrid import native
from hybrid.experts.cpu_moe import CpuMoE, PackedLayer

N = native.lib()
from hybrid import _native_testing as NT  # noqa: E402  test-only entry points (csrc/binding_testing.cpp)
E, H, I, B, K = 16, 64, 64, 9, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def layer():
    return PackedLayer.from_float(*random_experts(np.random.default_rng(0), E, H, I), format="int4")


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(B)]).astype(np.int32)
    return rng.standard_normal((B, H)).astype(np.float32), ids, rng.random((B, K)).astype(np.float32)


def test_submit_then_sync(layer, inputs):
    moe = CpuMoE(layer)
    ref = moe.forward(*inputs)
    assert moe.sync() is None  # nothing pending
    moe.submit(*inputs)
    assert moe.pending
    with pytest.raises(RuntimeError, match="still pending: call sync"):
        moe.submit(*inputs)
    y = moe.sync()
    assert not moe.pending
    np.testing.assert_array_equal(y, ref)


def test_two_operators_in_flight(layer, inputs):
    a, b = CpuMoE(layer), CpuMoE(layer, mode="precise")
    ra, rb = a.forward(*inputs), b.forward(*inputs)
    a.submit(*inputs)
    b.submit(*inputs)  # queued behind a's job on the same pool
    np.testing.assert_array_equal(b.sync(), rb)
    np.testing.assert_array_equal(a.sync(), ra)


def test_worker_exception_comes_back_at_sync(layer, inputs):
    moe = CpuMoE(layer)
    ref = moe.forward(*inputs)
    NT.inject_fault(moe._op, "injected worker failure")
    moe.submit(*inputs)  # returns: the failure happens in a worker
    with pytest.raises(RuntimeError, match="injected worker failure"):
        moe.sync()
    assert not moe.pending
    np.testing.assert_array_equal(moe.forward(*inputs), ref)  # usable afterwards


def test_many_python_threads(layer, inputs):
    """8 threads x 15 jobs, own operators and one shared operator: no crash, every y correct."""
    ref = CpuMoE(layer).forward(*inputs)
    shared = CpuMoE(layer)
    errors, bad = [], []

    def own():
        moe = CpuMoE(layer)
        for _ in range(15):
            moe.submit(*inputs)
            if not np.array_equal(moe.sync(), ref):
                bad.append("own")

    def on_shared():
        for _ in range(15):
            try:
                y = shared.forward(*inputs)  # may collide with another thread's job
            except RuntimeError as e:
                errors.append(str(e))
                continue
            if y is not None and not np.array_equal(y, ref):
                bad.append("shared")

    threads = [threading.Thread(target=own) for _ in range(4)] + [threading.Thread(target=on_shared) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    assert all("pending" in e for e in errors)
    shared.sync()
    np.testing.assert_array_equal(shared.forward(*inputs), ref)


@pytest.mark.parametrize("phases,team", [(1, 0), (3, 0), (4, 1)])
def test_pool_barriers(phases, team):
    job = NT.pool_test_job(phases, sleep_us=200, team=team)
    job.wait()  # a barrier violation would raise here
    expect = team or N.num_threads()
    assert job.done and job.phase_counts == [expect] * phases


def test_pool_failure_skips_later_phases():
    job = NT.pool_test_job(3, fail_phase=1, fail_tid=0)
    with pytest.raises(RuntimeError, match="injected failure in phase 1, thread 0"):
        job.wait()
    counts = job.phase_counts
    assert counts[0] == N.num_threads() and counts[2] == 0  # phase 2 never ran, nobody hung


def run_python(code: str, env: dict | None = None, timeout: float = 120):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_exit_with_pending_submit_does_not_hang():
    r = run_python("""
        import numpy as np
        from hybrid.experts.cpu_moe import CpuMoE, PackedLayer
        rng = np.random.default_rng(0)
        w = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)
        layer = PackedLayer.from_float(w(8, 256, 512), w(8, 256, 512), w(8, 512, 256), format="int4")
        moe = CpuMoE(layer)
        x = w(256, 512)
        ids = rng.integers(0, 8, (256, 8)).astype(np.int32)
        moe.submit(x, ids, np.ones((256, 8), np.float32))
        print("submitted")
    """)  # the interpreter exits with the job pending (timeout = hang guard, not a measurement)
    assert r.returncode == 0, r.stderr
    assert "submitted" in r.stdout


def test_forked_child_gets_its_own_pool():
    r = run_python("""
        import os, numpy as np
        from hybrid.experts.cpu_moe import CpuMoE, PackedLayer
        rng = np.random.default_rng(0)
        w = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)
        layer = PackedLayer.from_float(w(4, 64, 64), w(4, 64, 64), w(4, 64, 64), format="int8")
        x, ids, wt = w(2, 64), np.array([[0, 1], [2, 3]], np.int32), np.ones((2, 2), np.float32)
        ref = CpuMoE(layer).forward(x, ids, wt)  # the parent's pool is running
        pid = os.fork()
        if pid == 0:
            ok = np.array_equal(CpuMoE(layer).forward(x, ids, wt), ref)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    assert "child 0" in r.stdout, r.stdout + r.stderr


def test_hybrid_isa_forces_a_path():
    for isa in N.available_isas():
        r = run_python("from hybrid import native; print(native.isa()['active'])", {"HYBRID_ISA": isa})
        assert r.returncode == 0 and r.stdout.strip() == isa, r.stderr
    r = run_python("""
        from hybrid import native
        try:
            native.isa()
        except ValueError as e:
            print("ValueError:", e)
    """, {"HYBRID_ISA": "avx1024"})
    assert "ValueError: HYBRID_ISA=avx1024 cannot run here: unknown ISA" in r.stdout, r.stdout + r.stderr


def test_thread_count_override():
    r = run_python("from hybrid import native; print(native.num_threads())", {"HYBRID_NUM_THREADS": "1"})
    assert r.stdout.strip() == "1", r.stderr
    r = run_python("""
        from hybrid import native
        try:
            native.num_threads()
        except ValueError as e:
            print("ValueError:", e)
    """, {"HYBRID_NUM_THREADS": "many"})
    assert "HYBRID_NUM_THREADS='many' is not a thread count" in r.stdout, r.stdout + r.stderr


def test_absurd_thread_counts_are_python_errors(layer, inputs):
    """A thread count past the pool's limit is a ValueError before any thread starts (it was
    SIGABRT: `terminate called without an active exception`); the pool is left as it was."""
    before = native.num_threads()
    for n in (100000, 2**31 - 1):
        with pytest.raises(ValueError, match=f"threads must be at most 4096, got {n}"):
            native.set_num_threads(n)
        with pytest.raises(ValueError, match="threads must be at most 4096"):
            CpuMoE(layer, threads=n)
    with pytest.raises(ValueError, match="threads must be in 0..4097"):
        N.MoE(layer._h, "fast", 100000, "", False)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        CpuMoE(layer, threads=True)
    with pytest.raises((TypeError, OverflowError)):
        native.set_num_threads(10**20)
    assert native.num_threads() == before
    CpuMoE(layer).forward(*inputs)


def test_thread_start_failure_is_a_python_error():
    """Workers the OS refuses (here: 256 MiB more address space than the process has, 8 MiB stacks) are a RuntimeError
    naming the thread; the workers already started are stopped and the old pool keeps working."""
    r = run_python("""
        import resource
        from hybrid import native
        native.set_num_threads(1)
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        try:
            native.set_num_threads(4000)
        except RuntimeError as e:
            print("RuntimeError:", e)
        print("threads", native.num_threads())
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RuntimeError: cannot start worker thread" in r.stdout and "of 4000" in r.stdout, r.stdout + r.stderr
    assert "threads 1" in r.stdout, r.stdout


def test_set_num_threads_with_live_operators(layer, inputs):
    moe = CpuMoE(layer)
    ref = moe.forward(*inputs)
    before = native.num_threads()
    try:
        native.set_num_threads(3)
        assert native.num_threads() == 3
        info = N.pool_info()
        assert len(info["worker_cpus"]) == 3 and set(info["worker_nodes"]) <= set(N.topology()["node_ids"])
        np.testing.assert_array_equal(moe.forward(*inputs), ref)
        np.testing.assert_array_equal(CpuMoE(layer, threads=2).forward(*inputs), ref)
    finally:
        native.set_num_threads(before)


@pytest.mark.parametrize("nodes", [[0], [0, 0], [0, 1], [0, 1, 0, 1], [1, 0, 0], [0, 1, 2, 0, 1, 2, 0]])
@pytest.mark.parametrize("units", [0, 1, 7, 100, 448])
def test_numa_split(nodes, units):
    """Every unit goes to exactly one thread; each node's units are one contiguous range sized by
    its thread count; a node's threads get contiguous pieces in tid order."""
    ranges = N.split_units(units, nodes)
    covered = sorted(r for r in ranges if r[0] < r[1])
    assert sum(b - a for a, b in ranges) == units
    assert all(covered[i][1] == covered[i + 1][0] for i in range(len(covered) - 1))
    for node in set(nodes):
        mine = [ranges[t] for t in range(len(nodes)) if nodes[t] == node]
        assert all(mine[i][1] == mine[i + 1][0] for i in range(len(mine) - 1))
        share = mine[-1][1] - mine[0][0]
        assert abs(share - units * len(mine) / len(nodes)) <= 1
    lower = [t for t in range(len(nodes)) if nodes[t] == min(nodes)]
    assert ranges[lower[0]][0] == 0


def test_read_bandwidth_probe():
    r = N.read_bandwidth(8 << 20, 3)
    assert r["bytes"] == 8 << 20 and len(r["runs"]) == 3 and r["gbps"] > 0
    assert r["threads"] == native.num_threads()
    with pytest.raises(ValueError, match="nbytes must be >= 1 MiB"):
        N.read_bandwidth(1000, 1)
