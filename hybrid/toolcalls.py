"""Kimi's output format: reasoning in <think>...</think>, tool calls in special-token sections.

What a Kimi K2 / K2.5 model writes after `<|im_assistant|>assistant<|im_middle|>`:

    <think>REASONING</think>CONTENT
    <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{JSON}<|tool_call_end|>
      ... more calls ...
    <|tool_calls_section_end|>

(no spaces or newlines between the markers in practice; whitespace there is tolerated). The call
id is the text between <|tool_call_begin|> and <|tool_call_argument_begin|>; Kimi numbers calls
across the conversation and expects the same id back in the tool result. Since every
conversation's first call is :0, the server hands clients that id with a unique suffix and maps
the history back to Kimi's numbering (hybrid.serve.output.client_call_id, kimi_call_ids).

This module has two parsers over the decoded text (special tokens kept):
  - parse_output(text): the whole answer at once -> reasoning, content, tool calls;
  - StreamParser: the same split fed delta by delta, emitting events as soon as they are certain,
    holding back only a tail that could still be the start of a marker.
and the inverse, render_tool_calls(calls), which writes calls back in the model's own format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
# Some Kimi checkpoints emit the singular spelling; both open a tool-call section.
SECTION_BEGIN_ALT = "<|tool_call_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
SECTION_END_ALT = "<|tool_call_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
CALL_ARGS = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"

_CALL_ID = re.compile(r"^\s*(?:functions\.)?(?P<name>[^:\s]+?)(?::(?P<idx>\d+))?\s*$")


@dataclass
class ToolCall:
    id: str  # Kimi's call id as written by the model, e.g. "functions.get_weather:0"
    name: str  # function name, e.g. "get_weather"
    arguments: str  # the JSON text the model wrote, unparsed (OpenAI hands it on as a string)


@dataclass
class ParsedOutput:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def split_call_id(call_id: str) -> tuple[str, int | None]:
    """'functions.get_weather:3' -> ('get_weather', 3). Raises ValueError if it has no name."""
    m = _CALL_ID.match(call_id)
    if not m:
        raise ValueError(f"tool call id {call_id!r} is not of the form functions.NAME:IDX")
    idx = m.group("idx")
    return m.group("name"), (int(idx) if idx is not None else None)


def make_call_id(name: str, index: int) -> str:
    return f"functions.{name}:{index}"


def render_tool_calls(calls: list[ToolCall]) -> str:
    """The tool-call section exactly as a Kimi model writes it (the inverse of the parsers)."""
    if not calls:
        return ""
    parts = [SECTION_BEGIN]
    for c in calls:
        parts += [CALL_BEGIN, c.id, CALL_ARGS, c.arguments, CALL_END]
    parts.append(SECTION_END)
    return "".join(parts)


def parse_output(text: str, start_in_reasoning: bool = False, parse_tools: bool = True,
                 special=()) -> ParsedOutput:
    """Split a complete decoded answer. `start_in_reasoning`: the prompt already opened <think>;
    `special`: the tokenizer's special-token texts (see StreamParser)."""
    parser = StreamParser(start_in_reasoning=start_in_reasoning, parse_tools=parse_tools, special=special)
    events = parser.feed(text) + parser.finish()
    return collect(events)


def collect(events: list[tuple]) -> ParsedOutput:
    """Fold StreamParser events into a ParsedOutput."""
    out = ParsedOutput()
    reasoning, content = [], []
    for ev in events:
        kind = ev[0]
        if kind == "reasoning":
            reasoning.append(ev[1])
        elif kind == "content":
            content.append(ev[1])
        elif kind == "tool_start":
            out.tool_calls.append(ToolCall(id=ev[2], name=ev[3], arguments=""))
        elif kind == "tool_args":
            out.tool_calls[ev[1]].arguments += ev[2]
    out.reasoning = "".join(reasoning)
    out.content = "".join(content)
    for c in out.tool_calls:
        c.arguments = c.arguments.strip()
    return out


# Parser states; _DROP: a marker that changes no state and is removed from the text.
_REASONING, _CONTENT, _SECTION, _CALL_ID_TEXT, _CALL_ARGS_TEXT, _DONE, _DROP = range(7)
GRAMMAR_MARKERS = (THINK_BEGIN, THINK_END, SECTION_BEGIN, SECTION_BEGIN_ALT, SECTION_END, SECTION_END_ALT,
                   CALL_BEGIN, CALL_ARGS, CALL_END)


@lru_cache(maxsize=64)
def _scanner(transitions: tuple[tuple[str, int], ...], dropped: tuple[str, ...]):
    """-> (regex finding the earliest marker, longest first at one position; {marker: next
    state}; the set of markers' proper prefixes; the longest marker's length)."""
    nxt = dict.fromkeys(dropped, _DROP)
    nxt.update(transitions)
    pattern = re.compile("|".join(re.escape(m) for m in sorted(nxt, key=len, reverse=True)))
    prefixes = frozenset(m[:k] for m in nxt for k in range(1, len(m)))
    return pattern, nxt, prefixes, max(map(len, nxt))


