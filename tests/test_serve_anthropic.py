"""The official anthropic SDK against a live `hybrid serve` app on loopback (tiny random model)."""

import json

import anthropic
import httpx
import pytest

from test_serve_support import LiveServer, raw_answer, stop_string_for

KEY = "ant-test-key"
HELLO = [{"role": "user", "content": "Hello there, who are you?"}]
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def prompt_tokens(usage) -> int:
    """The whole prompt: Anthropic counts prompt tokens whose KV was reused from an earlier turn
    as cache_read_input_tokens, not input_tokens."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


@pytest.fixture(scope="module")
def server():
    s = LiveServer({"api_key": KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def create(client, **kw):
    """messages.create, greedy. This SDK version has no sampling arguments, so temperature
    (which the server accepts, as Anthropic's API does) travels in extra_body."""
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", HELLO)
    kw.setdefault("max_tokens", 24)
    kw.setdefault("thinking", {"type": "disabled"})
    kw["extra_body"] = {"temperature": 0, **kw.get("extra_body", {})}
    return client.messages.create(**kw)


def text_of(msg) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def test_message_non_stream(client):
    m = create(client, system="You are terse.")
    assert m.type == "message" and m.role == "assistant" and m.model == "tiny"
    assert m.id.startswith("msg_")
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert 0 < m.usage.output_tokens <= 24 and m.usage.input_tokens > 0
    assert all(b.type == "text" for b in m.content)


def test_stream_event_sequence_and_final_message(server, client):
    whole = create(client, max_tokens=20, extra_body={"ignore_eos": True})
    with httpx.stream("POST", server.url + "/v1/messages", headers={"x-api-key": KEY},
                      json={"model": "tiny", "messages": HELLO, "max_tokens": 20, "temperature": 0,
                            "stream": True, "thinking": {"type": "disabled"}, "ignore_eos": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    with client.messages.stream(model="tiny", messages=HELLO, max_tokens=20, thinking={"type": "disabled"},
                                extra_body={"ignore_eos": True, "temperature": 0}) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == text_of(final) == text_of(whole)
    assert final.stop_reason == whole.stop_reason == "max_tokens"
    assert final.usage.output_tokens == whole.usage.output_tokens == 20
    assert prompt_tokens(final.usage) == prompt_tokens(whole.usage)


def test_thinking_block(client):
    m = create(client, thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=12)
    assert m.content[0].type == "thinking" and m.content[0].thinking
    with client.messages.stream(model="tiny", messages=HELLO, max_tokens=12, extra_body={"temperature": 0},
                                thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        final = s.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == m.content[0].thinking


def test_stop_sequences(server, client):
    full = text_of(create(client, max_tokens=40, extra_body={"ignore_eos": True}))
    stop = stop_string_for(full, raw_answer(server, HELLO, 40, KEY))
    m = create(client, max_tokens=40, stop_sequences=[stop], extra_body={"ignore_eos": True})
    assert text_of(m) == full[: full.find(stop)]
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    with client.messages.stream(model="tiny", messages=HELLO, max_tokens=40, stop_sequences=[stop],
                                thinking={"type": "disabled"}, extra_body={"ignore_eos": True, "temperature": 0}) as s:
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_tool_use_and_result_round_trip(client):
    m = create(client, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=10)
    # Random weights never close the call with valid JSON, so it comes back as visible text
    # (tool_use.input must be an object): the forced name, then what the model wrote.
    assert text_of(m).startswith("get_weather(") and "<|" not in json.dumps(m.model_dump())
    history = HELLO + [
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                          {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.get_weather:0",
                                      "content": "sunny, 21 C"}]}]
    m2 = create(client, messages=history, tools=[WEATHER])
    assert m2.role == "assistant" and prompt_tokens(m2.usage) > prompt_tokens(m.usage) + len("sunny, 21 C")


def test_prefill_continues_and_is_not_repeated(client):
    msgs = HELLO + [{"role": "assistant", "content": "I am"}]
    m = create(client, messages=msgs, max_tokens=5, extra_body={"ignore_eos": True})
    plain = create(client, max_tokens=1)
    assert m.usage.output_tokens == 5
    assert prompt_tokens(m.usage) == prompt_tokens(plain.usage) + len("I am")  # byte-level vocabulary
    assert not text_of(m).startswith("I am")


@pytest.mark.parametrize("kw, status, needle", [
    ({"model": "claude-x"}, 404, "claude-x"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"messages": [{"role": "system", "content": "x"}]}, 400, "messages[0].role"),
    ({"extra_body": {"temperature": 1.5}}, 400, "temperature"),
    ({"tool_choice": {"type": "any"}}, 400, "no tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "source.type' is required"),
])
def test_bad_requests_in_anthropic_error_shape(client, kw, status, needle):
    with pytest.raises(anthropic.APIStatusError) as e:
        create(client, **kw)
    assert e.value.status_code == status
    assert needle in e.value.message
    assert e.value.body["type"] == "error"


def test_count_tokens_matches_usage(client):
    m = create(client, system="Be brief.", max_tokens=1)
    counted = client.messages.count_tokens(model="tiny", messages=HELLO, system="Be brief.",
                                           thinking={"type": "disabled"})
    assert counted.input_tokens == prompt_tokens(m.usage)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("other")


def test_raw_errors_and_auth(server):
    url = server.url + "/v1/messages"
    r = httpx.post(url, content=b"{nope", headers={"x-api-key": KEY})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, json={"model": "tiny", "messages": HELLO}, headers={"x-api-key": KEY})
    assert r.status_code == 400 and "'max_tokens' is required" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "tiny", "messages": HELLO, "max_tokens": 3}, headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(url, json={"model": "tiny", "messages": HELLO, "max_tokens": 3},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["type"] == "message"
