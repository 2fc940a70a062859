"""Response formatting of crafted Kimi output, checked with the SDKs' own types.

A random model never writes a well-formed tool call, so here the model's side is a crafted
decoded text (exactly what Kimi emits, special tokens included) cut into pieces; it goes through
the real output parser and the real OpenAI/Anthropic formatters, and the result must validate as
the SDKs' response models and accumulate (Anthropic's own stream accumulator) to the same answer.
"""

import asyncio
import json
import random
import re

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from hybrid.serve import anthropic_requests, anthropic_responses, openai_requests, openai_responses
from hybrid.serve.job import Finish, Job, Piece
from hybrid.serve.output import forced_tool_prefix
from hybrid.toolcalls import ToolCall, render_tool_calls

CALLS = [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
         ToolCall("functions.get_time:1", "get_time", '{"tz": "Europe/Paris"}')]
ANSWER = "<think>The user wants weather and time.</think>Checking both." + render_tool_calls(CALLS)


def model_id(client_id: str) -> str:
    """The model's own call id inside the one a client gets (unique: a random suffix)."""
    kimi, suffix = client_id.rsplit("-", 1)
    assert re.fullmatch("[0-9a-f]{12}", suffix), client_id
    return kimi


def same_blocks(a: list, b: list) -> bool:
    """Anthropic content blocks equal but for the tool_use ids (each run draws its own)."""
    def strip(blocks):
        return [b.model_copy(update={"id": model_id(b.id)}) if b.type == "tool_use" else b for b in blocks]
    return strip(a) == strip(b)


class CraftedRun:
    """The backend Run interface over a fixed decoded text: pieces, then a Finish."""

    def __init__(self, text: str, reason="stop", start_in_reasoning=False, seed=0, stop_string=None):
        rng = random.Random(seed)
        self.chunks, i = [], 0
        while i < len(text):
            n = rng.randint(1, 9)
            self.chunks.append(text[i:i + n])
            i += n
        self.request_id = "id-1"
        self.special_texts = ("<|im_end|>", "<|im_middle|>", "<|im_assistant|>")
        self.prompt_tokens = 50
        self.start_in_reasoning = start_in_reasoning
        self.finish = None
        self._final = Finish(reason=reason, prompt_tokens=50, completion_tokens=len(self.chunks),
                             stop_string=stop_string)

    async def __aiter__(self):
        for c in self.chunks:
            yield Piece(text=c, n_tokens=1)
        self.finish = self._final


def run_async(agen_or_coro):
    async def collect():
        if hasattr(agen_or_coro, "__aiter__"):
            return [x async for x in agen_or_coro]
        return await agen_or_coro
    return asyncio.run(collect())


def tools_job(**kw) -> Job:
    return Job(messages=[{"role": "user", "content": "weather?"}], parse_tools=True, **kw)


