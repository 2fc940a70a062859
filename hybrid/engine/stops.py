"""When a request stops, and what text it may show while streaming.

Three ways to stop: a stop token id (eos, <|im_end|>, ...; never shown), a stop string (never
shown, nor anything after it), or max_tokens ("length"). Stop strings can span tokens, so the
streamed text holds back any tail that could still grow into one: if the stop is "</answer>"
and the text so far ends in "</ans", those five characters wait for the next token.
Token ids become text through the tokenizer's incremental decoder, which also waits for the
rest of a UTF-8 character split across tokens.
"""

from __future__ import annotations

from typing import Iterable


class StopStrings:
    """Stream filter: feed text deltas, get back the part that is safe to show."""

    def __init__(self, stops: Iterable[str] = ()):
        stops = [stops] if isinstance(stops, str) else list(stops)
        for i, s in enumerate(stops):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}]={s!r}: stop strings must be non-empty strings")
        self.stops = stops
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text, once found

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was found)."""
        if self.matched is not None:
            return "", True
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stops]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if hits:
            pos, self.matched = min(hits)
            self._held = ""
            return buf[:pos], True
        keep = self._holdback(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """At the end of generation (not by a stop string): release the held-back text."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _holdback(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self.stops), default=0)
        for k in range(min(len(buf), longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class StopState:
    """Per-request stop tracking: token ids in, (text delta, finish reason or None) out."""

    def __init__(self, decoder, stop_ids: Iterable[int] = (), stop: Iterable[str] = (),
                 max_tokens: int | None = None):
        self.decoder = decoder  # hybrid.tokenizer.IncrementalDecoder (or anything with add/flush)
        self.stop_ids = frozenset(stop_ids)
        self.strings = StopStrings(stop)
        self.max_tokens = max_tokens
        self.generated = 0  # tokens sampled, stop token included
        self.finish_reason: str | None = None

    def on_token(self, token_id: int) -> tuple[str, str | None]:
        if self.finish_reason is not None:
            raise RuntimeError("StopState.on_token called after the request finished")
        self.generated += 1
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self._final_text(), "stop"
        text, hit = self.strings.feed(self.decoder.add(token_id))
        if hit:
            self.finish_reason = "stop"
            return text, "stop"
        if self.max_tokens is not None and self.generated >= self.max_tokens:
            self.finish_reason = "length"
            text += self._final_text()  # may still complete a stop string: then it is "stop"
            return text, self.finish_reason
        return text, None

    def finish(self, reason: str) -> str:
        """End for an outside reason (cancelled, error): return whatever text is still held."""
        if self.finish_reason is not None:
            return ""
        self.finish_reason = reason
        return self._final_text()

    def _final_text(self) -> str:
        text, hit = self.strings.feed(self.decoder.flush())
        if hit:
            self.finish_reason = "stop"
            return text
        return text + self.strings.flush()
