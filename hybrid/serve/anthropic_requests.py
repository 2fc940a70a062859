"""Anthropic dialect, requests: a /v1/messages body -> a Job.

Content blocks are translated into the OpenAI-shaped chat messages the template reads:
tool_use -> tool_calls, tool_result -> role "tool", thinking -> reasoning_content, `system` ->
a system message. A final assistant turn is a prefill: the answer continues it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hybrid.serve.errors import bad_request
from hybrid.serve.fields import (check, check_model, get, get_number, get_stop_list, iter_messages, iter_tools,
                                 unique_name)
from hybrid.serve.images import anthropic_image
from hybrid.serve.job import Job
from hybrid.serve.output import force_tool_call


@dataclass
class Options:
    model: str
    stream: bool = False


def _iter_blocks(blocks, where: str, what: str = "content"):
    """(where, block, type) for each entry of an array of blocks (a string was handled by the
    caller), each checked to be an object with a string type; `what` names the blocks expected."""
    check(isinstance(blocks, list), f"'{where}' must be a string or an array of {what} blocks", where)
    for j, b in enumerate(blocks):
        bw = f"{where}[{j}]"
        check(isinstance(b, dict), f"'{bw}' must be an object", bw)
        yield bw, b, get(b, "type", bw, str)


def _block_text(blocks, where: str) -> str:
    """A string, or a list of text blocks (system prompts, tool results)."""
    if isinstance(blocks, str):
        return blocks
    out = []
    for bw, b, kind in _iter_blocks(blocks, where, "text"):
        if kind != "text":
            raise bad_request(f"'{bw}.type' is '{kind}'; only text blocks are supported here", f"{bw}.type")
        out.append(get(b, "text", bw, str))
    return "".join(out)


def _user_message(content, where: str, images: list) -> list[dict]:
    """One Anthropic user turn -> tool results (role "tool") first, then the user's text; image
    blocks go to `images` and are {"type": "image"} parts of the user's content."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools, texts, parts = [], [], []
    for bw, b, kind in _iter_blocks(content, where):
        if kind == "text":
            texts.append(get(b, "text", bw, str))
        elif kind == "image":
            images.append(anthropic_image(b, bw))
            parts += [{"type": "text", "text": "".join(texts)}] if texts else []
            parts.append({"type": "image"})
            texts = []
        elif kind == "tool_result":
            text = _block_text(b.get("content") or "", f"{bw}.content")
            if get(b, "is_error", bw, bool, default=False):
                text = f"Error: {text}"
            tools.append({"role": "tool", "tool_call_id": get(b, "tool_use_id", bw, str), "content": text})
        else:
            raise bad_request(f"'{bw}.type' is '{kind}'; this model accepts text, image and tool_result "
                              "blocks in user turns", f"{bw}.type")
    out = tools
    if parts:
        out.append({"role": "user", "content": parts + ([{"type": "text", "text": "".join(texts)}] if texts else [])})
    elif texts:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant_message(content, where: str) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    msg: dict = {"role": "assistant", "content": ""}
    texts, thinking, calls = [], [], []
    for bw, b, kind in _iter_blocks(content, where):
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


def parse_messages(raw, images: list) -> list[dict]:
    """Anthropic messages -> the template's; image blocks of user turns go to `images`."""
    out = []
    for where, m, role in iter_messages(raw):
        content = m.get("content")
        check(content is not None, f"'{where}.content' is required", f"{where}.content")
        # As Anthropic's API: only the final assistant turn (a prefill) may be empty.
        final_assistant = role == "assistant" and where == f"messages[{len(raw) - 1}]"
        check(content != [] or final_assistant,
              f"'{where}.content' is an empty array; every turn but a final assistant one needs at least one block",
              f"{where}.content")
        if role == "user":
            out += _user_message(content, f"{where}.content", images)
        elif role == "assistant":
            out.append(_assistant_message(content, f"{where}.content"))
        else:
            raise bad_request(f"'{where}.role' must be 'user' or 'assistant' (system goes in 'system'); "
                              f"got '{role}'", f"{where}.role")
    return out


