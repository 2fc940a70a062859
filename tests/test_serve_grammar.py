"""Constrained decoding behind a live `hybrid serve` on the demo model, through the real openai and
anthropic clients: tool calls under tool_choice required / named / any / auto name only offered
tools and their arguments validate against the tool's schema; response_format json_object and
json_schema (strict, parsed by the openai client's own parser); unsupported schema features are a
400 naming the field; thinking that eats the budget ends with "length" and the reasoning.

All sampled at temperature 1 with fixed seeds: the grammar, not luck, makes them valid. The
grammar corpus: random schemas from a fixed generator (objects, enums, arrays, nested, optional
fields, additionalProperties false), every answer parses and validates (jsonschema).
"""

import json
import random
import typing

import anthropic
import jsonschema
import openai
import pydantic
import pytest

from test_serve_support import LiveServer

TOOLS = [
    {"type": "function", "function": {
        "name": "python_help", "description": "Look up the documentation of a Python name",
        "parameters": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}},
                       "required": ["name"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two small numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What does len do?"}]


@pytest.fixture(scope="module")
def server():
    import torch

    import hybrid

    loaded = hybrid.load(None, dtype=torch.float32, progress=False)
    s = LiveServer({"model_name": "demo"}, max_seqs=8, loaded=loaded, context=1024)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def ant(server):
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def _check_calls(calls):
    assert calls
    for c in calls:
        assert c.function.name in SCHEMAS
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_required_calls_only_offered_tools_with_valid_arguments(oai):
    for seed in range(6):
        r = oai.chat.completions.create(model="demo", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                        temperature=1.0, seed=seed, max_tokens=120)
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message.tool_calls)


def test_named_tool_choice_streamed(oai):
    chunks = oai.chat.completions.create(model="demo", messages=QUESTION, tools=TOOLS, stream=True,
                                         tool_choice={"type": "function", "function": {"name": "add"}},
                                         temperature=1.0, seed=3, max_tokens=120)
    name, args, finish = None, "", None
    for ch in chunks:
        for tc in ch.choices[0].delta.tool_calls or []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert name == "add" and finish == "tool_calls"
    jsonschema.validate(json.loads(args), SCHEMAS["add"])


def test_tool_round_trip_with_required(oai):
    r = oai.chat.completions.create(model="demo", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                    temperature=1.0, seed=11, max_tokens=120)
    call = r.choices[0].message.tool_calls[0]
    history = QUESTION + [r.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "len(s): the length of s"}]
    r2 = oai.chat.completions.create(model="demo", messages=history, tools=TOOLS, temperature=1.0, seed=1,
                                     max_tokens=60)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for c in r2.choices[0].message.tool_calls or []:  # auto: a call may only name an offered tool
        assert c.function.name in SCHEMAS


def test_auto_calls_name_only_offered_tools(oai):
    for seed in range(6):
        r = oai.chat.completions.create(model="demo", messages=QUESTION, tools=TOOLS, temperature=1.0,
                                        seed=seed, max_tokens=150)
        for c in r.choices[0].message.tool_calls or []:
            assert c.function.name in SCHEMAS


def test_anthropic_any_and_named_tool(ant):
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    for choice in ({"type": "any"}, {"type": "tool", "name": "add"}, {"type": "any"}):
        m = ant.messages.create(model="demo", max_tokens=120, messages=QUESTION, tools=tools, tool_choice=choice,
                                extra_body={"temperature": 1.0})
        assert m.stop_reason == "tool_use"
        uses = [b for b in m.content if b.type == "tool_use"]
        assert uses
        for u in uses:
            assert u.name in SCHEMAS and (choice["type"] == "any" or u.name == "add")
            jsonschema.validate(u.input, SCHEMAS[u.name])


class Answer(pydantic.BaseModel):
    topic: str = pydantic.Field(max_length=40)
    kind: str
    confidence: int = pydantic.Field(ge=0, le=10)


