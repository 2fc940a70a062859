"""uvicorn's Server with a graceful shutdown for long streams.

On SIGTERM (or Ctrl-C) uvicorn stops listening and waits for open connections. Before that wait
begins, the backend stops accepting requests (a request on a kept-alive connection gets a 503),
running streams go on for `grace` seconds, and then each one still running is ended with a
final error event (OpenAI: an error chunk and [DONE]; Anthropic: an `error` event) rather than a
cut connection. uvicorn's own deadline is set past the grace period so it never cuts first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn

log = logging.getLogger("hybrid.serve")

# Time after the grace period for the final events to be written and the connections closed.
FLUSH_S = 10.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, backend, grace: float):
        config.timeout_graceful_shutdown = grace + FLUSH_S
        super().__init__(config)
        self.backend = backend
        self.grace = grace

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            # uvicorn re-raises the signals it caught once it has stopped, so that their default
            # action (death by SIGTERM, KeyboardInterrupt) follows; the shutdown here is complete
            # and orderly, so `hybrid serve` exits with status 0 instead.
            self._captured_signals.clear()

    async def shutdown(self, sockets=None) -> None:
        self.backend.stop_accepting()
        log.warning("shutting down: no new requests; running ones have %g s to finish", self.grace)
        timer = asyncio.get_running_loop().call_later(self.grace, self._end_running)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            timer.cancel()

    def _end_running(self) -> None:
        n = self.backend.end_running(f"The server is shutting down; this request ran past the "
                                     f"{self.grace:g} s it was given to finish.")
        if n:
            log.warning("shutting down: ended %d request(s) still running after %g s", n, self.grace)
