"""What a caller of the engine holds: a RequestHandle that yields Events.

The engine thread pushes events; the caller reads them with a plain `for ev in handle` (blocks
on a condition variable) or `async for ev in handle.aiter()` (awaits an asyncio.Event that the
engine thread sets through loop.call_soon_threadsafe: no polling either way). A reader that
stops early (breaks out, is garbage collected, or its asyncio task is cancelled because the
client went away) cancels the request, which frees its slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field


class GenerationError(RuntimeError):
    """The engine failed while running this request (the message says why)."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the n most likely (token id, logprob), best first


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, a final stop token included
    cached_tokens: int = 0  # prompt tokens whose KV was reused from a freed slot (prefix reuse)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Event:
    """One step's news for one request.

    token_ids: tokens sampled this step that belong to the output (a stop token does not);
    text: newly visible text (may be empty while a UTF-8 character or a possible stop string is
    incomplete); logprobs: one per token in token_ids, when asked for; finish_reason: None while
    running, then "stop", "length", "cancelled" or "error"; usage: on the final event.
    """

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


@dataclass
class Completion:
    """Everything a finished request produced (RequestHandle.result())."""

    token_ids: list[int]
    text: str
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None


class RequestHandle:
    """Stream of Events for one submitted request. Iterate once (sync or async)."""

    def __init__(self, request_id: int, cancel_fn):
        self.request_id = request_id
        self._cancel_fn = cancel_fn
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._events: deque[Event] = deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._closed = False  # the final event has been pushed
        self._seen_final = False  # the reader has taken the final event

    # ---- engine side ----------------------------------------------------------------------

    def _push(self, event: Event) -> None:
        with self._cond:
            if self._closed:
                return
            self._events.append(event)
            if event.finish_reason is not None:
                self._closed = True
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # the reader's event loop is closed: nobody to wake
                pass

    # ---- reader side ----------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._closed

    def cancel(self) -> None:
        """Stop generating; the final event has finish_reason "cancelled"."""
        if not self._closed:
            self._cancel_fn(self.request_id)

    def _take(self, block: bool, timeout: float | None = None) -> Event | None:
        with self._cond:
            if block:
                self._cond.wait_for(lambda: self._events, timeout=timeout)
            return self._events.popleft() if self._events else None

    def _deliver(self, event: Event) -> Event:
        if event.finish_reason is not None:
            self._seen_final = True
            if event.finish_reason == "error":
                raise GenerationError(event.error or "generation failed")
        return event

    def __iter__(self):
        try:
            while not self._seen_final:
                yield self._deliver(self._take(block=True))
        finally:
            if not self._seen_final:
                self.cancel()

    async def aiter(self):
        """Async iteration for asyncio servers; awaiting never blocks the event loop."""
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        with self._lock:
            self._waiters.append((loop, flag))
        try:
            while not self._seen_final:
                flag.clear()  # before looking, so a push after the look sets it again
                event = self._take(block=False)
                if event is None:
                    await flag.wait()
                    continue
                yield self._deliver(event)
        finally:
            with self._lock:
                self._waiters.remove((loop, flag))
            if not self._seen_final:
                self.cancel()

    def result(self) -> Completion:
        """Wait for the end and return everything (raises GenerationError on failure)."""
        ids, text, logprobs, final = [], [], [], None
        for ev in self:
            ids += ev.token_ids
            text.append(ev.text)
            if ev.logprobs is not None:
                logprobs += ev.logprobs
            final = ev
        return Completion(token_ids=ids, text="".join(text), finish_reason=final.finish_reason,
                          usage=final.usage, logprobs=logprobs or None)
