"""Run one fuzz case in a forked child with an address-space limit and a deadline, and judge
how it ended.

The parent has imported everything once (torch, hybrid, the seed files), so a fork costs a few
milliseconds where a fresh interpreter costs seconds. It runs with one torch thread and a
one-worker native pool (set before anything runs: a forked child keeps no threads, and an
OpenMP team started in the parent would hang the child).

A case ends in one of:
  ok        the target accepted the input (a correct load, a parsed request);
  refused   it raised one of the area's error types with a message (naming the file where
            the area says so);
  FAILED    anything else: a signal (SIGSEGV, SIGBUS, SIGABRT...), the deadline (a hang), another
            exception type, an error without a message, or one that does not name the file.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import time
import traceback
from dataclasses import dataclass


@dataclass
class Outcome:
    area: str
    index: int
    verdict: str  # "ok" | "refused" | "FAILED"
    detail: str
    seconds: float


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _child(case, write_fd: int, memory_bytes: int) -> None:
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _vm_bytes() + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        try:
            detail = case()
            msg = {"kind": "ok", "detail": str(detail or "")[:300]}
        except BaseException as e:  # noqa: BLE001  (judged by the parent)
            tb = traceback.extract_tb(e.__traceback__)
            where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
            msg = {"kind": "raised", "type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                   "message": str(e)[:800], "where": where}
        data = json.dumps(msg).encode()
        while data:
            data = data[os.write(write_fd, data):]
    finally:
        os._exit(0)


def run_case(area: str, index: int, case, accept: tuple[str, ...], must_name: str | None,
             timeout_s: float, memory_bytes: int) -> Outcome:
    """case(): runs in the child. accept: names of exception classes (or their bases) that are a
    clean refusal. must_name: text the refusal's message must contain (a file name), or None."""
    start = time.monotonic()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(case, w, memory_bytes)
    os.close(w)
    chunks, deadline, timed_out = [], start + timeout_s, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    took = time.monotonic() - start

    def out(verdict, detail):
        return Outcome(area, index, verdict, detail, took)

    if timed_out:
        return out("FAILED", f"no result after {timeout_s:g} s (a hang)")
    if os.WIFSIGNALED(status):
        return out("FAILED", f"killed by {signal.Signals(os.WTERMSIG(status)).name}")
    try:
        msg = json.loads(b"".join(chunks))
    except json.JSONDecodeError:
        return out("FAILED", f"the child exited ({status}) without a result")
    if msg["kind"] == "ok":
        return out("ok", msg["detail"])
    desc = f"{msg['type']}: {msg['message']} (at {msg['where']})"
    if not any(name in accept for name in msg["mro"]):
        return out("FAILED", f"unexpected {desc}")
    if not msg["message"].strip():
        return out("FAILED", f"an error without a message: {desc}")
    if must_name and must_name not in msg["message"]:
        return out("FAILED", f"the error does not name {must_name!r}: {desc}")
    return out("refused", desc)