def test_response_format_json_schema_parsed_by_the_client(oai):
    for seed in range(3):
        r = oai.chat.completions.parse(model="demo", messages=QUESTION, response_format=Answer, temperature=1.0,
                                       seed=seed, max_tokens=400, extra_body={"chat_template_kwargs": {"thinking": False}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Answer) and 0 <= parsed.confidence <= 10


def test_response_format_json_object_after_reasoning(oai):
    r = oai.chat.completions.create(model="demo", messages=QUESTION, response_format={"type": "json_object"},
                                    temperature=1.0, seed=2, max_tokens=500)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # the reasoning took the budget: said so, with the reasoning
        assert r.choices[0].finish_reason == "length"


def test_unsupported_schema_features_are_a_400_naming_the_field(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="demo", messages=QUESTION, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                   "schema": {"type": "string", "format": "no-such-format"}}})
    assert "response_format.json_schema.schema" in str(e.value) and "no-such-format" in str(e.value)
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/definitions/missing"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="demo", messages=QUESTION, tools=bad, tool_choice="required")
    assert "tools[0].function.parameters" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="demo", messages=QUESTION, response_format={"type": "xml"})
    # Not asked to be strict (tool_choice auto, a non-strict json_schema): the keyword is ignored.
    weird = {"type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": weird}}]
    r = oai.chat.completions.create(model="demo", messages=QUESTION, tools=tools, max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    r = oai.chat.completions.create(model="demo", messages=QUESTION, max_tokens=4, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "strict": False, "schema": weird}})
    assert r.choices[0].finish_reason == "length"