@pytest.mark.parametrize("seed", range(3))
def test_openai_tool_calls_whole_and_streamed(seed):
    opts = openai_requests.Options(model="m")
    resp = run_async(openai_responses.chat_response(CraftedRun(ANSWER, seed=seed), tools_job(), opts))
    c = ChatCompletion.model_validate(resp)
    msg = c.choices[0].message
    assert c.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Checking both."
    assert resp["choices"][0]["message"]["reasoning_content"] == "The user wants weather and time."
    assert [(model_id(t.id), t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "Paris"}),
        ("functions.get_time:1", "get_time", {"tz": "Europe/Paris"})]

    sse = run_async(openai_responses.chat_stream(CraftedRun(ANSWER, seed=seed), tools_job(), opts))
    assert sse[-1] == "data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate(json.loads(s[6:])) for s in sse[:-1]]
    calls: dict[int, dict] = {}
    content = ""
    for ch in chunks:
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "args": ""})
            entry["args"] += tc.function.arguments or ""
    assert content == "Checking both."
    assert [(model_id(v["id"]), v["name"], json.loads(v["args"])) for _, v in sorted(calls.items())] == [
        (model_id(t.id), t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_without_tools_drops_the_section_and_length_wins():
    # No tools offered: the call is not the client's to run and its markers are no text.
    job = Job(messages=[{"role": "user", "content": "x"}], parse_tools=False)
    resp = run_async(openai_responses.chat_response(CraftedRun(ANSWER, reason="length"), job, openai_requests.Options(model="m")))
    c = ChatCompletion.model_validate(resp)
    assert c.choices[0].finish_reason == "length" and c.choices[0].message.tool_calls is None
    assert c.choices[0].message.content == "Checking both."


def test_no_special_token_text_in_content_whole_or_streamed():
    # The turn header a model once wrote inside its answer: the markers go, the words stay.
    text = "<think>The user asks abouttool_declare<|im_middle|><think></think>Hi<|im_assistant|>assistant<|im_middle|>"
    opts = openai_requests.Options(model="m")
    resp = run_async(openai_responses.chat_response(CraftedRun(text), Job(messages=[]), opts))
    msg = resp["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("The user asks abouttool_declare", "Hiassistant")
    sse = "".join(run_async(openai_responses.chat_stream(CraftedRun(text), Job(messages=[]), opts)))
    m = Message.model_validate(run_async(anthropic_responses.message_response(
        CraftedRun(text), Job(messages=[]), anthropic_requests.Options(model="m"))))
    for shown in (sse, m.model_dump_json()):
        assert "<|" not in shown and "<think>" not in shown and "</think>" not in shown


def test_forced_tool_prefix_is_parsed_as_the_calls_start():
    job = tools_job()
    job.assistant_prefix = forced_tool_prefix(job, "get_weather")
    generated = '{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|>'
    resp = run_async(openai_responses.chat_response(CraftedRun(generated), job, openai_requests.Options(model="m")))
    call = resp["choices"][0]["message"]["tool_calls"][0]
    assert model_id(call["id"]) == "functions.get_weather:0" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    # Kimi numbers calls across the conversation: the next forced call after one is :1.
    job2 = Job(messages=[{"role": "assistant", "tool_calls": [{"id": "functions.f:0"}]}])
    assert forced_tool_prefix(job2, "f").endswith("functions.f:1<|tool_call_argument_begin|>")


def anthropic_stream_to_message(sse: list[str]) -> tuple[list[str], Message]:
    names, snapshot, bufs = [], None, {}
    for block in sse:
        event_line, data_line = block.strip().split("\n")
        names.append(event_line[len("event: "):])
        event = json.loads(data_line[len("data: "):])
        if event["type"] == "ping":
            continue
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    return names, Message.model_validate(snapshot.to_dict())


@pytest.mark.parametrize("seed", range(3))
def test_anthropic_tool_use_whole_and_streamed(seed):
    opts = anthropic_requests.Options(model="m")
    whole = Message.model_validate(run_async(anthropic_responses.message_response(CraftedRun(ANSWER, seed=seed), tools_job(), opts)))
    assert [b.type for b in whole.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert whole.content[0].thinking == "The user wants weather and time."
    assert whole.content[1].text == "Checking both."
    assert (model_id(whole.content[2].id), whole.content[2].name, whole.content[2].input) == (
        "functions.get_weather:0", "get_weather", {"city": "Paris"})
    assert whole.stop_reason == "tool_use"
    names, streamed = anthropic_stream_to_message(
        run_async(anthropic_responses.message_stream(CraftedRun(ANSWER, seed=seed), tools_job(), opts)))
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 4
    assert same_blocks(streamed.content, whole.content)
    assert streamed.stop_reason == "tool_use" and streamed.usage.output_tokens == whole.usage.output_tokens


def test_anthropic_invalid_tool_json_becomes_visible_text():
    bad = render_tool_calls([ToolCall("functions.f:0", "f", '{"a": ')])
    opts = anthropic_requests.Options(model="m")
    whole = Message.model_validate(run_async(anthropic_responses.message_response(CraftedRun("ok " + bad), tools_job(), opts)))
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text == 'ok f({"a":)'
    assert whole.stop_reason == "end_turn"
    _, streamed = anthropic_stream_to_message(
        run_async(anthropic_responses.message_stream(CraftedRun("ok " + bad), tools_job(), opts)))
    assert streamed.content == whole.content


def test_anthropic_stop_sequence_and_whitespace_before_calls():
    opts = anthropic_requests.Options(model="m")
    m = Message.model_validate(run_async(anthropic_responses.message_response(
        CraftedRun("partial answer", stop_string="END"), Job(messages=[]), opts)))
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "END"
    m = Message.model_validate(run_async(anthropic_responses.message_response(
        CraftedRun("\n\n" + render_tool_calls(CALLS[:1])), tools_job(), opts)))
    assert [b.type for b in m.content] == ["tool_use"]
    m = Message.model_validate(run_async(anthropic_responses.message_response(
        CraftedRun("<think>r</think>\n\nHello \n\n world\n"), Job(messages=[]), opts)))
    assert [b.type for b in m.content] == ["thinking", "text"] and m.content[1].text == "\n\nHello \n\n world\n"
