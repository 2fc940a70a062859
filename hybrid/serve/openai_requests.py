"""OpenAI dialect, requests: /v1/chat/completions and /v1/completions bodies -> a Job.

Each field is checked by hand (hybrid.serve.fields) so a bad one is a 400 naming it. Messages
keep the OpenAI chat shape, which is what the chat template reads; tool_choice "required" or a
named function is enforced by starting the answer inside the tool-call section
(hybrid.serve.output.force_tool_call). Thinking is switched by whichever convention the client
uses (Kimi's `thinking`, vLLM's `chat_template_kwargs`, OpenAI's `reasoning_effort`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hybrid.serve.errors import bad_request
from hybrid.serve.fields import (check, check_model, get, get_number, get_stop_list, iter_messages, iter_tools,
                                 unique_name)
from hybrid.serve.images import openai_image
from hybrid.serve.job import Job
from hybrid.serve.output import force_tool_call

_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class Options:
    """What shapes the response rather than the generation."""

    model: str
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False


def _text_content(content, where: str, optional: bool, images: list | None = None) -> str | list | None:
    """OpenAI content: a string or a list of parts; text parts, and image_url parts where `images`
    collects them (user turns): the content is then a list of text and {"type": "image"} parts.
    `optional`: an assistant turn, whose content may be null or an empty array (a turn of only
    tool calls)."""
    if content is None:
        check(optional, f"'{where}' is required", where)
        return None
    if isinstance(content, str):
        return content
    check(isinstance(content, list), f"'{where}' must be a string or an array of content parts", where)
    check(bool(content) or optional, f"'{where}' is an empty array; it needs at least one content part", where)
    texts, parts = [], []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        check(isinstance(part, dict), f"'{pw}' must be an object", pw)
        kind = get(part, "type", pw, str)
        if kind in ("image_url", "input_image") and images is not None:
            images.append(openai_image(part, pw))
            parts += [{"type": "text", "text": "".join(texts)}] if texts else []
            parts.append({"type": "image"})
            texts = []
            continue
        if kind not in ("text", "input_text"):
            what = "text and image_url parts" if images is not None else "text only here"
            raise bad_request(f"'{pw}.type' is '{kind}'; this model accepts {what}", pw)
        texts.append(get(part, "text", pw, str))
    if not parts:
        return "".join(texts)
    return parts + ([{"type": "text", "text": "".join(texts)}] if texts else [])


def _tool_calls(calls, where: str) -> list[dict]:
    check(isinstance(calls, list), f"'{where}' must be an array", where)
    out = []
    for j, c in enumerate(calls):
        cw = f"{where}[{j}]"
        check(isinstance(c, dict), f"'{cw}' must be an object", cw)
        fn = get(c, "function", cw, dict)
        args = fn.get("arguments", "{}")
        if isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        check(isinstance(args, str), f"'{cw}.function.arguments' must be a string", f"{cw}.function.arguments")
        out.append({"id": get(c, "id", cw, str), "type": "function",
                    "function": {"name": get(fn, "name", f"{cw}.function", str), "arguments": args}})
    return out


def parse_messages(raw, images: list | None = None) -> list[dict]:
    """OpenAI messages -> the template's; image parts of user turns go to `images` (None: refused)."""
    messages = []
    for where, m, role in iter_messages(raw):
        if role not in _ROLES:
            raise bad_request(f"'{where}.role' must be one of {', '.join(_ROLES)}; got '{role}'", f"{where}.role")
        msg: dict = {"role": "system" if role == "developer" else role}
        if role == "assistant":
            msg["content"] = _text_content(m.get("content"), f"{where}.content", optional=True) or ""
            if m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None:
                check(isinstance(reasoning, str), f"'{where}.reasoning_content' must be a string",
                      f"{where}.reasoning_content")
                msg["reasoning_content"] = reasoning
        else:
            msg["content"] = _text_content(m.get("content"), f"{where}.content", optional=False,
                                           images=images if role == "user" else None)
        if role == "tool":
            msg["tool_call_id"] = get(m, "tool_call_id", where, str)
        messages.append(msg)
    return messages


