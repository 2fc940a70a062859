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
