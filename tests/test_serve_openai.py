"""The official openai SDK against a live `hybrid serve` app on loopback (tiny random model).

Greedy (temperature 0) requests are deterministic, so a streamed answer must equal the same
request answered whole, and usage must count exactly the tokens that made the text.
"""

import json

import httpx
import openai
import pytest

from test_serve_support import LiveServer, metric, raw_answer, stop_string_for

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "Hello there, who are you?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server():
    s = LiveServer({"api_key": KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def chat(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", HELLO)
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 24)
    kw.setdefault("extra_body", {"thinking": False})
    return client.chat.completions.create(**kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed


def test_chat_non_stream_usage_adds_up(client):
    r = chat(client)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens <= 24
    if choice.finish_reason == "length":
        assert u.completion_tokens == 24


def test_stream_equals_whole_and_reports_usage(client):
    whole = chat(client, max_tokens=30)
    chunks = list(chat(client, max_tokens=30, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_thinking_on_and_off(client):
    on = chat(client, extra_body={"chat_template_kwargs": {"thinking": True}}, max_tokens=16)
    off = chat(client, extra_body={"thinking": {"type": "disabled"}}, max_tokens=16)
    # Thinking mode opens <think> in the prompt, so the answer starts as reasoning.
    msg_on = on.choices[0].message.model_dump()
    assert msg_on.get("reasoning_content")
    assert not off.choices[0].message.model_dump().get("reasoning_content")
    # "<think>" vs "<think></think>" at the end of the prompt: exactly one token apart.
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + 1
    streamed = list(chat(client, extra_body={"chat_template_kwargs": {"thinking": True}}, max_tokens=16,
                         stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in streamed)
    assert reasoning == msg_on["reasoning_content"]


def test_stop_sequence_cuts_the_answer(server, client):
    full = chat(client, max_tokens=40, extra_body={"thinking": False, "ignore_eos": True}).choices[0].message.content
    assert len(full) > 12
    stop = stop_string_for(full, raw_answer(server, HELLO, 40, KEY))
    cut = full[: full.find(stop)]
    r = chat(client, max_tokens=40, stop=[stop, "never-appears"], extra_body={"thinking": False, "ignore_eos": True})
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = chat(client, max_tokens=40, stop=stop, stream=True, extra_body={"thinking": False, "ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_logprobs(client):
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=8, extra_body={"thinking": False, "ignore_eos": True})
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens == 8
    for lp in lps:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)


def test_forced_tool_call_and_round_trip(client):
    r = chat(client, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
             max_tokens=12)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    kimi, suffix = calls[0].id.rsplit("-", 1)  # Kimi's id, made unique by a random suffix
    assert kimi == "functions.get_weather:0" and len(suffix) == 12 and calls[0].type == "function"
    assert r.choices[0].finish_reason in ("tool_calls", "length")
    # Send the call and its result back: the template writes both into the prompt.
    history = HELLO + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}]
    r2 = chat(client, messages=history, tools=[WEATHER_TOOL])
    assert r2.choices[0].message.role == "assistant"
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + len("sunny, 21 C")
    # Streamed forced call: the first tool delta carries id and name.
    chunks = list(chat(client, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=6, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas == [] or deltas[0].index == 0


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens == len("The capital of France is".encode())  # byte-level vocabulary
    s = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=10, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text
    ids = client.completions.create(model="tiny", prompt=[84, 104, 101], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


@pytest.mark.parametrize("kw, status, needle", [
    ({"model": "gpt-4"}, 404, "gpt-4"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"n": 2}, 400, "'n'"),
    ({"temperature": 5}, 400, "temperature"),
    ({"seed": 2**70}, 400, "seed"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "text only"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "nope"),
])
def test_bad_requests_are_4xx_with_reason(client, kw, status, needle):
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, **kw)
    assert e.value.status_code == status
    assert needle in e.value.message
    assert e.value.body["type"] in ("invalid_request_error", "not_found_error")


def test_raw_protocol_errors_keep_the_server_serving(server, client):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "tiny", "messages": [', headers=h)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"[" * 50_000, headers=h)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    r = httpx.post(url, content=b'{"model": "tiny", "seed": ' + b"9" * 5000 + b"}", headers=h)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=json.dumps({"model": "tiny", "messages": "hi"}), headers=h)
    assert r.status_code == 400 and "'messages' must be an array" in r.json()["error"]["message"]
    r = httpx.post(url, content=json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": "ten"}), headers=h)
    assert r.status_code == 400 and "'max_tokens' must be an integer" in r.json()["error"]["message"]
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 100_000}]})
    r = httpx.post(url, content=big, headers=h)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    long_prompt = [{"role": "user", "content": "y" * 2000}]  # 2000 byte tokens > 1024 context
    r = httpx.post(url, content=json.dumps({"model": "tiny", "messages": long_prompt}), headers=h)
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = httpx.post(url, content=json.dumps({"model": "tiny", "messages": HELLO}))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(server.url + "/v1/nothing", headers=h)
    assert r.status_code == 404
    # x-api-key works on OpenAI routes too; and the server still answers.
    r = httpx.post(url, json={"model": "tiny", "messages": HELLO, "max_tokens": 3}, headers={"x-api-key": KEY})
    assert r.status_code == 200
    assert chat(client, max_tokens=2).usage.completion_tokens <= 2
    m = httpx.get(server.url + "/metrics", headers=h).text
    assert metric(m, "hybrid_running") == 0 and metric(m, "hybrid_queue_depth") == 0