def parse_tools(body: dict) -> list[dict] | None:
    out, names = [], set()
    for where, t in iter_tools(body):
        kind = get(t, "type", where, str, default="function")
        check(kind == "function", f"'{where}.type' must be 'function'", f"{where}.type")
        fn = get(t, "function", where, dict)
        entry = {"name": unique_name(fn, f"{where}.function", names)}
        if fn.get("description") is not None:
            entry["description"] = get(fn, "description", f"{where}.function", str)
        entry["parameters"] = get(fn, "parameters", f"{where}.function", dict, default={"type": "object", "properties": {}})
        out.append({"type": "function", "function": entry})
    return out or None


def tool_names(tools: list[dict] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or []]


def apply_tool_choice(job: Job, choice, names: list[str], where: str = "tool_choice") -> None:
    """OpenAI tool_choice: "none" | "auto" | "required" | {"type": "function", "function": {"name"}}."""
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = get(choice, "function", where, dict)
        name = get(fn, "name", f"{where}.function", str)
        check(name in names, f"'{where}.function.name' is '{name}', which is not among the tools offered",
              f"{where}.function.name")
        force_tool_call(job, name)
        return
    check(choice in ("none", "auto", "required"),
          f"'{where}' must be 'none', 'auto', 'required' or a function object", where)
    if choice == "none" or not names:
        check(choice != "required", f"'{where}' is 'required' but no tools were given", where)
        job.tools, job.parse_tools = None, False
    elif choice == "required":
        force_tool_call(job, None)


def parse_response_format(body: dict, job: Job) -> None:
    """response_format: {"type": "text"} (the default), {"type": "json_object"} (any JSON object)
    or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; the answer is then
    decoded under that schema (strict: a keyword the grammar cannot enforce is a 400, else it
    is ignored)."""
    rf = get(body, "response_format", "", dict, default=None)
    if rf is None:
        return
    kind = get(rf, "type", "response_format", str)
    check(kind in ("text", "json_object", "json_schema"),
          f"'response_format.type' is '{kind}'; it must be 'text', 'json_object' or 'json_schema'",
          "response_format.type")
    if kind == "json_object":
        job.answer_schema = {"type": "object"}
    elif kind == "json_schema":
        spec = get(rf, "json_schema", "response_format", dict)
        name = get(spec, "name", "response_format.json_schema", str, default=None)
        check(name is None or (0 < len(name) <= 64 and re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None),
              "'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'",
              "response_format.json_schema.name")
        job.answer_schema = get(spec, "schema", "response_format.json_schema", dict, default={"type": "object"})
        job.answer_lenient = not get(spec, "strict", "response_format.json_schema", bool, default=False)


def parse_thinking(body: dict) -> bool | None:
    """Thinking on/off, from whichever convention the client uses (None: the model's default):
    Kimi/Moonshot `thinking: {"type": "enabled"|"disabled"}` or a boolean,
    vLLM `chat_template_kwargs: {"thinking"|"enable_thinking": bool}`, OpenAI `reasoning_effort`."""
    t = body.get("thinking")
    if t is not None:
        if isinstance(t, bool):
            return t
        check(isinstance(t, dict), "'thinking' must be a boolean or {\"type\": \"enabled\"|\"disabled\"}", "thinking")
        kind = get(t, "type", "thinking", str)
        check(kind in ("enabled", "disabled"), "'thinking.type' must be 'enabled' or 'disabled'", "thinking.type")
        return kind == "enabled"
    kwargs = get(body, "chat_template_kwargs", "", dict, default={})
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            v = kwargs[key]
            check(isinstance(v, bool), f"'chat_template_kwargs.{key}' must be a boolean", f"chat_template_kwargs.{key}")
            return v
    effort = get(body, "reasoning_effort", "", str, default=None)
    if effort is not None:
        levels = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
        check(effort in levels, f"'reasoning_effort' must be one of {', '.join(levels)}", "reasoning_effort")
        return effort not in ("none", "minimal")
    return None


