"""What real clients send that the server must survive, against a live `hybrid serve` on the
embedded demo model: broken text, empty content, clients that leave mid-body; and what it must
never send back (repeated tool-call ids, special-token text in content). Every request is
bounded (a few tokens, a timeout), loopback only.
"""

import json
import logging
import socket
import time

import httpx
import pytest

from test_serve_support import LiveServer, metric

CUT = "a\ud800b"  # a string cut inside an emoji: a lone UTF-16 surrogate
TOOL = {"type": "function", "function": {
    "name": "python_help", "description": "Look up the documentation of a Python name",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}
ANTHROPIC_TOOL = {"name": "python_help", "description": TOOL["function"]["description"],
                  "input_schema": TOOL["function"]["parameters"]}
QUESTION = [{"role": "user", "content": "What does len do?"}]


@pytest.fixture(scope="module")
def server():
    from hybrid.api import DEMO_DIR

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("no embedded demo model in this tree")
    import torch

    import hybrid

    loaded = hybrid.load(None, dtype=torch.float32, progress=False)
    s = LiveServer({"model_name": "demo"}, max_seqs=4, loaded=loaded, context=1024)
    yield s
    s.stop()


def post(server, path, body) -> httpx.Response:
    # json.dumps writes a lone surrogate as the escape "\ud800", as JavaScript clients do.
    return httpx.post(server.url + path, content=json.dumps(body), timeout=60,
                      headers={"Content-Type": "application/json"})


def requests_by_status(server) -> dict[int, int]:
    out = {}
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("hybrid_requests_total{"):
            status = int(line.split('status="')[1].split('"')[0])
            out[status] = out.get(status, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


# ---- 1. lone surrogates are replaced by U+FFFD in every text field of every route -----------

OPENAI_CHAT = {"model": "demo", "max_tokens": 2, "temperature": 0}
SURROGATE_CASES = [
    ("/v1/chat/completions", dict(OPENAI_CHAT, messages=[{"role": "user", "content": CUT}])),
    ("/v1/chat/completions", dict(OPENAI_CHAT, messages=[{"role": "system", "content": CUT}] + QUESTION)),
    ("/v1/chat/completions", dict(OPENAI_CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": CUT}]}])),
    ("/v1/chat/completions", dict(OPENAI_CHAT, messages=QUESTION, tools=[
        {"type": "function", "function": dict(TOOL["function"], description=CUT)}])),
    ("/v1/chat/completions", dict(OPENAI_CHAT, messages=QUESTION, stop=[CUT])),
    ("/v1/completions", {"model": "demo", "prompt": CUT, "max_tokens": 2, "temperature": 0}),
    ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 2, "stop": "\udc00"}),
    ("/v1/messages", {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": CUT}]}),
    ("/v1/messages", {"model": "demo", "max_tokens": 2, "system": CUT, "messages": QUESTION}),
    ("/v1/messages", {"model": "demo", "max_tokens": 2, "messages": QUESTION, "stop_sequences": [CUT],
                      "tools": [dict(ANTHROPIC_TOOL, description=CUT)]}),
    ("/v1/messages", {"model": "demo", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": CUT}]}]}),
    ("/v1/messages/count_tokens", {"model": "demo", "messages": [{"role": "user", "content": CUT}]}),
]


@pytest.mark.parametrize("path, body", SURROGATE_CASES)
def test_lone_surrogate_in_any_text_field_is_replaced_not_a_500(server, path, body):
    r = post(server, path, body)
    assert r.status_code == 200, r.text


def test_a_surrogate_in_a_name_that_is_echoed_back_comes_back_replaced(server):
    # A forced call to a tool whose name holds the surrogate: the name is in the response.
    fn = dict(TOOL["function"], name="help" + CUT)
    for stream in (False, True):
        r = post(server, "/v1/chat/completions", dict(OPENAI_CHAT, messages=QUESTION, stream=stream, tools=[
            {"type": "function", "function": fn}], tool_choice={"type": "function", "function": {"name": fn["name"]}}))
        assert r.status_code == 200 and "help" + "a\ufffdb" in r.content.decode(), r.text
        assert "data: [DONE]" in r.text if stream else r.json()["choices"][0]["message"]["tool_calls"]


def test_a_replaced_surrogate_is_the_replacement_character(server):
    # The prompt holds exactly what "a\ufffdb" gives, on both dialects.
    def prompt_tokens(path, text):
        body = {"model": "demo", "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": text}]}
        usage = post(server, path, body).json()["usage"]
        return usage.get("prompt_tokens", usage.get("input_tokens"))

    for path in ("/v1/chat/completions", "/v1/messages"):
        assert prompt_tokens(path, CUT) == prompt_tokens(path, "a\ufffdb")
    r = post(server, "/v1/completions", {"model": "demo", "prompt": CUT, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == post(
        server, "/v1/completions", {"model": "demo", "prompt": "a\ufffdb", "max_tokens": 1}).json()["usage"]["prompt_tokens"]


# ---- 2. empty content arrays are a 400 naming the field ---------------------------------------

@pytest.mark.parametrize("path, messages, field", [
    ("/v1/messages", [{"role": "user", "content": []}], "messages[0].content"),
    ("/v1/messages", QUESTION + [{"role": "assistant", "content": []}, {"role": "user", "content": "and?"}],
     "messages[1].content"),
    ("/v1/chat/completions", [{"role": "user", "content": []}], "messages[0].content"),
    ("/v1/chat/completions", [{"role": "system", "content": []}] + QUESTION, "messages[0].content"),
    ("/v1/chat/completions", QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "python_help", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": []}], "messages[2].content"),
])
def test_empty_content_array_is_a_400_naming_the_field(server, path, messages, field):
    r = post(server, path, {"model": "demo", "max_tokens": 2, "messages": messages})
    assert r.status_code == 400, r.text
    body = r.json()
    message = body["error"]["message"]
    assert f"'{field}' is an empty array" in message
    if path == "/v1/chat/completions":
        assert body["error"]["param"] == field
    else:
        assert body["error"]["type"] == "invalid_request_error"


def test_empty_content_where_it_is_allowed(server):
    # A final assistant turn (Anthropic prefill) and an assistant turn of only tool calls.
    r = post(server, "/v1/messages", {"model": "demo", "max_tokens": 2, "temperature": 0,
                                      "messages": QUESTION + [{"role": "assistant", "content": []}]})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/chat/completions", dict(OPENAI_CHAT, tools=[TOOL], messages=QUESTION + [
        {"role": "assistant", "content": [], "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "python_help", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "len(obj, /)"}]))
    assert r.status_code == 200, r.text


# ---- 3. a client that leaves while sending its body is not a server error ----------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages",
                                  "/v1/messages/count_tokens"])
def test_client_leaving_mid_body_is_counted_499_and_not_logged_as_an_error(server, path):
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("hybrid.serve", "uvicorn.error", "uvicorn")]
    for lg in loggers:
        lg.addHandler(records)
    try:
        before = requests_by_status(server)
        host, port = server.url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 1000\r\n\r\n".encode() + b'{"model": "demo", "messa')
            time.sleep(0.2)  # the route is reading the body now
        deadline = time.monotonic() + 10
        while requests_by_status(server).get(499, 0) == before.get(499, 0):
            assert time.monotonic() < deadline, "the disconnect was not counted"
            time.sleep(0.05)
        after = requests_by_status(server)
    finally:
        for lg in loggers:
            lg.removeHandler(records)
    assert after.get(500, 0) == before.get(500, 0)
    assert after.get(499, 0) == before.get(499, 0) + 1
    assert [r for r in records.records if r.levelno >= logging.WARNING or r.exc_info] == []
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


# ---- 5. tool-call ids are unique per call, and a result sent back maps to its call -------------

def test_tool_call_ids_are_unique_across_requests_and_keep_kimis_form(server):
    ids = []
    for _ in range(3):
        r = post(server, "/v1/chat/completions", dict(OPENAI_CHAT, max_tokens=30, messages=QUESTION, tools=[TOOL],
                                                      tool_choice="required"))
        ids += [c["id"] for c in r.json()["choices"][0]["message"]["tool_calls"]]
        r = post(server, "/v1/messages", {"model": "demo", "max_tokens": 30, "temperature": 0, "messages": QUESTION,
                                          "tools": [ANTHROPIC_TOOL], "tool_choice": {"type": "any"}})
        ids += [b["id"] for b in r.json()["content"] if b["type"] == "tool_use"]
    assert len(ids) >= 6 and len(set(ids)) == len(ids), ids
    assert all(i.startswith("functions.python_help:0-") for i in ids), ids


def _rendered(server, path, body) -> str:
    from hybrid.serve import anthropic_requests, openai_requests

    parse = anthropic_requests.parse_request if path == "/v1/messages" else openai_requests.parse_chat_request
    job, _ = parse(body, "demo", 512)
    ids, _ = server.backend.render_prompt(job)
    return server.backend.tokenizer.decode(ids)


def test_tool_results_sent_back_with_client_ids_map_to_their_calls(server):
    # Two turns whose calls the model both wrote as functions.python_help:0 (each came back with
    # its own suffix), plus a call id from another server: the prompt numbers the calls 0, 1, 2
    # across the conversation and each result follows its own call.
    first, second, other = "functions.python_help:0-aaaaaaaaaaaa", "functions.python_help:0-bbbbbbbbbbbb", "call_X"

    def call(i, name):
        return {"id": i, "type": "function", "function": {"name": "python_help", "arguments": json.dumps({"name": name})}}

    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call(first, "len")]},
        {"role": "tool", "tool_call_id": first, "content": "RESULT-len"},
        {"role": "user", "content": "And str and int?"},
        {"role": "assistant", "content": None, "tool_calls": [call(second, "str"), call(other, "int")]},
        {"role": "tool", "tool_call_id": other, "content": "RESULT-int"},
        {"role": "tool", "tool_call_id": second, "content": "RESULT-str"}]
    text = _rendered(server, "/v1/chat/completions", {"model": "demo", "messages": history, "tools": [TOOL]})
    for idx, name in enumerate(("len", "str", "int")):
        call_text = f"functions.python_help:{idx}<|tool_call_argument_begin|>{{\"name\": \"{name}\"}}"
        assert call_text in text and f"## Return of functions.python_help:{idx}\nRESULT-{name}" in text
    assert "aaaa" not in text and "bbbb" not in text and "call_X" not in text

    anthropic_history = QUESTION + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": first, "name": "python_help", "input": {"name": "len"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first, "content": "RESULT-len"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": second, "name": "python_help", "input": {"name": "str"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": second, "content": "RESULT-str"}]}]
    text = _rendered(server, "/v1/messages", {"model": "demo", "max_tokens": 4, "messages": anthropic_history,
                                              "tools": [ANTHROPIC_TOOL]})
    assert "## Return of functions.python_help:0\nRESULT-len" in text
    assert "## Return of functions.python_help:1\nRESULT-str" in text
    # And the server answers that history.
    r = post(server, "/v1/messages", {"model": "demo", "max_tokens": 4, "messages": anthropic_history,
                                      "tools": [ANTHROPIC_TOOL]})
    assert r.status_code == 200, r.text


# ---- 6. no special-token text in what is shown ---------------------------------------------

def test_no_special_token_text_in_any_answer(server):
    # Sampled answers (temperature 1, fixed seeds) with and without thinking and tools; the demo
    # model sometimes writes turn headers (tool_declare<|im_middle|><think>) or a call when no
    # tool was offered. Nothing of that may reach reasoning or content.
    specials = list(server.backend.tokenizer.special_tokens)
    questions = ["What does len do?", "Explain the with statement.", "What is the json module for?"]
    shown = []
    for i in range(12):
        body = {"model": "demo", "max_tokens": 48, "temperature": 1, "seed": i,
                "messages": [{"role": "user", "content": questions[i % 3]}]}
        if i % 4 == 1:
            body["thinking"] = False
        if i % 2:
            body["tools"] = [TOOL]
        r = post(server, "/v1/chat/completions", body)
        m = r.json()["choices"][0]["message"]
        shown += [m.get("content") or "", m.get("reasoning_content") or ""]
        anthropic_body = {k: v for k, v in body.items() if k not in ("thinking", "seed", "tools")}
        if "thinking" in body:
            anthropic_body["thinking"] = {"type": "disabled"}
        if "tools" in body:
            anthropic_body["tools"] = [ANTHROPIC_TOOL]
        a = post(server, "/v1/messages", anthropic_body)
        assert a.status_code == 200, a.text
        shown += [b.get("text", b.get("thinking", "")) for b in a.json()["content"]]
    leaks = [(s, t) for t in shown for s in specials if s in t]
    assert leaks == []
