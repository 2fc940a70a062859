"""OpenAI dialect, responses: output events -> chat.completion / text_completion JSON, or their
server-sent-event chunks when the request streams.

Kimi's tool calls become `tool_calls` (arguments passed on as the model wrote them, as OpenAI
does) and its <think> text becomes `reasoning_content` (the field vLLM and DeepSeek's API use).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from hybrid.serve.job import Finish, Job, TokenLogprob
from hybrid.serve.openai_requests import Options
from hybrid.serve.output import output_events


def _usage(fin: Finish) -> dict:
    usage = {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
             "total_tokens": fin.prompt_tokens + fin.completion_tokens}
    if fin.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": fin.cached_tokens}
    return usage


def finish_reason(fin: Finish, has_calls: bool) -> str:
    if fin.reason == "length":
        return "length"
    return "tool_calls" if has_calls else "stop"


def _chat_logprob(lp: TokenLogprob) -> dict:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in lp.top]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def chat_response(run, job: Job, opts: Options) -> dict:
    reasoning, content, calls, logprobs = [], [], [], []
    fin = None
    async for ev in output_events(run, job):
        kind = ev[0]
        if kind == "reasoning":
            reasoning.append(ev[1])
        elif kind == "content":
            content.append(ev[1])
        elif kind == "tool_start":
            calls.append({"id": ev[2], "type": "function", "function": {"name": ev[3], "arguments": ""}})
        elif kind == "tool_args":
            calls[ev[1]]["function"]["arguments"] += ev[2]
        elif kind == "logprobs":
            logprobs += [_chat_logprob(lp) for lp in ev[1]]
        elif kind == "finish":
            fin = ev[1]
    message: dict = {"role": "assistant", "content": "".join(content) if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        for c in calls:
            c["function"]["arguments"] = c["function"]["arguments"].strip()
        message["tool_calls"] = calls
    return {
        "id": run.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": opts.model,
        "choices": [{"index": 0, "message": message,
                     "logprobs": {"content": logprobs} if opts.logprobs else None,
                     "finish_reason": finish_reason(fin, bool(calls))}],
        "usage": _usage(fin),
    }


async def chat_stream(run, job: Job, opts: Options) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, logprobs=None) -> str:
        obj = {"id": run.request_id, "object": "chat.completion.chunk", "created": created,
               "model": opts.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if opts.include_usage:
            obj["usage"] = None
        return _sse(obj)

    yield chunk({"role": "assistant", "content": ""})
    has_calls = False
    async for ev in output_events(run, job):
        kind = ev[0]
        if kind == "reasoning":
            yield chunk({"reasoning_content": ev[1]})
        elif kind == "content":
            yield chunk({"content": ev[1]})
        elif kind == "tool_start":
            has_calls = True
            yield chunk({"tool_calls": [{"index": ev[1], "id": ev[2], "type": "function",
                                         "function": {"name": ev[3], "arguments": ""}}]})
        elif kind == "tool_args":
            yield chunk({"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]})
        elif kind == "logprobs" and opts.logprobs:
            yield chunk({}, logprobs={"content": [_chat_logprob(lp) for lp in ev[1]]})
        elif kind == "finish":
            fin = ev[1]
            yield chunk({}, finish=finish_reason(fin, has_calls))
            if opts.include_usage:
                yield _sse({"id": run.request_id, "object": "chat.completion.chunk", "created": created,
                            "model": opts.model, "choices": [], "usage": _usage(fin)})
    yield "data: [DONE]\n\n"


def _completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        tokens.append(lp.token)
        values.append(lp.logprob)
        tops.append({t: v for t, v in lp.top})
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


async def completion_response(run, job: Job, opts: Options) -> dict:
    text, lps = [], []
    async for piece in run:
        text.append(piece.text)
        lps += piece.logprobs or []
    fin = run.finish
    return {
        "id": run.request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": opts.model,
        "choices": [{"index": 0, "text": "".join(text),
                     "logprobs": _completion_logprobs(lps, 0) if opts.logprobs else None,
                     "finish_reason": finish_reason(fin, False)}],
        "usage": _usage(fin),
    }


async def completion_stream(run, job: Job, opts: Options) -> AsyncIterator[str]:
    created = int(time.time())
    offset = 0

    def chunk(text: str, finish: str | None = None, logprobs=None) -> str:
        obj = {"id": run.request_id, "object": "text_completion", "created": created, "model": opts.model,
               "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if opts.include_usage:
            obj["usage"] = None
        return _sse(obj)

    async for piece in run:
        lp = _completion_logprobs(piece.logprobs or [], offset) if opts.logprobs else None
        offset += len(piece.text)
        if piece.text or lp:
            yield chunk(piece.text, logprobs=lp)
    fin = run.finish
    yield chunk("", finish=finish_reason(fin, False))
    if opts.include_usage:
        yield _sse({"id": run.request_id, "object": "text_completion", "created": created,
                    "model": opts.model, "choices": [], "usage": _usage(fin)})
    yield "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    """OpenAI ids look like 'chatcmpl-<hex>', Anthropic ones like 'msg_<hex>'."""
    sep = "_" if prefix == "msg" else "-"
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"
