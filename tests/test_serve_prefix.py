"""Many sub-agents with one long system prompt against a live `hybrid serve` on the demo model:
64 concurrent chat requests answer exactly as the same requests sent one at a time, the shared
prompt is computed once (counted in /metrics), usage reports the reused tokens in both dialects,
and every KV block is given back at the end (checked through /metrics)."""

import asyncio

import anthropic
import httpx
import pytest

from test_serve_support import LiveServer, metric

N = 64
SYSTEM = " ".join(f"Rule {i}: answer briefly, and call a tool only when one was offered." for i in range(40))


@pytest.fixture(scope="module")
def server():
    import torch

    import hybrid
    from hybrid.api import DEMO_DIR

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("no embedded demo model in this tree")
    loaded = hybrid.load(None, dtype=torch.float32, progress=False)
    s = LiveServer({"model_name": "demo"}, max_seqs=N, loaded=loaded, context=1280)
    yield s
    s.stop()


def body(i: int) -> dict:
    return {"model": "demo", "max_tokens": 6, "temperature": 0, "thinking": False,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Task {i}: greet agent {i}."}]}


def metrics(server) -> str:
    return httpx.get(server.url + "/metrics").text


async def post_all(url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))
    for r in rs:
        r.raise_for_status()
    return [r.json() for r in rs]


def test_concurrent_sub_agents_share_the_system_prompt(server):
    m0 = metrics(server)
    computed0 = metric(m0, "hybrid_prefill_tokens_computed_total")
    together = asyncio.run(post_all(server.url, [body(i) for i in range(N)]))
    m1 = metrics(server)
    computed = metric(m1, "hybrid_prefill_tokens_computed_total") - computed0
    prompt_tokens = [r["usage"]["prompt_tokens"] for r in together]
    assert min(prompt_tokens) > 1000
    # The system prompt (the same first ~1000 tokens everywhere) was computed once: all the
    # other requests computed only their own task, less than a hundred tokens each.
    assert computed < prompt_tokens[0] + (N - 1) * 100
    cached = [r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in together]
    assert sum(c >= 960 for c in cached) >= N - 1
    assert metric(m1, "hybrid_kv_blocks_used") == 0 and metric(m1, "hybrid_kv_blocks_reserved") == 0
    assert metric(m1, "hybrid_kv_blocks_cached") > 0  # kept for the next request with that prompt

    alone = []
    with httpx.Client(base_url=server.url, timeout=300) as c:
        for i in range(N):
            r = c.post("/v1/chat/completions", json=body(i))
            r.raise_for_status()
            alone.append(r.json())
    assert [r["choices"][0]["message"] for r in together] == [r["choices"][0]["message"] for r in alone]
    assert [r["choices"][0]["finish_reason"] for r in together] == [r["choices"][0]["finish_reason"] for r in alone]
    m2 = metrics(server)
    assert metric(m2, "hybrid_kv_blocks_used") == 0 and metric(m2, "hybrid_kv_blocks_shared") == 0
    total = metric(m2, "hybrid_kv_blocks_total")
    assert metric(m2, "hybrid_kv_blocks_cached") + metric(m2, "hybrid_kv_blocks_free") == total


def test_anthropic_reports_cache_reads(server):
    a = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    msg = [{"role": "user", "content": "Task 0: greet agent 0."}]
    first = a.messages.create(model="demo", max_tokens=4, system=SYSTEM, messages=msg,
                              thinking={"type": "disabled"}, extra_body={"temperature": 0})
    again = a.messages.create(model="demo", max_tokens=4, system=SYSTEM, messages=msg,
                              thinking={"type": "disabled"}, extra_body={"temperature": 0})
    assert again.usage.cache_read_input_tokens >= 960
    assert (again.usage.input_tokens + again.usage.cache_read_input_tokens
            == first.usage.input_tokens + first.usage.cache_read_input_tokens)