def parse_tools(body: dict) -> list[dict] | None:
    out, names = [], set()
    for where, t in iter_tools(body):
        kind = t.get("type")
        check(kind in (None, "custom"), f"'{where}.type' is '{kind}'; only client tools are supported", f"{where}.type")
        fn = {"name": unique_name(t, where, names), "parameters": get(t, "input_schema", where, dict)}
        if t.get("description") is not None:
            fn["description"] = get(t, "description", where, str)
        out.append({"type": "function", "function": fn})
    return out or None


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
        force_tool_call(job, None)
    elif kind == "tool":
        name = get(choice, "name", "tool_choice", str)
        check(name in names, f"'tool_choice.name' is '{name}', which is not among the tools offered",
              "tool_choice.name")
        force_tool_call(job, name)


def parse_thinking(body: dict) -> tuple[bool | None, int | None]:
    """-> (thinking on/off, None: the model's default; the reasoning budget in tokens, if given)."""
    t = get(body, "thinking", "", dict, default=None)
    if t is None:
        return None, None
    kind = get(t, "type", "thinking", str)
    check(kind in ("enabled", "disabled", "adaptive", "between_tools"),
          "'thinking.type' must be 'enabled', 'disabled', 'adaptive' or 'between_tools'", "thinking.type")
    budget = None
    if kind == "enabled":
        budget = get(t, "budget_tokens", "thinking", int)
        check(budget >= 1, "'thinking.budget_tokens' must be at least 1", "thinking.budget_tokens")
    return kind != "disabled", budget


def parse_output_format(body: dict, job: Job) -> None:
    """Structured outputs: output_config.format (or the beta's top-level output_format),
    {"type": "json_schema", "schema": {...}}: the answer is JSON valid under the schema, a
    keyword the grammar cannot enforce is a 400 (Anthropic's structured outputs are strict)."""
    config = get(body, "output_config", "", dict, default=None)
    where, fmt = "output_config.format", None
    if config is not None:
        effort = get(config, "effort", "output_config", str, default=None)
        levels = ("low", "medium", "high", "xhigh", "max")
        check(effort is None or effort in levels, f"'output_config.effort' must be one of {', '.join(levels)}",
              "output_config.effort")
        fmt = get(config, "format", "output_config", dict, default=None)
    if fmt is None:
        where, fmt = "output_format", get(body, "output_format", "", dict, default=None)
    if fmt is None:
        return
    kind = get(fmt, "type", where, str)
    check(kind == "json_schema", f"'{where}.type' is '{kind}'; it must be 'json_schema'", f"{where}.type")
    job.answer_schema = get(fmt, "schema", where, dict)
    job.answer_field = f"{where}.schema"


def parse_request(body: dict, served_model: str, max_tokens_limit: int, count_only: bool = False) -> tuple[Job, Options]:
    """count_only: /v1/messages/count_tokens, where max_tokens and sampling do not apply."""
    opts = Options(model=check_model(body, served_model))
    if count_only and body.get("max_tokens") is None:
        body = dict(body, max_tokens=1)
    images: list = []
    messages = parse_messages(body.get("messages"), images)
    system = body.get("system")
    if system is not None:
        messages.insert(0, {"role": "system", "content": _block_text(system, "system")})
    job = Job(messages=messages, images=images)
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
    thinking, job.reasoning_budget = parse_thinking(body)
    if job.thinking is None:
        job.thinking = thinking
    apply_tool_choice(job, body, [t["function"]["name"] for t in job.tools or []])
    parse_output_format(body, job)
    job.temperature = get_number(body, "temperature", "", 0.0, 1.0, default=1.0)
    job.top_p = get_number(body, "top_p", "", 0.0, 1.0, default=1.0)
    check(job.top_p > 0, "'top_p' must be greater than 0", "top_p")
    job.top_k = get_number(body, "top_k", "", 0, 1 << 30, default=0, integer=True)
    job.stop = get_stop_list(body, "stop_sequences")
    job.ignore_eos = get(body, "ignore_eos", "", bool, default=False)  # extension, as in OpenAI routes
    opts.stream = get(body, "stream", "", bool, default=False)
    get(body, "metadata", "", dict, default=None)
    return job, opts