class StreamParser:
    """Incremental splitter of Kimi output into events.

    feed(delta) and finish() return lists of events:
      ("reasoning", text)              thinking text (between <think> and </think>)
      ("content", text)                answer text
      ("tool_start", i, id, name)      call i begins (id and name known)
      ("tool_args", i, text)           a piece of call i's JSON arguments
      ("tool_end", i)                  call i complete
    Text is emitted as soon as it cannot be part of a marker, so streaming stays smooth; at most
    len(longest marker) - 1 characters are held back.

    No marker text is ever emitted as reasoning or content: a marker out of place there (a
    <think> after the answer began, a </think> outside reasoning, a call marker outside a
    section) is dropped, and so is every string in `special` (the tokenizer's other special
    tokens: a model that writes <|im_middle|> or [BOS] mid-answer must not show it). In a call's
    id and arguments only the `special` strings are dropped; the format's markers are data there.
    """

    def __init__(self, start_in_reasoning: bool = False, parse_tools: bool = True, special=()):
        # parse_tools=False: no tools were offered, so a tool-call section is a call the client
        # never allowed: it is parsed (so its markers and arguments are not shown) and dropped.
        self.parse_tools = parse_tools
        self.state = _REASONING if start_in_reasoning else _CONTENT
        self.buf = ""
        self.n_calls = 0
        self.seen_text = False  # any content emitted yet (a <think> is only honoured at the start)
        self._id_text = ""
        self._special = tuple(sorted(set(special) - set(GRAMMAR_MARKERS)))
        self._dropped = self._special + GRAMMAR_MARKERS
        self._scanners: dict = {}

    # Markers that end the current state, with the state they lead to.
    def _transitions(self) -> tuple[tuple[str, int], ...]:
        opens = ((SECTION_BEGIN, _SECTION), (SECTION_BEGIN_ALT, _SECTION))
        if self.state == _REASONING:
            return ((THINK_END, _CONTENT),) + opens
        if self.state == _CONTENT:
            return opens + (() if self.seen_text else ((THINK_BEGIN, _REASONING),))
        if self.state == _SECTION:
            return ((CALL_BEGIN, _CALL_ID_TEXT), (SECTION_END, _DONE), (SECTION_END_ALT, _DONE))
        if self.state == _CALL_ID_TEXT:
            return ((CALL_ARGS, _CALL_ARGS_TEXT),)
        if self.state == _CALL_ARGS_TEXT:
            return ((CALL_END, _SECTION),)
        # After the section: anything further is content (rare; some models add a closing line).
        return opens

    def _scan(self):
        key = (self.state, self.seen_text)
        if key not in self._scanners:
            # A call's id and JSON arguments are data: the format's markers there are kept as
            # written, only the tokenizer's other special tokens go.
            shown = self.state in (_REASONING, _CONTENT, _DONE)
            self._scanners[key] = _scanner(self._transitions(), self._dropped if shown else self._special)
        return self._scanners[key]

    def feed(self, delta: str) -> list[tuple]:
        self.buf += delta
        events: list[tuple] = []
        while True:
            pattern, nxt, prefixes, longest = self._scan()
            hit = pattern.search(self.buf)
            if hit is None:
                # Keep back the longest tail that is a prefix of some marker.
                keep = next((k for k in range(min(longest - 1, len(self.buf)), 0, -1)
                             if self.buf[-k:] in prefixes), 0)
                emit, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
                self._emit_text(emit, events)
                return events
            marker = hit.group()
            self._emit_text(self.buf[: hit.start()], events)
            self.buf = self.buf[hit.end() :]
            if nxt[marker] == _DROP or (marker == THINK_BEGIN and self.seen_text):
                continue  # (text came just before this <think>: it is out of place too)
            self._transition(nxt[marker], events)

    def finish(self) -> list[tuple]:
        """Flush at the end of generation. An unterminated call is closed with what it has."""
        events: list[tuple] = []
        self._emit_text(self.buf, events)
        self.buf = ""
        if self.state == _CALL_ID_TEXT and self._id_text.strip():
            self._start_call(events)
            self.state = _CALL_ARGS_TEXT
        if self.state == _CALL_ARGS_TEXT:
            self._tool_event(events, ("tool_end", self.n_calls - 1))
        self.state = _DONE
        return events

    def _tool_event(self, events: list[tuple], ev: tuple) -> None:
        if self.parse_tools:
            events.append(ev)

    def _emit_text(self, text: str, events: list[tuple]) -> None:
        if not text:
            return
        if self.state == _REASONING:
            events.append(("reasoning", text))
        elif self.state in (_CONTENT, _DONE):
            # Whitespace before a leading <think> must not make the <think> count as content.
            if text.strip():
                self.seen_text = True
            events.append(("content", text))
        elif self.state == _CALL_ID_TEXT:
            self._id_text += text
        elif self.state == _CALL_ARGS_TEXT:
            self._tool_event(events, ("tool_args", self.n_calls - 1, text))
        # _SECTION: whitespace between calls is dropped.

    def _start_call(self, events: list[tuple]) -> None:
        call_id = self._id_text.strip()
        self._id_text = ""
        try:
            name, _ = split_call_id(call_id)
        except ValueError:
            name = call_id
        self._tool_event(events, ("tool_start", self.n_calls, call_id, name))
        self.n_calls += 1

    def _transition(self, nxt: int, events: list[tuple]) -> None:
        if self.state == _CALL_ID_TEXT and nxt == _CALL_ARGS_TEXT:
            self._start_call(events)
        elif self.state == _CALL_ARGS_TEXT and nxt == _SECTION:
            self._tool_event(events, ("tool_end", self.n_calls - 1))
        elif nxt == _CALL_ID_TEXT:
            self._id_text = ""
        self.state = nxt


