"""Concurrent clients, queueing, and disconnects against a live server (tiny random model).

Continuous batching must not change greedy answers: 32 streams at once give exactly what the
same requests give one at a time. Slots are checked through /metrics and the engine's counters
(a cancelled request is counted as cancelled, not finished), never through timing.
"""

import asyncio
import time

import httpx
import openai
import pytest

from test_serve_support import LiveServer, metric


def request(i: int, **extra) -> dict:
    return dict(model="tiny", messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
                temperature=0, max_tokens=12, extra_body={"thinking": False, **extra})


def wait_until(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server():
    s = LiveServer(max_seqs=32)
    yield s
    s.stop()


def test_32_concurrent_streams_equal_one_at_a_time(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
        alone = [c.chat.completions.create(**request(i)).choices[0].message.content for i in range(32)]

    async def one(client, i):
        text, usage = [], None
        stream = await client.chat.completions.create(**request(i), stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        return "".join(text), usage

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    before = server.engine.stats()
    results = asyncio.run(all_at_once())
    assert [t for t, _ in results] == alone
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for _, u in results)
    after = server.engine.stats()
    assert after["requests_finished"] - before["requests_finished"] == 32
    assert after["requests_cancelled"] == before["requests_cancelled"]
    m = httpx.get(server.url + "/metrics").text
    assert metric(m, "hybrid_running") == 0 and metric(m, "hybrid_queue_depth") == 0
    assert metric(m, 'hybrid_requests_total{route="chat_completions",status="200"}') >= 64


def test_dropped_stream_frees_its_slot(server):
    before = server.engine.stats()
    body = request(0, ignore_eos=True)
    body.update(body.pop("extra_body"), max_tokens=500)
    # One client leaves right after the headers, one after reading a few tokens.
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 4:
                break
    wait_until(lambda: server.engine.stats()["running"] == 0, "the dropped streams' slots to be freed")
    after = server.engine.stats()
    assert after["requests_cancelled"] - before["requests_cancelled"] == 2
    assert after["requests_finished"] == before["requests_finished"]
    m = httpx.get(server.url + "/metrics").text
    assert metric(m, "hybrid_requests_cancelled_total") >= 2 and metric(m, "hybrid_running") == 0


def test_dropped_non_streaming_request_is_cancelled(server):
    before = server.engine.stats()
    body = request(1, ignore_eos=True)
    body.update(body.pop("extra_body"), max_tokens=500)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_until(lambda: server.engine.stats()["requests_cancelled"] > before["requests_cancelled"],
               "the abandoned request to be cancelled")
    assert server.engine.stats()["requests_finished"] == before["requests_finished"]


def test_queue_depth_visible_and_overflow_refused():
    s = LiveServer({"max_queued": 2}, max_seqs=2)
    try:
        body = request(2, ignore_eos=True)
        body.update(body.pop("extra_body"), max_tokens=300)

        async def fire():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
                async def post(i):
                    await asyncio.sleep(0.02 * i)  # arrive in order, so the queue is full for the last ones
                    return await client.post("/v1/chat/completions", json={**body, "stream": True})

                async def watch():
                    deepest = 0
                    for _ in range(200):
                        m = (await client.get("/metrics")).text
                        deepest = max(deepest, metric(m, "hybrid_queue_depth"))
                        if deepest >= 2:
                            return deepest
                        await asyncio.sleep(0.02)
                    return deepest

                responses = await asyncio.gather(*(post(i) for i in range(6)), watch())
                return responses[:-1], responses[-1]

        responses, deepest = asyncio.run(fire())
        codes = sorted(r.status_code for r in responses)
        assert deepest == 2
        assert codes.count(200) == 4 and codes.count(429) == 2
        refused = [r for r in responses if r.status_code == 429][0].json()["error"]
        assert refused["type"] == "rate_limit_error" and "busy" in refused["message"]
        wait_until(lambda: s.engine.stats()["running"] == 0 and s.engine.stats()["waiting"] == 0, "the queue to drain")
    finally:
        s.stop()
