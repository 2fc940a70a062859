"""Anthropic dialect, responses: output events -> a Message, or its event stream.

The stream follows Anthropic's event sequence exactly: message_start, ping, then per content
block content_block_start / content_block_delta... / content_block_stop, then message_delta
(stop_reason, usage) and message_stop.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from hybrid.serve.anthropic_requests import Options
from hybrid.serve.job import Finish, Job
from hybrid.serve.output import output_events
from hybrid.toolcalls import GRAMMAR_MARKERS


def stop_reason(fin: Finish, has_calls: bool) -> tuple[str, str | None]:
    if fin.reason == "length":
        return "max_tokens", None
    if fin.stop_string is not None:
        return "stop_sequence", fin.stop_string
    return ("tool_use" if has_calls else "end_turn"), None


def _tool_input(arguments: str) -> dict | None:
    """The call's JSON arguments as an object, or None when the model wrote something else."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class _Blocks:
    """Folds output events into Anthropic content blocks, in order.

    Tool calls are held until complete, because tool_use.input must be a JSON object: a call
    whose arguments do not parse is handed over as text, NAME(ARGUMENTS as the model wrote
    them), not dropped.
    Whitespace that would open a text block is held until real text follows, so a newline before
    a tool call does not make an empty-looking text block.
    """

    def __init__(self):
        self.calls: dict[int, dict] = {}
        self.pending_ws = ""
        self.n_tool_use = 0
        self.last = None  # kind of the block being written

    def feed(self, ev) -> list[tuple]:
        """-> [(block_type, payload)]: ("thinking", text) | ("text", text) | ("tool_use", block)."""
        out = self._feed(ev)
        if out:
            self.last = out[-1][0]
        return out

    def _feed(self, ev) -> list[tuple]:
        kind = ev[0]
        if kind == "reasoning":
            return [("thinking", ev[1])]
        if kind == "content":
            if self.last == "text":
                return [("text", ev[1])]
            text = self.pending_ws + ev[1]
            if not text.strip():
                self.pending_ws = text
                return []
            self.pending_ws = ""
            return [("text", text)]
        if kind == "tool_start":
            self.calls[ev[1]] = {"id": ev[2], "name": ev[3], "args": ""}
        elif kind == "tool_args":
            self.calls[ev[1]]["args"] += ev[2]
        elif kind == "tool_end":
            call = self.calls.pop(ev[1])
            value = _tool_input(call["args"])
            if value is None:  # shown as a call in words: no marker text in a text block
                args = call["args"].strip()
                for marker in GRAMMAR_MARKERS:
                    args = args.replace(marker, "")
                return [("text", f"{call['name']}({args})")]
            self.n_tool_use += 1
            return [("tool_use", {"type": "tool_use", "id": call["id"], "name": call["name"], "input": value})]
        return []


def _usage(fin: Finish) -> dict:
    # Anthropic counts input as input_tokens + cache_creation + cache_read: the prompt tokens
    # whose KV was reused from the chat's previous turn are cache reads, not input_tokens.
    return {"input_tokens": fin.prompt_tokens - fin.cached_tokens, "output_tokens": fin.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": fin.cached_tokens}


async def message_response(run, job: Job, opts: Options) -> dict:
    blocks = _Blocks()
    content: list[dict] = []
    fin = None
    async for ev in output_events(run, job):
        if ev[0] == "finish":
            fin = ev[1]
            continue
        for kind, payload in blocks.feed(ev):
            last = content[-1] if content else None
            if kind == "thinking":
                if last and last["type"] == "thinking":
                    last["thinking"] += payload
                else:
                    content.append({"type": "thinking", "thinking": payload, "signature": ""})
            elif kind == "text":
                if last and last["type"] == "text":
                    last["text"] += payload
                else:
                    content.append({"type": "text", "text": payload})
            else:
                content.append(payload)
    reason, seq = stop_reason(fin, blocks.n_tool_use > 0)
    return {"id": run.request_id, "type": "message", "role": "assistant", "model": opts.model,
            "content": content, "stop_reason": reason, "stop_sequence": seq, "usage": _usage(fin)}


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def message_stream(run, job: Job, opts: Options) -> AsyncIterator[str]:
    yield _event("message_start", {"type": "message_start", "message": {
        "id": run.request_id, "type": "message", "role": "assistant", "model": opts.model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": run.prompt_tokens, "output_tokens": 0,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})
    yield _event("ping", {"type": "ping"})
    blocks = _Blocks()
    index, open_kind = -1, None

    def stop_block():
        return _event("content_block_stop", {"type": "content_block_stop", "index": index})

    fin = None
    async for ev in output_events(run, job):
        if ev[0] == "finish":
            fin = ev[1]
            continue
        for kind, payload in blocks.feed(ev):
            if kind != open_kind or kind == "tool_use":
                if open_kind is not None:
                    yield stop_block()
                index += 1
                open_kind = kind
                if kind == "thinking":
                    start = {"type": "thinking", "thinking": "", "signature": ""}
                elif kind == "text":
                    start = {"type": "text", "text": ""}
                else:
                    start = {"type": "tool_use", "id": payload["id"], "name": payload["name"], "input": {}}
                yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                                     "content_block": start})
            if kind == "thinking":
                delta = {"type": "thinking_delta", "thinking": payload}
            elif kind == "text":
                delta = {"type": "text_delta", "text": payload}
            else:
                delta = {"type": "input_json_delta", "partial_json": json.dumps(payload["input"], ensure_ascii=False)}
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    if open_kind is not None:
        yield stop_block()
    reason, seq = stop_reason(fin, blocks.n_tool_use > 0)
    yield _event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": reason, "stop_sequence": seq},
                                   "usage": {"output_tokens": fin.completion_tokens,
                                             "input_tokens": fin.prompt_tokens - fin.cached_tokens,
                                             "cache_read_input_tokens": fin.cached_tokens}})
    yield _event("message_stop", {"type": "message_stop"})


def error_event(body: dict) -> str:
    return _event("error", body)
