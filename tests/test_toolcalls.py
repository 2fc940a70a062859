"""Kimi output parsing (reasoning / content / tool calls) on crafted text, whole and streamed."""

import json
import random

import pytest

from hybrid.toolcalls import (
    CALL_ARGS,
    CALL_BEGIN,
    CALL_END,
    GRAMMAR_MARKERS,
    SECTION_BEGIN,
    THINK_BEGIN,
    THINK_END,
    StreamParser,
    ToolCall,
    collect,
    make_call_id,
    parse_output,
    render_tool_calls,
    split_call_id,
)

CALLS = [
    ToolCall(id="functions.get_weather:0", name="get_weather", arguments='{"city": "Paris"}'),
    ToolCall(id="functions.search:1", name="search", arguments='{"q": "a<b |x| </think>", "n": 3}'),
]


def stream(text, chunks, start_in_reasoning=False):
    p = StreamParser(start_in_reasoning=start_in_reasoning)
    events = []
    for c in chunks:
        events += p.feed(c)
    events += p.finish()
    return events


def random_chunks(text, rng):
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 12)
        out.append(text[i : i + n])
        i += n
    return out


def test_render_then_parse_round_trip():
    text = "<think>plan: call two tools</think>Let me check." + render_tool_calls(CALLS)
    out = parse_output(text)
    assert out.reasoning == "plan: call two tools"
    assert out.content == "Let me check."
    assert out.tool_calls == CALLS
    assert json.loads(out.tool_calls[1].arguments)["q"] == "a<b |x| </think>"


def test_exact_kimi_token_text():
    text = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>'
    )
    out = parse_output(text)
    assert out.content == "" and out.reasoning == ""
    assert out.tool_calls == [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Beijing"}')]


def test_whitespace_between_markers_and_singular_section_spelling():
    text = (
        "ok\n<|tool_call_section_begin|>\n <|tool_call_begin|> functions.f:7 "
        "<|tool_call_argument_begin|> {} <|tool_call_end|>\n<|tool_call_section_end|>"
    )
    out = parse_output(text)
    assert out.content == "ok\n"
    assert out.tool_calls == [ToolCall("functions.f:7", "f", "{}")]


@pytest.mark.parametrize("seed", range(20))
def test_streamed_equals_whole_for_any_chunking(seed):
    rng = random.Random(seed)
    text = "<think>a <b> c </thin k</think>Answer <|not a marker|> end" + render_tool_calls(CALLS)
    whole = parse_output(text)
    chunks = random_chunks(text, rng)
    assert collect(stream(text, chunks)) == whole
    chars = collect(stream(text, list(text)))
    assert chars == whole


def test_no_marker_text_is_held_back_longer_than_needed():
    p = StreamParser()
    assert p.feed("hello <") == [("content", "hello ")]  # "<" may start a marker
    assert p.feed("b>") == [("content", "<b>")]
    assert p.feed("<|tool_calls") == []
    assert p.feed("_x") == [("content", "<|tool_calls_x")]


def test_think_only_at_start_and_prompt_opened_reasoning():
    # A <think> after the answer began opens nothing, and no marker is shown as content.
    assert parse_output("hi <think>x</think>").content == "hi x"
    out = parse_output("still thinking</think>done", start_in_reasoning=True)
    assert (out.reasoning, out.content) == ("still thinking", "done")
    # Leading whitespace does not stop a <think> from opening reasoning.
    out = parse_output("\n<think>r</think>c")
    assert out.reasoning == "r" and out.content.strip() == "c"


def test_unterminated_reasoning_and_call_are_flushed():
    out = parse_output("<think>cut off mid thou")
    assert out.reasoning == "cut off mid thou" and out.content == ""
    ev = stream("", ['<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1'])
    assert ev[0] == ("tool_start", 0, "functions.f:0", "f")
    assert ev[-1] == ("tool_end", 0)
    assert collect(ev).tool_calls[0].arguments == '{"a": 1'


def test_tool_section_inside_reasoning_ends_reasoning():
    text = "<think>I should call" + render_tool_calls(CALLS[:1])
    out = parse_output(text)
    assert out.reasoning == "I should call" and out.tool_calls == CALLS[:1]


def test_call_ids():
    assert split_call_id("functions.get_weather:12") == ("get_weather", 12)
    assert split_call_id("lookup") == ("lookup", None)
    assert make_call_id("f", 3) == "functions.f:3"
    with pytest.raises(ValueError, match="functions.NAME:IDX"):
        split_call_id("  ")


def test_without_tools_a_section_is_dropped_not_shown():
    # No tools were offered: the call is not the client's to run, and its markers are no text.
    text = "<think>r</think>x" + render_tool_calls(CALLS[:1]) + " y"
    out = parse_output(text, parse_tools=False)
    assert (out.reasoning, out.content, out.tool_calls) == ("r", "x y", [])


SPECIAL = ["[BOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
           "<|reserved_token_300|>", THINK_BEGIN, THINK_END, SECTION_BEGIN, CALL_BEGIN, CALL_ARGS, CALL_END]


@pytest.mark.parametrize("seed", range(4))
def test_no_special_token_text_in_reasoning_or_content(seed):
    # What the demo model once wrote (a turn header inside its reasoning), stray markers out of
    # place, and a call whose arguments hold marker text (data: kept).
    text = ("<think>The user asks abouttool_declare<|im_middle|><think> more</think>"
            "Answer<|im_assistant|>assistant<|im_middle|><think>x</think> [BOS]end<|tool_call_end|>"
            "<|reserved_token_300|>" + render_tool_calls(CALLS) + "<|im_user|>tail")
    events = stream(text, random_chunks(text, random.Random(seed)))
    events_with_special = []
    p = StreamParser(special=SPECIAL)
    for c in random_chunks(text, random.Random(seed)):
        events_with_special += p.feed(c)
    events_with_special += p.finish()
    out = collect(events_with_special)
    assert out.reasoning == "The user asks abouttool_declare more"
    assert out.content == "Answerassistantx endtail"
    assert out.tool_calls == CALLS
    # Without the tokenizer's list, the format's own markers are still never shown.
    plain = collect(events)
    assert not any(m in plain.content + plain.reasoning for m in GRAMMAR_MARKERS)
