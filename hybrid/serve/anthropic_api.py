"""Anthropic dialect: POST /v1/messages in, a Message or its event stream out.

The request's content blocks are translated into the OpenAI-shaped chat messages the template
reads (tool_use -> tool_calls, tool_result -> role "tool", thinking -> reasoning_content). The
stream follows Anthropic's event sequence exactly: message_start, ping, then per content block
content_block_start / content_block_delta... / content_block_stop, then message_delta (stop_reason,
usage) and message_stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator

from hybrid.serve.errors import bad_request
from hybrid.serve.fields import check, get, get_number, get_stop_list
from hybrid.serve.job import Finish, Job
from hybrid.serve.openai_api import check_model, force
from hybrid.serve.output import output_events


@dataclass
class Options:
    model: str
    stream: bool = False


# ---- requests -----------------------------------------------------------------------------


def _block_text(blocks, where: str) -> str:
    """A string, or a list of text blocks (system prompts, tool results)."""
    if isinstance(blocks, str):
        return blocks
    check(isinstance(blocks, list), f"'{where}' must be a string or an array of text blocks", where)
    out = []
    for j, b in enumerate(blocks):
        bw = f"{where}[{j}]"
        check(isinstance(b, dict), f"'{bw}' must be an object", bw)
        kind = get(b, "type", bw, str)
        if kind != "text":
            raise bad_request(f"'{bw}.type' is '{kind}'; only text blocks are supported here", f"{bw}.type")
        out.append(get(b, "text", bw, str))
    return "".join(out)


def _user_message(content, where: str) -> list[dict]:
    """One Anthropic user turn -> tool results (role "tool") first, then the user's text."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    check(isinstance(content, list), f"'{where}' must be a string or an array of content blocks", where)
    tools, texts = [], []
    for j, b in enumerate(content):
        bw = f"{where}[{j}]"
        check(isinstance(b, dict), f"'{bw}' must be an object", bw)
        kind = get(b, "type", bw, str)
        if kind == "text":
            texts.append(get(b, "text", bw, str))
        elif kind == "tool_result":
            text = _block_text(b.get("content") or "", f"{bw}.content")
            if get(b, "is_error", bw, bool, default=False):
                text = f"Error: {text}"
            tools.append({"role": "tool", "tool_call_id": get(b, "tool_use_id", bw, str), "content": text})
        else:
            raise bad_request(f"'{bw}.type' is '{kind}'; this model accepts text and tool_result blocks "
                              "in user turns", f"{bw}.type")
    out = tools
    if texts:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant_message(content, where: str) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    check(isinstance(content, list), f"'{where}' must be a string or an array of content blocks", where)
    msg: dict = {"role": "assistant", "content": ""}
    texts, thinking, calls = [], [], []
    for j, b in enumerate(content):
        bw = f"{where}[{j}]"
        check(isinstance(b, dict), f"'{bw}' must be an object", bw)
        kind = get(b, "type", bw, str)
        if kind == "text":
            texts.append(get(b, "text", bw, str))
        elif kind == "thinking":
            thinking.append(get(b, "thinking", bw, str))
        elif kind == "redacted_thinking":
            continue  # opaque to us by definition
        elif kind == "tool_use":
            args = get(b, "input", bw, dict)
            calls.append({"id": get(b, "id", bw, str), "type": "function",
                          "function": {"name": get(b, "name", bw, str),
                                       "arguments": json.dumps(args, ensure_ascii=False)}})
        else:
            raise bad_request(f"'{bw}.type' is '{kind}'; assistant turns may hold text, thinking and "
                              "tool_use blocks", f"{bw}.type")
    msg["content"] = "".join(texts)
    if thinking:
        msg["reasoning_content"] = "".join(thinking)
    if calls:
        msg["tool_calls"] = calls
    return msg


