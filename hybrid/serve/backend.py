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

import functools
import json
import threading
import weakref

from hybrid.serve.errors import ApiError, bad_request
from hybrid.serve.images import FORMATS, ImagePolicy
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
                 model=None, images: ImagePolicy | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_queued = max_queued
        self.metrics = metrics
        self.model = model  # hybrid.load()'s Model, when the server loaded one (for cache stats)
        self.images = images or ImagePolicy()  # where image bytes may come from, and the limits
        self.vision = model.vision if model is not None else None  # hybrid/models/vision.py; None: text only
        self._special_texts = tuple(tokenizer.special_tokens)
        self._accepting = True
        self._runs = weakref.WeakSet()  # every Run started (a finished one drops out when freed)
        self._runs_lock = threading.Lock()  # start() runs in worker threads
        from hybrid.chat.cache_stats import attach_hit_counter

        self._hits = attach_hit_counter(model) if model is not None else None
        from hybrid.engine.grammar import GrammarCompiler

        self.grammars = GrammarCompiler(tokenizer)
        self._grammar_cache: dict[str, object] = {}  # grammar text -> Grammar (sub-agents share tools)

    @property
    def context_length(self) -> int:
        return self.engine.max_context

    def render_prompt(self, job: Job) -> tuple[list[int], bool]:
        """Token ids of the prompt (images expanded to their tokens), and whether it leaves the
        model inside <think>."""
        ids, in_reasoning, _ = self._prompt(job)
        return ids, in_reasoning

    def _prompt(self, job: Job) -> tuple[list[int], bool, list]:
        """(token ids, in reasoning, the images' ImageSpans)."""
        ids, in_reasoning = self._text_prompt(job)
        if not job.images:
            return ids, in_reasoning, []
        ids, spans = self._expand(ids, job)
        return ids, in_reasoning, spans

    def _expand(self, ids: list[int], job: Job) -> tuple[list[int], list]:
        """The images' bytes (under the server's policy), decoded and prepared; each placeholder
        expanded to its image's tokens. Every failure is a 4xx naming the image's field."""
        from hybrid.models.moonvit_images import ImageError
        from hybrid.models.vision import ImageLimits

        first = job.images[0].where
        if self.vision is None:
            raise bad_request(f"'{first}': this model accepts text only (it has no vision tower, or the server "
                              "was started without image input)", first)
        pol = self.images
        if len(job.images) > pol.max_images:
            raise bad_request(f"the request holds {len(job.images)} images; this server accepts at most "
                              f"{pol.max_images} per request", first)
        limits = ImageLimits(max_pixels=pol.max_pixels)
        prepared = []
        for ref in job.images:
            data = pol.bytes_of(ref)
            try:
                prepared.append(self.vision.prepare_one(data, f"'{ref.where}'", limits, FORMATS))
            except ImageError as e:
                raise bad_request(str(e), ref.where) from None
        try:
            return self.vision.expand(ids, prepared)
        except ValueError as e:  # a template that wrote no placeholder (or too many) for the images
            raise bad_request(f"the chat template's prompt does not fit the images: {e}", "messages") from None

    def _text_prompt(self, job: Job) -> tuple[list[int], bool]:
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

    def _token_rules(self, job: Job, in_reasoning: bool) -> dict:
        """SamplingParams' token rules for a chat reply (none for a raw completion prompt).

        - A reply that starts in reasoning may not end before </think> and one token of answer
          (answer_after, held_ids, blank_ids): it ends with an answer, or with "length" and its
          reasoning when the budget runs out, never a "stop" with empty content; </think> is
          not written twice. A reasoning budget (Anthropic's thinking.budget_tokens) ends the
          reasoning after that many tokens (answer_by).
        - Markers with no place in this reply are never drawn (banned_ids): <think> (the prompt
          opened or closed it), </think> in instant mode, and the tool-call markers when no tools
          were offered (the output parser would drop such a section, leaving no answer).
        """
        from hybrid.toolcalls import GRAMMAR_MARKERS, THINK_BEGIN, THINK_END

        if job.messages is None:
            return {}
        special = self.tokenizer.special_tokens
        banned = {THINK_BEGIN} | ({THINK_END} if not in_reasoning else set())
        if not job.parse_tools:
            banned |= set(GRAMMAR_MARKERS) - {THINK_BEGIN, THINK_END}
        rules = {"banned_ids": sorted(special[t] for t in banned if t in special)}
        end = special.get(THINK_END)
        held = [] if job.ignore_eos else list(self.tokenizer.stop_token_ids)
        if in_reasoning and end is not None and (held or job.reasoning_budget is not None):
            rules.update(answer_after=end, held_ids=held, answer_by=job.reasoning_budget,
                         blank_ids=self._blank_ids)
        return rules

    @functools.cached_property
    def _blank_ids(self) -> frozenset:
        """Tokens after which an answer is still empty as shown: whitespace, and the special
        tokens the output parser drops (all but the tool-call section's start)."""
        from hybrid.toolcalls import SECTION_BEGIN

        blank = {i for i, b in enumerate(self.tokenizer.vocab_bytes()) if not b.strip()}
        return frozenset(blank | {i for t, i in self.tokenizer.special_tokens.items() if t != SECTION_BEGIN})

    def grammar_for(self, job: Job, in_reasoning: bool):
        """The grammar the answer is decoded under, or None: response_format's schema, tool calls
        held to the offered tools and their parameters (tool_choice auto, required, named).
        A schema the grammar library cannot enforce is a 400 naming its field."""
        from hybrid.toolcalls import output_grammar

        tools = job.tools if job.parse_tools else None
        if job.messages is None or (job.answer_schema is None and not tools):
            return None
        if job.tool_choice == "named":
            tools = [t for t in tools if t["function"]["name"] == job.forced_tool]
        lenient = job.tool_choice == "auto"  # the client did not ask for the arguments' schema
        for i, t in enumerate(job.tools or ()):
            if t in tools:
                params = t["function"]["parameters"]
                self._compile(lambda: self.grammars.json_schema(params, lenient),
                              f"tools[{i}].function.parameters", key=json.dumps([params, lenient]))
        if job.answer_schema is not None:
            self._compile(lambda: self.grammars.json_schema(job.answer_schema, job.answer_lenient),
                          job.answer_field,
                          key=json.dumps([job.answer_schema, job.answer_lenient]))
        text = output_grammar(self.tokenizer.special_tokens, in_reasoning=in_reasoning, tools=tools,
                              tool_choice=job.tool_choice, answer_schema=job.answer_schema,
                              lenient_tools=lenient, lenient_answer=job.answer_lenient)
        return self._compile(lambda: self.grammars.lark(text), "tools" if tools else job.answer_field, key=text)

    def _compile(self, build, field: str, key: str):
        """build() once per key (a schema checked, a grammar built; the last 256 are kept)."""
        from hybrid.engine.grammar import GrammarError

        with self._runs_lock:
            if key in self._grammar_cache:
                return self._grammar_cache[key]
        try:
            grammar = build()
        except GrammarError as e:
            raise bad_request(f"'{field}' cannot be enforced: {e}", field) from None
        with self._runs_lock:
            if len(self._grammar_cache) >= 256:
                self._grammar_cache.pop(next(iter(self._grammar_cache)))
            self._grammar_cache[key] = grammar
        return grammar

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
        ids, in_reasoning, spans = self._prompt(job)
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
                                    frequency_penalty=job.frequency_penalty, ignore_eos=job.ignore_eos,
                                    grammar=self.grammar_for(job, in_reasoning),
                                    **self._token_rules(job, in_reasoning))
            handle = self.engine.submit(ids, params, stop=job.stop, max_tokens=max_tokens, images=spans)
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
