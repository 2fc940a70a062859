"""From a running generation to dialect-free output events, and forced tool choice.

Both dialects read a generation the same way: the backend's Pieces go through Kimi's output
parser (hybrid.toolcalls.StreamParser), which splits reasoning, answer text and tool calls; each
dialect then writes those events in its own wire format.
"""

from __future__ import annotations

import uuid
from typing import AsyncIterator

from hybrid.serve.job import Job
from hybrid.toolcalls import CALL_ARGS, CALL_BEGIN, SECTION_BEGIN, StreamParser, make_call_id


def count_tool_calls(messages: list[dict]) -> int:
    """Kimi numbers tool calls across the whole conversation; the next call gets this index."""
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def client_call_id(model_id: str) -> str:
    """The id a client gets for a call the model wrote as `model_id` (Kimi's functions.NAME:IDX,
    which repeats across conversations: every first call is :0): the same with a random suffix,
    so it is unique per call. kimi_call_ids maps it back when the client sends the history."""
    return f"{model_id}-{uuid.uuid4().hex[:12]}"


def kimi_call_ids(messages: list[dict]) -> list[dict]:
    """The history with each assistant tool call's id rewritten to Kimi's functions.NAME:IDX
    (IDX counting calls across the conversation, as the model was trained) and each tool
    result's tool_call_id rewritten to match its call's. A client's ids may be ours
    (client_call_id), another server's, or repeat; a result belongs to the latest call before
    it with that id. A result whose id names no call keeps it."""
    out, kimi_of, n = [], {}, 0
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                kimi = make_call_id(c["function"]["name"], n)
                n += 1
                kimi_of[c.get("id")] = kimi
                calls.append(dict(c, id=kimi))
            m = dict(m, tool_calls=calls)
        elif m.get("role") == "tool" and m.get("tool_call_id") in kimi_of:
            m = dict(m, tool_call_id=kimi_of[m["tool_call_id"]])
        out.append(m)
    return out


def forced_tool_prefix(job: Job, name: str | None) -> str:
    """The start of an answer that can only be a tool call (to `name`, or to any tool if None).

    The answer is begun for the model, inside the tool-call section, so what it writes next is
    the call; the grammar (Backend.grammar_for) then holds the rest to the offered tools.
    """
    prefix = SECTION_BEGIN + CALL_BEGIN
    if name is None:
        return prefix + "functions."
    return prefix + make_call_id(name, count_tool_calls(job.messages or [])) + CALL_ARGS


def force_tool_call(job: Job, name: str | None) -> None:
    """Make the answer a tool call (to `name`, or any tool). It skips the reasoning: the answer
    starts inside the tool-call section, after an empty <think></think>."""
    job.thinking = False
    job.assistant_prefix = forced_tool_prefix(job, name)
    job.tool_choice, job.forced_tool = ("required", None) if name is None else ("named", name)


async def output_events(run, job: Job) -> AsyncIterator[tuple]:
    """Parser events for a run (see StreamParser; a tool_start carries the client's id), plus ("logprobs", [TokenLogprob]) and, last, ("finish", Finish)."""
    parser = StreamParser(start_in_reasoning=run.start_in_reasoning, parse_tools=job.parse_tools,
                          special=run.special_texts)
    for ev in parser.feed(job.assistant_prefix):
        if job.prefix_is_output:
            yield _with_client_id(ev)
    async for piece in run:
        for ev in parser.feed(piece.text):
            yield _with_client_id(ev)
        if piece.logprobs:
            yield ("logprobs", piece.logprobs)
    for ev in parser.finish():
        yield _with_client_id(ev)
    yield ("finish", run.finish)


def _with_client_id(ev: tuple) -> tuple:
    """("tool_start", i, the model's id, name) -> ("tool_start", i, the client's id, name)."""
    if ev[0] != "tool_start":
        return ev
    return ev[:2] + (client_call_id(ev[2]),) + ev[3:]
