"""From a running generation to dialect-free output events, and forced tool choice.

Both dialects read a generation the same way: the backend's Pieces go through Kimi's output
parser (hybrid.toolcalls.StreamParser), which splits reasoning, answer text and tool calls; each
dialect then writes those events in its own wire format.
"""

from __future__ import annotations

from typing import AsyncIterator

from hybrid.serve.job import Job
from hybrid.toolcalls import CALL_ARGS, CALL_BEGIN, SECTION_BEGIN, StreamParser, make_call_id


def count_tool_calls(messages: list[dict]) -> int:
    """Kimi numbers tool calls across the whole conversation; the next call gets this index."""
    return sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")


def forced_tool_prefix(job: Job, name: str | None) -> str:
    """The start of an answer that can only be a tool call (to `name`, or to any tool if None).

    Without constrained decoding this is how a choice is enforced: the answer is begun for the
    model, inside the tool-call section, so what it writes next is the call.
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


async def output_events(run, job: Job) -> AsyncIterator[tuple]:
    """Parser events for a run (see StreamParser), plus ("logprobs", [TokenLogprob]) and,
    last, ("finish", Finish)."""
    parser = StreamParser(start_in_reasoning=run.start_in_reasoning, parse_tools=job.parse_tools)
    for ev in parser.feed(job.assistant_prefix):
        if job.prefix_is_output:
            yield ev
    async for piece in run:
        for ev in parser.feed(piece.text):
            yield ev
        if piece.logprobs:
            yield ("logprobs", piece.logprobs)
    for ev in parser.finish():
        yield ev
    yield ("finish", run.finish)
