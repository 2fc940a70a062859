"""The bridge from HTTP jobs to the engine: prompt building, limits, and the run a route reads.

Backend.start(job) renders the chat template (or takes the raw prompt), checks the context and
queue limits (each a 4xx with the numbers), submits to the continuous-batching Engine and
returns a Run. A Run is read with `async for piece in run` and then has `run.finish`; leaving it
early (the client went away) cancels the engine request, which frees its slot at the next step.

Shutting down: stop_accepting() makes every new request a 503; end_running(message) cancels the
runs still going, and each then raises RunEnded(message) where it is read, so its route can end
it with a final error event instead of a cut connection.
"""

from __future__ import annotations

import threading
import weakref

from hybrid.serve.errors import ApiError, bad_request
from hybrid.serve.job import Finish, Job, Piece, TokenLogprob
from hybrid.serve.metrics import Metrics
from hybrid.serve.output import kimi_call_ids


class RunEnded(Exception):
    """The server ended this run before it finished (it is shutting down); the message says so."""


class Run:
    """One submitted generation as seen by a route."""

    def __init__(self, handle, tokenizer, job: Job, prompt_tokens: int, start_in_reasoning: bool,
                 metrics: Metrics, special_texts: tuple[str, ...] = ()):
        self.handle = handle
        self.tokenizer = tokenizer
        self.job = job
        self.prompt_tokens = prompt_tokens
        self.start_in_reasoning = start_in_reasoning
        self.metrics = metrics
        self.special_texts = special_texts  # the tokenizer's special tokens: never shown as text
        self.request_id = ""  # set by the route, in its dialect's id format
        self.finish: Finish | None = None
        self._shown_ids: list[int] = []
        self._ended: str | None = None  # why the server ended it (end())

    async def __aiter__(self):
        tok = self.tokenizer
        async for ev in self.handle.aiter():
            if ev.token_ids:
                self.metrics.add_tokens(len(ev.token_ids))
                self._shown_ids += ev.token_ids
            logprobs = None
            if ev.logprobs:
                logprobs = [TokenLogprob(tok.decode([lp.token_id]), lp.logprob,
                                         [(tok.decode([i]), v) for i, v in lp.top]) for lp in ev.logprobs]
            if ev.finish_reason is not None:
                self.finish = self._finish(ev)
                if ev.finish_reason == "cancelled" and self._ended is not None:
                    raise RunEnded(self._ended)
            if ev.text or ev.token_ids or logprobs:
                yield Piece(text=ev.text, n_tokens=len(ev.token_ids), logprobs=logprobs)

    def _finish(self, ev) -> Finish:
        usage = ev.usage
        reason = ev.finish_reason
        stop_string = None
        # The engine reports a stop token and a stop string both as "stop"; a stop token is
        # counted in completion_tokens but not shown, so equal counts mean a stop string.
        if reason == "stop" and self.job.stop and usage.completion_tokens == len(self._shown_ids):
            text = self.tokenizer.decode(self._shown_ids)
            hits = [(text.find(s), s) for s in self.job.stop if s in text]
            if hits:
                stop_string = min(hits)[1]
                reason = "stop_string"
        return Finish(reason=reason, prompt_tokens=usage.prompt_tokens,
                      completion_tokens=usage.completion_tokens, stop_string=stop_string,
                      cached_tokens=usage.cached_tokens)

    def cancel(self) -> None:
        self.handle.cancel()

    def end(self, message: str) -> None:
        """Cancel it for the server's own reason: reading it then raises RunEnded(message)."""
        self._ended = message
        self.handle.cancel()

    @property
    def done(self) -> bool:
        return self.finish is not None


