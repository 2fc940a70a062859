"""A conversation with a model: history, mode, system prompt, and one streamed reply at a time.

No terminal code here (hybrid/chat/ui.py draws); this is the part tests can drive directly.
ChatSession.ask(text) starts a reply; iterating the Reply yields Kimi output events from
hybrid.toolcalls.StreamParser ("reasoning" / "content" text); Reply.cancel() stops it (Ctrl-C)
and the partial answer is kept in the history, as the model really said it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from hybrid.toolcalls import StreamParser

MODES = ("instant", "thinking")


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV the engine kept from the previous turn
    completion_tokens: int = 0
    prefill_s: float = 0.0  # submit -> first token (queueing + reading the prompt)
    decode_s: float = 0.0  # first token -> last token
    finish_reason: str = ""

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of prefill; the decode rate counts the ones after it.
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 and self.completion_tokens > 1 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        # Only the tokens actually read count; reused ones cost nothing.
        return (self.prompt_tokens - self.reused_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0


@dataclass
class SessionStats:
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    last: TurnStats | None = None

    def add(self, t: TurnStats) -> None:
        self.turns += 1
        self.prompt_tokens += t.prompt_tokens
        self.completion_tokens += t.completion_tokens
        self.prefill_s += t.prefill_s
        self.decode_s += t.decode_s
        self.last = t


@dataclass
class Settings:
    mode: str = "instant"
    system: str | None = None
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int | None = None


class Reply:
    """One streamed answer. Iterate for events; `.reasoning` / `.content` accumulate."""

    def __init__(self, session: "ChatSession", handle, prompt_tokens: int, in_reasoning: bool,
                 reused_before: int | None = None):
        self.session = session
        self.handle = handle
        self.stats = TurnStats(prompt_tokens=prompt_tokens)
        self.parser = StreamParser(start_in_reasoning=in_reasoning, parse_tools=False,
                                   special=tuple(session.tokenizer.special_tokens))
        self.reasoning = ""
        self.content = ""
        self.cancelled = False
        self._t0 = time.monotonic()
        self._t_first: float | None = None
        self._recorded = False
        self._n_tokens = 0  # tokens shown so far (usage arrives only with the final event)
        self._reused_before = reused_before  # the engine's reuse counter at submit

    def __iter__(self):
        try:
            for ev in self.handle:
                self._n_tokens += len(ev.token_ids)
                now = time.monotonic()
                if ev.token_ids and self._t_first is None:
                    self._t_first = now
                    self.stats.prefill_s = now - self._t0
                if ev.finish_reason is not None:
                    self.stats.finish_reason = ev.finish_reason
                    if ev.usage is not None:
                        self.stats.completion_tokens = ev.usage.completion_tokens
                yield from self._take(self.parser.feed(ev.text))
            yield from self._take(self.parser.finish())
        except KeyboardInterrupt:  # Ctrl-C while waiting for a token
            self.cancelled = True
            self.handle.cancel()
            raise
        except GeneratorExit:
            # The reader left its loop early: Ctrl-C in its body (rendering) drops this generator
            # before it can call cancel(), or a plain break. Either way the answer is abandoned:
            # stop the request (else the engine keeps generating it) and record it as cancelled.
            self.cancelled = True
            self.handle.cancel()
            raise
        finally:
            self._record()

    def _take(self, events):
        for ev in events:
            if ev[0] == "reasoning":
                self.reasoning += ev[1]
            elif ev[0] == "content":
                self.content += ev[1]
            yield ev

    def cancel(self) -> None:
        """Stop generating (Ctrl-C). What was said so far stays in the history."""
        self.cancelled = True
        self.handle.cancel()
        self._record()

    def _record(self) -> None:
        if self._recorded:
            return
        self._recorded = True
        end = time.monotonic()
        if self._t_first is not None:
            self.stats.decode_s = end - self._t_first
        if self._reused_before is not None:
            self.stats.reused_tokens = self.session._reused_counter() - self._reused_before
        if self.cancelled:
            self.stats.finish_reason = "cancelled"
            # Usage arrives with the final event, which a cancelled reader never takes.
            self.stats.completion_tokens = max(self.stats.completion_tokens, self._n_tokens)
        self.session._finish_turn(self)


class ChatSession:
    def __init__(self, engine, tokenizer, settings: Settings | None = None, model=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings or Settings()
        self.model = model
        from hybrid.chat.cache_stats import attach_hit_counter

        self._hits = attach_hit_counter(model) if model is not None else None
        self.messages: list[dict] = []
        self.stats = SessionStats()
        # Images: those of the conversation so far in prompt order (every turn's prompt holds
        # them all, so prefix reuse keeps their KV), and those /image attached to the next message.
        self.images: list = []
        self.pending_images: list[tuple[str, object]] = []  # (path, PreparedImage)

    # ---- commands -------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.settings.mode = mode

    def set_system(self, text: str | None) -> None:
        self.settings.system = text or None

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()
        self.pending_images.clear()

    def attach_image(self, path: str):
        """Decode and prepare an image for the next message (ValueError: no vision tower, or
        the file is not an image) -> its PreparedImage."""
        vision = self.model.vision if self.model is not None else None
        if vision is None:
            raise ValueError("this model takes no images (it has no vision tower, or was loaded with --no-images)")
        image = vision.prepare_one(path, path)
        self.pending_images.append((path, image))
        return image

    def transcript(self) -> list[dict]:
        """The conversation as chat messages, system prompt first."""
        head = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return head + [dict(m) for m in self.messages]

    def save(self, path: str) -> str:
        """Write the conversation: Markdown for .md files, JSON otherwise. Returns the format."""
        if str(path).endswith(".md"):
            parts = []
            for m in self.transcript():
                parts.append(f"## {m['role']}\n")
                if m.get("reasoning_content"):
                    parts.append("> " + m["reasoning_content"].replace("\n", "\n> ") + "\n")
                parts.append(_markdown_content(m.get("content")))
                parts.append("")
            text, kind = "\n".join(parts), "markdown"
        else:
            text = json.dumps({"settings": asdict(self.settings), "messages": self.transcript()},
                              indent=2, ensure_ascii=False)
            kind = "json"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        return kind

    # ---- generation -----------------------------------------------------------------------

    def prompt_ids(self, user_text: str) -> tuple[list[int], bool]:
        ids, in_reasoning, _ = self._prompt(self._question(user_text))
        return ids, in_reasoning

    def _question(self, user_text: str) -> dict:
        """The user's message: its text, after the images attached to it."""
        if not self.pending_images:
            return {"role": "user", "content": user_text}
        parts = [{"type": "image", "path": path} for path, _ in self.pending_images]
        return {"role": "user", "content": parts + [{"type": "text", "text": user_text}]}

    def _prompt(self, question: dict) -> tuple[list[int], bool, list]:
        """(token ids, whether the prompt ends inside <think>, the images' ImageSpans)."""
        messages = self.transcript() + [question]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  thinking=self.settings.mode == "thinking")
        ids = self.tokenizer.encode(text)
        images = self.images + [im for _, im in self.pending_images]
        spans = []
        if images:
            ids, spans = self.model.vision.expand(ids, images)
        return ids, text.rstrip().endswith("<think>"), spans

    def ask(self, user_text: str) -> Reply:
        from hybrid.engine.sampling import SamplingParams

        question = self._question(user_text)
        ids, in_reasoning, spans = self._prompt(question)
        room = self.engine.max_context - len(ids)
        if room < 1:
            raise ValueError(f"the conversation is {len(ids)} tokens, the context limit is "
                             f"{self.engine.max_context}: use /reset to start over")
        s = self.settings
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=s.seed)
        reused = self._reused_counter()
        handle = self.engine.submit(ids, params, max_tokens=min(s.max_tokens, room), images=spans)
        try:
            self.messages.append(question)
            self.images += [im for _, im in self.pending_images]
            self.pending_images.clear()
            return Reply(self, handle, len(ids), in_reasoning, reused)
        except BaseException:  # Ctrl-C between submit and the Reply that would own the request
            handle.cancel()
            if self.messages and self.messages[-1] is question:
                self.messages.pop()
            raise

    def _reused_counter(self) -> int | None:
        """The engine's count of prompt tokens served from a kept prefix (None: it has none).
        The chat owns its engine, so the difference over a turn is that turn's reuse."""
        return self.engine.stats().get("prompt_tokens_reused")

    def _finish_turn(self, reply: Reply) -> None:
        msg = {"role": "assistant", "content": reply.content}
        if reply.reasoning:
            msg["reasoning_content"] = reply.reasoning
        self.messages.append(msg)
        self.stats.add(reply.stats)

    def cache_hit_rate(self) -> float | None:
        from hybrid.chat.cache_stats import hit_rate

        return hit_rate(self.model, self._hits)


def _markdown_content(content) -> str:
    if isinstance(content, list):  # a message with images: [image: PATH] where each one was
        return "".join(p.get("text", "") if p.get("type") == "text" else f"[image: {p.get('path', '?')}]\n"
                       for p in content)
    return content or ""