def test_thinking_that_eats_the_budget_says_length(oai, ant):
    r = oai.chat.completions.create(model="demo", messages=QUESTION, max_tokens=8, temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length" and msg.reasoning_content and not msg.content
    chunks = list(oai.chat.completions.create(model="demo", messages=QUESTION, max_tokens=8, temperature=0,
                                              stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    off = oai.chat.completions.create(model="demo", messages=QUESTION, max_tokens=8, temperature=0,
                                      reasoning_effort="none")
    assert off.choices[0].message.content and not getattr(off.choices[0].message, "reasoning_content", None)
    m = ant.messages.create(model="demo", max_tokens=8, messages=QUESTION, extra_body={"temperature": 0},
                            thinking={"type": "enabled", "budget_tokens": 1024})
    assert m.stop_reason == "max_tokens" and [b.type for b in m.content] == ["thinking"]


# ---- the grammar corpus ------------------------------------------------------------------------

def random_schema(rnd: random.Random, depth: int = 0) -> dict:
    """Objects, enums, arrays, nested objects, optional fields, additionalProperties false;
    strings, arrays and numbers bounded so a model at temperature 1 ends within the budget."""
    kinds = ["string", "enum", "integer", "number", "boolean", "array"] + (["object"] * 2 if depth < 2 else [])
    kind = rnd.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rnd.randint(1, 12)}
    if kind == "enum":
        return {"enum": rnd.sample(["red", "green", "blue", "x", "A b", "ü"], rnd.randint(1, 4))}
    if kind == "integer":
        return {"type": "integer", "minimum": -50, "maximum": rnd.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 10}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": random_schema(rnd, depth + 1), "maxItems": rnd.randint(0, 3)}
    names = rnd.sample(["id", "name", "tags", "size", "ok", "child", "when", "score"], rnd.randint(1, 4))
    props = {n: random_schema(rnd, depth + 1) for n in names}
    return {"type": "object", "properties": props, "required": [n for n in names if rnd.random() < 0.6],
            "additionalProperties": False}


def test_grammar_corpus_always_validates(oai):
    import concurrent.futures

    rnd = random.Random(14)
    cases = []
    for i in range(16):
        schema = random_schema(rnd)
        if schema.get("type") != "object":
            schema = {"type": "object", "properties": {"value": schema}, "required": ["value"],
                      "additionalProperties": False}
        cases.append((i, schema))

    def one(case):
        i, schema = case
        r = oai.chat.completions.create(model="demo", messages=QUESTION, temperature=1.0, seed=i, max_tokens=400,
                                        reasoning_effort="none", response_format={
                                            "type": "json_schema",
                                            "json_schema": {"name": f"s{i}", "strict": True, "schema": schema}})
        return schema, r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for schema, choice in pool.map(one, cases):
            assert choice.finish_reason == "stop", (schema, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)


def test_thinking_replies_end_with_an_answer_or_length(oai):
    # Left alone, the demo model often stops right after its reasoning; a reply must not be a
    # "stop" with empty content.
    import concurrent.futures

    def one(seed):
        return oai.chat.completions.create(model="demo", messages=QUESTION, seed=seed, max_tokens=300).choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for choice in pool.map(one, range(12)):
            if choice.finish_reason == "length":
                assert choice.message.reasoning_content
            else:
                assert choice.finish_reason == "stop" and choice.message.content


def test_thinking_switches(oai):
    on = oai.chat.completions.create(model="demo", messages=QUESTION, max_tokens=8, temperature=0,
                                     extra_body={"chat_template_kwargs": {"thinking": True}})
    off = oai.chat.completions.create(model="demo", messages=QUESTION, max_tokens=8, temperature=0,
                                      extra_body={"chat_template_kwargs": {"thinking": False}})
    high = oai.chat.completions.create(model="demo", messages=QUESTION, max_tokens=8, temperature=0,
                                       reasoning_effort="high")
    assert on.choices[0].message.reasoning_content and high.choices[0].message.reasoning_content
    assert off.choices[0].message.content and not getattr(off.choices[0].message, "reasoning_content", None)


def test_pydantic_ai_agent_structured_output_and_tools(server):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("demo", provider=OpenAIProvider(base_url=server.url + "/v1", api_key="x"))

    class Doc(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=30)
        is_builtin: bool

    # output_type: pydantic-ai offers a final_result tool with tool_choice "required" and
    # validates the call's arguments in its own parser (it retried and gave up before).
    agent = Agent(model, output_type=Doc, model_settings={"temperature": 1.0, "max_tokens": 200})
    for _ in range(3):
        assert isinstance(agent.run_sync("What does len do?").output, Doc)
    # Instant mode: the demo model's reasoning often outruns a small budget (a "length" that
    # pydantic-ai reports as OutputTokenLimitExceeded, as it should).
    tools = Agent(model, model_settings={"temperature": 1.0, "max_tokens": 200,
                                         "extra_body": {"chat_template_kwargs": {"thinking": False}}})
    called = []

    @tools.tool_plain
    def python_help(name: str) -> str:
        """Look up the documentation of a Python name"""
        called.append(name)
        return f"{name}: the length of a container"

    for _ in range(2):  # a call, if the model makes one, names the tool offered; the run completes
        assert isinstance(tools.run_sync("What does len do?").output, str)


class Verdict(pydantic.BaseModel):
    kind: typing.Literal["function", "class", "module"]
    builtin: bool


def test_anthropic_structured_output_parsed_by_the_client(ant):
    # The anthropic client moves maxLength / minimum / maximum into descriptions (its API does
    # not take them), so an unbounded string or integer could run to max_tokens at temperature
    # 1: this schema is bounded by its types alone.
    for _ in range(3):
        m = ant.messages.parse(model="demo", max_tokens=100, messages=QUESTION, output_format=Verdict,
                               thinking={"type": "disabled"}, extra_body={"temperature": 1.0})
        assert m.stop_reason == "end_turn" and isinstance(m.parsed_output, Verdict)
    with pytest.raises(anthropic.BadRequestError) as e:
        ant.messages.create(model="demo", max_tokens=8, messages=QUESTION, output_config={
            "format": {"type": "json_schema", "schema": {"type": "string", "format": "no-such-format"}}})
    assert "output_config.format.schema" in str(e.value)


def test_anthropic_thinking_budget_ends_the_reasoning(ant):
    def count(text):
        return ant.messages.count_tokens(model="demo", messages=[{"role": "user", "content": "x" + text}]).input_tokens

    for seed in range(3):
        m = ant.messages.create(model="demo", max_tokens=200, messages=QUESTION,
                                thinking={"type": "enabled", "budget_tokens": 16},
                                extra_body={"temperature": 1.0, "seed": seed})
        kinds = [b.type for b in m.content]
        assert kinds[0] == "thinking" and "text" in kinds, kinds
        # Re-tokenized, with a little slack; a U+FFFD (bytes of a character cut by the budget)
        # would re-encode as 3 byte tokens, so those are left out of the count.
        assert count(m.content[0].thinking.replace("\ufffd", "")) - count("") <= 16 + 2