def parse_common(body: dict, job: Job, max_tokens_limit: int, token_keys: tuple[str, ...]) -> None:
    """Sampling fields shared by chat and completions."""
    n = get(body, "n", "", int, default=1)
    check(n == 1, f"'n' is {n}; this server returns one choice per request (n must be 1)", "n")
    for key in token_keys:
        mt = get(body, key, "", int, default=None)
        if mt is not None:
            check(mt >= 1, f"'{key}' must be at least 1, got {mt}", key)
            if mt > max_tokens_limit:
                raise bad_request(f"'{key}' is {mt}, more than this server's limit of {max_tokens_limit} "
                                  "completion tokens per request", key)
            job.max_tokens = mt
            break
    job.temperature = get_number(body, "temperature", "", 0.0, 2.0, default=1.0)
    job.top_p = get_number(body, "top_p", "", 0.0, 1.0, default=1.0)
    check(job.top_p > 0, "'top_p' must be greater than 0", "top_p")
    job.top_k = get_number(body, "top_k", "", -1, 1 << 30, default=0, integer=True)
    job.seed = get_number(body, "seed", "", -(2**63), 2**64 - 1, default=None, integer=True)
    job.presence_penalty = get_number(body, "presence_penalty", "", -2.0, 2.0, default=0.0)
    job.frequency_penalty = get_number(body, "frequency_penalty", "", -2.0, 2.0, default=0.0)
    job.stop = get_stop_list(body, "stop")
    job.ignore_eos = get(body, "ignore_eos", "", bool, default=False)


def _stream_options(body: dict, opts: Options) -> None:
    opts.stream = get(body, "stream", "", bool, default=False)
    so = get(body, "stream_options", "", dict, default=None)
    if so is not None:
        check(opts.stream, "'stream_options' is only allowed when 'stream' is true", "stream_options")
        opts.include_usage = get(so, "include_usage", "stream_options", bool, default=False)


def parse_chat_request(body: dict, served_model: str, max_tokens_limit: int) -> tuple[Job, Options]:
    opts = Options(model=check_model(body, served_model))
    job = Job()
    job.messages = parse_messages(body.get("messages"), job.images)
    job.tools = parse_tools(body)
    job.parse_tools = job.tools is not None
    job.thinking = parse_thinking(body)
    apply_tool_choice(job, body.get("tool_choice"), tool_names(job.tools))
    parse_common(body, job, max_tokens_limit, ("max_completion_tokens", "max_tokens"))
    parse_response_format(body, job)
    _stream_options(body, opts)
    opts.logprobs = get(body, "logprobs", "", bool, default=False)
    top = get_number(body, "top_logprobs", "", 0, 20, default=None, integer=True)
    if top is not None:
        check(opts.logprobs, "'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    if opts.logprobs:
        job.logprobs = top or 0
    return job, opts


def parse_completion_request(body: dict, served_model: str, max_tokens_limit: int) -> tuple[Job, Options]:
    opts = Options(model=check_model(body, served_model))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    ok_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    check(isinstance(prompt, str) or ok_ids,
          "'prompt' must be a string or an array of token ids (one prompt per request)", "prompt")
    job = Job(prompt=prompt)
    parse_common(body, job, max_tokens_limit, ("max_tokens",))
    if job.max_tokens is None:
        job.max_tokens = min(16, max_tokens_limit)  # OpenAI's documented default for completions
    check(not get(body, "echo", "", bool, default=False), "'echo' is not supported", "echo")
    check(body.get("suffix") is None, "'suffix' is not supported", "suffix")
    best_of = get(body, "best_of", "", int, default=1)
    check(best_of == 1, "'best_of' must be 1", "best_of")
    _stream_options(body, opts)
    lp = get_number(body, "logprobs", "", 0, 5, default=None, integer=True)
    if lp is not None:
        opts.logprobs, job.logprobs = True, lp
    return job, opts