class Backend:
    """Owns the tokenizer and the Engine; shared by every request of a server."""

    def __init__(self, engine, tokenizer, max_tokens: int, max_queued: int, metrics: Metrics,
                 model=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_queued = max_queued
        self.metrics = metrics
        self.model = model  # hybrid.load()'s Model, when the server loaded one (for cache stats)
        self._special_texts = tuple(tokenizer.special_tokens)
        self._accepting = True
        self._runs = weakref.WeakSet()  # every Run started (a finished one drops out when freed)
        self._runs_lock = threading.Lock()  # start() runs in worker threads
        from hybrid.chat.cache_stats import attach_hit_counter

        self._hits = attach_hit_counter(model) if model is not None else None

    @property
    def context_length(self) -> int:
        return self.engine.max_context

    def render_prompt(self, job: Job) -> tuple[list[int], bool]:
        """Token ids of the prompt, and whether it leaves the model inside <think>."""
        from hybrid.chat_template import ChatTemplateError

        tok = self.tokenizer
        if job.messages is None:
            if isinstance(job.prompt, str):
                return tok.encode_prompt(job.prompt), False
            bad = [t for t in job.prompt if not 0 <= t < tok.vocab_size]
            if bad:
                raise bad_request(f"'prompt' holds token id {bad[0]}, outside the vocabulary [0, {tok.vocab_size})",
                                  "prompt")
            return list(job.prompt), False
        try:
            text = tok.apply_chat_template(kimi_call_ids(job.messages), tools=job.tools,
                                           add_generation_prompt=True, thinking=job.thinking)
        except ChatTemplateError as e:
            raise bad_request(str(e), "messages") from None
        in_reasoning = text.rstrip().endswith("<think>")
        try:
            ids = tok.encode_chat(text + job.assistant_prefix, _untrusted_text(job.messages))
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        return ids, in_reasoning

    def stop_accepting(self) -> None:
        with self._runs_lock:
            self._accepting = False

    def end_running(self, message: str) -> int:
        """End every run still going (see Run.end); -> how many."""
        with self._runs_lock:
            running = [r for r in self._runs if not r.done]
        for r in running:
            r.end(message)
        return len(running)

    def _refuse_if_stopping(self) -> None:
        if not self._accepting:
            raise ApiError(503, "The server is shutting down and accepts no new requests.")

    def start(self, job: Job) -> Run:
        from hybrid.engine.sampling import SamplingParams

        self._refuse_if_stopping()
        ids, in_reasoning = self.render_prompt(job)
        n, ctx = len(ids), self.context_length
        if n >= ctx:
            raise bad_request(f"This model's maximum context length is {ctx} tokens, and the prompt has {n} "
                              "tokens. Please shorten the messages.", "messages")
        max_tokens = job.max_tokens
        if max_tokens is None:
            max_tokens = min(self.max_tokens, ctx - n)
        elif n + max_tokens > ctx:
            raise bad_request(f"This model's maximum context length is {ctx} tokens. However, you requested "
                              f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                              "Please reduce the prompt or the completion length.", "max_tokens")
        stats = self.engine.stats()
        # Requests waiting that no free slot will take at the next step are the real queue.
        queued = stats["waiting"] - (stats["max_seqs"] - stats["running"])
        if queued >= self.max_queued:
            raise ApiError(429, f"The server is busy: {stats['running']} requests running and "
                                f"{stats['waiting']} waiting (limit {self.max_queued}). Retry later.")
        try:
            params = SamplingParams(temperature=job.temperature, top_p=job.top_p, top_k=job.top_k,
                                    seed=job.seed, logprobs=job.logprobs,
                                    presence_penalty=job.presence_penalty,
                                    frequency_penalty=job.frequency_penalty, ignore_eos=job.ignore_eos)
            handle = self.engine.submit(ids, params, stop=job.stop, max_tokens=max_tokens)
        except ValueError as e:
            raise bad_request(str(e)) from None
        run = Run(handle, self.tokenizer, job, n, in_reasoning, self.metrics, self._special_texts)
        with self._runs_lock:
            if self._accepting:
                self._runs.add(run)
                return run
        handle.cancel()  # the shutdown began while this one was being set up
        self._refuse_if_stopping()

    def gauges(self) -> dict[str, float]:
        s = self.engine.stats()
        out = {"queue_depth": s["waiting"], "running": s["running"], "max_running": s["max_seqs"],
               "engine_tokens_per_second": s.get("tokens_per_s", 0.0)}
        if "prompt_tokens_reused" in s:
            # Prompt tokens whose KV the cache held (a shared prefix, the next turn of a chat),
            # and those the model computed.
            out["prefix_hit_tokens_total"] = s["prompt_tokens_reused"]
            out["prefill_tokens_computed_total"] = s.get("prompt_tokens_computed", 0)
            if s.get("prompt_tokens"):
                out["prefix_cache_hit_rate"] = s["prompt_tokens_reused"] / s["prompt_tokens"]
        for name in _KV_BLOCK_GAUGES:  # a paged KV cache (hybrid/engine/block_pool.py)
            if name in s:
                out[name] = s[name]
        from hybrid.chat.cache_stats import hit_rate

        rate = hit_rate(self.model, self._hits)
        if rate is not None:
            out["cache_hit_rate"] = rate
        if "expert_swaps" in s:  # online re-placement (hybrid.load(online=...)) is on
            out["expert_swaps_total"] = s["expert_swaps"]
        return out


_KV_BLOCK_GAUGES = ("kv_bytes_per_token", "kv_blocks_total", "kv_blocks_used", "kv_blocks_shared", "kv_blocks_cached",
                    "kv_blocks_free", "kv_blocks_reserved", "kv_block_size")


# Roles whose text may come from a third party (a person, a web page, a tool): their special-token
# strings must stay text. Assistant turns are the model's own output echoed back by the client.
_UNTRUSTED_ROLES = frozenset({"user", "system", "developer", "tool"})


def _untrusted_text(messages) -> list[str]:
    """The text of untrusted messages, in prompt order (string content or text parts)."""
    out: list[str] = []
    for m in messages or ():
        if not isinstance(m, dict) or m.get("role") not in _UNTRUSTED_ROLES:
            continue
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p["text"] for p in content
                    if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out
