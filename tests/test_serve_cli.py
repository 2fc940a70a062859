"""`hybrid serve` as a user starts it: a subprocess on a free loopback port, stopped at the end."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_serve_support import checkpoint_dir, free_port

REPO = Path(__file__).resolve().parents[1]


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra)
    return e


def test_serve_subprocess_with_key_from_environment():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hybrid", "serve", str(checkpoint_dir()), "--port", str(port),
                             "--model-name", "tiny", "--max-running", "4"],
                            env=env(HYBRID_API_KEY="env-key"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer env-key"}).json()
        assert models["data"][0]["id"] == "tiny"
        r = httpx.post(url + "/v1/completions", headers={"x-api-key": "env-key"},
                       json={"model": "tiny", "prompt": "abc", "max_tokens": 2, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "http://127.0.0.1:" in err and "API key required" in err
    assert proc.returncode == 0


@pytest.fixture
def busy_port():
    """A loopback port something is already listening on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("args, code, needle", [
    (["/no/such/checkpoint"], 1, "cannot load /no/such/checkpoint"),
    (["--port", "BUSY"], 2, "cannot listen on 127.0.0.1"),
    (["--host", "no-such-host.invalid"], 2, "cannot resolve --host"),
    (["--port", "70000"], 2, "port"),
    (["--max-running", "0"], 2, "max_running"),
])
def test_serve_refuses_bad_setup_with_a_message(busy_port, args, code, needle):
    args = [str(busy_port) if a == "BUSY" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "hybrid", "serve", *args], env=env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == code
    assert needle in r.stderr and "Traceback" not in r.stderr