def parse_messages(raw) -> list[dict]:
    check(isinstance(raw, list), "'messages' must be an array", "messages")
    check(len(raw) > 0, "'messages' must contain at least one message", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        check(isinstance(m, dict), f"'{where}' must be an object", where)
        role = get(m, "role", where, str)
        content = m.get("content")
        check(content is not None, f"'{where}.content' is required", f"{where}.content")
        if role == "user":
            out += _user_message(content, f"{where}.content")
        elif role == "assistant":
            out.append(_assistant_message(content, f"{where}.content"))
        else:
            raise bad_request(f"'{where}.role' must be 'user' or 'assistant' (system goes in 'system'); "
                              f"got '{role}'", f"{where}.role")
    return out


def parse_tools(body: dict) -> list[dict] | None:
    tools = get(body, "tools", "", list, default=None)
    if not tools:
        return None
    out, names = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        check(isinstance(t, dict), f"'{where}' must be an object", where)
        kind = t.get("type")
        check(kind in (None, "custom"), f"'{where}.type' is '{kind}'; only client tools are supported", f"{where}.type")
        name = get(t, "name", where, str)
        check(name != "" and name not in names, f"'{where}.name' must be a unique, non-empty name", f"{where}.name")
        names.add(name)
        fn = {"name": name, "parameters": get(t, "input_schema", where, dict)}
        if t.get("description") is not None:
            fn["description"] = get(t, "description", where, str)
        out.append({"type": "function", "function": fn})
    return out


def apply_tool_choice(job: Job, body: dict, names: list[str]) -> None:
    """Anthropic tool_choice: {"type": "auto" | "any" | "tool" (with "name") | "none"}."""
    choice = get(body, "tool_choice", "", dict, default=None)
    kind = "auto" if choice is None else get(choice, "type", "tool_choice", str)
    check(kind in ("auto", "any", "tool", "none"),
          "'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'", "tool_choice.type")
    if kind in ("any", "tool"):
        check(bool(names), f"'tool_choice.type' is '{kind}' but no tools were given", "tool_choice.type")
    if kind == "none" or not names:
        job.tools, job.parse_tools = None, False
    elif kind == "any":
        force(job, None)
    elif kind == "tool":
        name = get(choice, "name", "tool_choice", str)
        check(name in names, f"'tool_choice.name' is '{name}', which is not among the tools offered",
              "tool_choice.name")
        force(job, name)


def parse_thinking(body: dict) -> bool | None:
    t = get(body, "thinking", "", dict, default=None)
    if t is None:
        return None
    kind = get(t, "type", "thinking", str)
    check(kind in ("enabled", "disabled", "adaptive", "between_tools"),
          "'thinking.type' must be 'enabled', 'disabled', 'adaptive' or 'between_tools'", "thinking.type")
    if kind == "enabled":
        budget = get(t, "budget_tokens", "thinking", int)
        check(budget >= 1, "'thinking.budget_tokens' must be at least 1", "thinking.budget_tokens")
    return kind != "disabled"


def parse_request(body: dict, served_model: str, max_tokens_limit: int, count_only: bool = False) -> tuple[Job, Options]:
    """count_only: /v1/messages/count_tokens, where max_tokens and sampling do not apply."""
    opts = Options(model=check_model(body, served_model))
    if count_only and body.get("max_tokens") is None:
        body = dict(body, max_tokens=1)
    messages = parse_messages(body.get("messages"))
    system = body.get("system")
    if system is not None:
        messages.insert(0, {"role": "system", "content": _block_text(system, "system")})
    job = Job(messages=messages)
    last = messages[-1]
    if last["role"] == "assistant" and not last.get("tool_calls"):
        # Prefill: the answer continues the client's text, which is not sent back.
        messages.pop()
        job.assistant_prefix, job.prefix_is_output = last["content"], False
        job.thinking = False
    mt = get(body, "max_tokens", "", int)
    check(mt >= 1, f"'max_tokens' must be at least 1, got {mt}", "max_tokens")
    if mt > max_tokens_limit:
        raise bad_request(f"'max_tokens' is {mt}, more than this server's limit of {max_tokens_limit} "
                          "output tokens per request", "max_tokens")
    job.max_tokens = mt
    job.tools = parse_tools(body)
    job.parse_tools = job.tools is not None
    thinking = parse_thinking(body)
    if job.thinking is None:
        job.thinking = thinking
    apply_tool_choice(job, body, [t["function"]["name"] for t in job.tools or []])
    job.temperature = get_number(body, "temperature", "", 0.0, 1.0, default=1.0)
    job.top_p = get_number(body, "top_p", "", 0.0, 1.0, default=1.0)
    check(job.top_p > 0, "'top_p' must be greater than 0", "top_p")
    job.top_k = get_number(body, "top_k", "", 0, 1 << 30, default=0, integer=True)
    job.stop = get_stop_list(body, "stop_sequences")
    job.ignore_eos = get(body, "ignore_eos", "", bool, default=False)  # extension, as in OpenAI routes
    opts.stream = get(body, "stream", "", bool, default=False)
    get(body, "metadata", "", dict, default=None)
    return job, opts


# ---- responses ----------------------------------------------------------------------------


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
    whose arguments do not parse is handed over as text (what the model wrote), not dropped.
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
            if value is None:
                from hybrid.toolcalls import ToolCall, render_tool_calls

                raw = render_tool_calls([ToolCall(call["id"], call["name"], call["args"])])
                return [("text", raw)]
            self.n_tool_use += 1
            return [("tool_use", {"type": "tool_use", "id": call["id"], "name": call["name"], "input": value})]
        return []


def _usage(fin: Finish) -> dict:
    return {"input_tokens": fin.prompt_tokens, "output_tokens": fin.completion_tokens,
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
                                             "input_tokens": fin.prompt_tokens}})
    yield _event("message_stop", {"type": "message_stop"})


def error_event(body: dict) -> str:
    return _event("error", body)
