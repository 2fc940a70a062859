"""`hybrid run` takes the shared load flags (hybrid/chat/loading.py), --profile and --online
among them: the online run reports its swaps and hit rate, and --online without --profile is
refused with one line saying why."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "demo-model_reference_542MiB.yaml"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "hybrid", "run", "--prompt", "Once upon a time",
                           "-n", "6", "--temperature", "0", "--threads", "1", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_run_with_profile_and_online():
    on = _run("--profile", str(PROFILE), "--online")
    assert on.returncode == 0, on.stderr
    assert "online re-placement:" in on.stderr and "hit rate" in on.stderr
    off = _run("--profile", str(PROFILE), "--no-online")
    assert off.returncode == 0, off.stderr
    assert "online re-placement" not in off.stderr
    # 6 tokens are under the default policy's first check (32 tokens): no swap, same text.
    assert on.stdout == off.stdout and on.stdout.strip()


def test_run_online_needs_a_profile():
    r = _run("--online")
    assert r.returncode == 1
    assert "pass profile=" in r.stderr and "Traceback" not in r.stderr


def test_engine_stats_report_swaps_on_the_demo_model():
    # The engine calls Model.forward once per step, which ends the placer's step; its stats
    # (what /metrics reads) carry the swap count and the cache hit rate.
    import hybrid

    model = hybrid.load(None, profile=PROFILE, progress=False, threads=1,
                        online={"interval": 1, "window": 4.0, "max_swaps": 2, "horizon": 1e9})
    try:
        ids = model.tokenizer.encode("Once upon a time")
        assert len(model.generate(ids, 8, stop_at_eos=False)) == 8
        online = model.online_stats()
        s = model.engine().stats()
        assert s["expert_swaps"] == online["swaps"] > 0
        assert s["expert_cache_hit_rate"] == online["hit_rate"]
        assert online["steps"] == s["steps"]
    finally:
        model.close()