# ---- grammars for constrained decoding (llguidance's Lark dialect, hybrid.engine.grammar) ----

def _marker(text: str, special: dict[str, int]) -> str:
    """A marker as a grammar terminal: the special token by id when it is one, else its text."""
    return f"<[{special[text]}]>" if text in special else json.dumps(text)


def output_grammar(special: dict[str, int], *, in_reasoning: bool = False, tools: list[dict] | None = None,
                   tool_choice: str = "auto", answer_schema: dict | None = None,
                   lenient_tools: bool = False, lenient_answer: bool = False) -> str:
    """The Lark grammar of an answer in Kimi's format, from where the prompt leaves off.

    special: the tokenizer's special tokens (text -> id). in_reasoning: the prompt ends inside
    <think>, so the answer starts with reasoning (free text) up to </think>. tools: OpenAI-shaped
    tools; tool_choice: "auto" (text, then optionally a tool-call section), "required" (the
    prompt ends with hybrid.serve.output's forced prefix "...<|tool_call_begin|>functions.", so
    the answer goes on with a call's NAME:IDX) or "named" (the prompt ends at the one tool's
    <|tool_call_argument_begin|>). Every call names an offered tool and its arguments match that
    tool's parameters. answer_schema: the answer text (when it is not a tool call) is JSON valid
    under this schema. lenient_tools: keywords the library does not implement in a tool's
    parameters are ignored instead of refused (tool_choice "auto", where the schema was not asked
    to be enforced); lenient_answer: the same for answer_schema (a non-strict response_format).
    """
    m = lambda t: _marker(t, special)  # noqa: E731
    opts = {"whitespace_flexible": False, "lenient": lenient_tools}
    rules = ["%llguidance {}"]

    def schema(s: dict, extra: dict | None = None) -> str:
        return "%json " + json.dumps(dict(s, **({"x-guidance": extra} if extra else {})))

    calls = []
    for i, t in enumerate(tools or []):
        fn = t["function"]
        rules.append(f"args_{i}: {schema(fn.get('parameters') or {'type': 'object'}, opts)}")
        rules.append(f'call_{i}: {json.dumps(fn["name"], ensure_ascii=False)} ":" /[0-9]+/ {m(CALL_ARGS)} args_{i} {m(CALL_END)}')
        calls.append(f"call_{i}")
    if calls:
        rules.append("call: " + " | ".join(calls))
        rules.append(f'more_calls: ({m(CALL_BEGIN)} "functions." call)* {m(SECTION_END)}')
    if tool_choice == "required":
        rules.insert(1, "start: call more_calls")
        return "\n".join(rules)
    if tool_choice == "named":
        rules.insert(1, f"start: args_0 {m(CALL_END)} {m(SECTION_END)}")
        return "\n".join(rules)
    if answer_schema is not None:
        rules.append(f"answer: {schema(answer_schema, dict(opts, lenient=lenient_answer))}")
    else:
        rules.append("answer: TEXT")
        rules.append(r"TEXT: /(.|\n)*/")
    body = "answer"
    if calls:
        rules.append(f'section: {m(SECTION_BEGIN)} {m(CALL_BEGIN)} "functions." call more_calls')
        body = "answer section?" if answer_schema is None else "(answer | section)"
    if in_reasoning:
        rules.append(f"reasoning: REASONING {m(THINK_END)}")
        rules.append(r"REASONING: /(.|\n)*/")
        body = "reasoning " + body
    rules.insert(1, f"start: {body}")
    return "\n".join(rules)
