"""`hybrid serve` stopped with SIGTERM while answers stream: new requests are refused, running
streams go on for --shutdown-grace seconds, then each ends with its dialect's final error event
(not a cut connection), and the process exits cleanly."""

import json
import signal
import subprocess
import sys
import threading
import time

import httpx

from test_serve_cli import env
from test_serve_support import CONTEXT, checkpoint_dir, free_port

def start_server(port: int, grace: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "hybrid", "serve", str(checkpoint_dir()), "--port", str(port),
                             "--model-name", "tiny", "--max-running", "4", "--shutdown-grace", str(grace)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)


class Stream(threading.Thread):
    """Reads one streaming answer line by line; `started` is set at its first data line."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.lines: list[str] = []
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        if line.startswith("data:"):
                            self.started.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.started.set()


def stop_while_streaming(grace: float) -> tuple[list[str], list[str]]:
    """Start an OpenAI and an Anthropic stream, SIGTERM the server once both are under way, check
    that new requests are refused and that the server exits with status 0; -> each one's lines."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, grace)
    # As long as the context allows: ignore_eos runs each answer to max_tokens.
    long = {"model": "tiny", "max_tokens": CONTEXT - 160, "temperature": 0, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    streams = [Stream(url + "/v1/chat/completions", long), Stream(url + "/v1/messages", long)]
    try:
        client = httpx.Client(base_url=url, timeout=30)
        assert client.get("/health").status_code == 200  # a kept-alive connection for after the signal
        for s in streams:
            s.start()
        for s in streams:
            assert s.started.wait(90) and s.error is None, s.error
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:  # new work is refused: a 503 on the open connection, or no connection at all
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2})
            assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        except httpx.TransportError:
            pass
        for s in streams:
            s.join(60)
            assert not s.is_alive() and s.error is None, s.error
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err
    return streams[0].lines, streams[1].lines


def test_sigterm_with_no_grace_ends_running_streams_with_an_error_event():
    openai, anthropic = stop_while_streaming(grace=0)
    # OpenAI: an error chunk, then [DONE].
    assert openai[-1] == "data: [DONE]"
    last = json.loads(openai[-2].removeprefix("data: "))
    assert "shutting down" in last["error"]["message"]
    # Anthropic: an `error` event, the stream's last.
    assert anthropic[-2] == "event: error"
    last = json.loads(anthropic[-1].removeprefix("data: "))
    assert last["type"] == "error" and "shutting down" in last["error"]["message"]


def test_sigterm_lets_running_streams_finish_within_the_grace_period():
    openai, anthropic = stop_while_streaming(grace=60)
    assert openai[-1] == "data: [DONE]"
    assert json.loads(openai[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert json.loads(anthropic[-1].removeprefix("data: "))["type"] == "message_stop"
    assert not any("error" in line for line in anthropic if line.startswith("event:"))
