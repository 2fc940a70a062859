"""Sub-agent swarm against `hybrid serve`: N agents at once, one shared system prompt and tool
list, each with its own short task and tool-call round trips.

    python bench/swarm.py                          # demo model in-process, 1 and 16 agents
    python bench/swarm.py --agents 1,16,100 --compare
    python bench/swarm.py --url http://127.0.0.1:8000 --agents 100 --system-tokens 4000

Each agent sends a streaming /v1/chat/completions request (system prompt of about
--system-tokens tokens, the tool list, its task); when the answer calls a tool, it sends the
tool's result back and asks again, up to --rounds requests. Reported per agent count:

  prefill    prompt tokens the server computed (hybrid_prefill_tokens_computed_total) against
             the prompt tokens sent (what a server without prefix sharing computes)
  KV         peak KV blocks held (hybrid_kv_blocks_used, polled) in bytes, against every live
             agent holding its own copy of its context ("unshared"); with whole-context slots,
             the slots allocated
  TTFT       time to first token (text, reasoning or tool call) p50 / p99, over all requests
  tok/s      aggregate completion tokens per second, and against one agent alone (N = 1 run)
  errors     failed requests by kind

With no --url the bench loads the model (default: the embedded demo model) and serves it on a
free loopback port, a fresh engine per run so each starts with an empty prefix cache; --compare
runs every count again with whole-context slots (--kv-block-size 0: no sharing while agents
run). Loopback only; bounded by --time-limit. Greedy, so runs are comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

from serve_load import LOOPBACK, percentiles

TOOLS = [
    {"type": "function", "function": {
        "name": "python_help", "description": "Look up the documentation of a Python name",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]
NAMES = ["len", "str.split", "dict.get", "sorted", "zip", "enumerate", "open", "print"]


def system_prompt(tok, tokens: int) -> str:
    """About `tokens` tokens of plain instructions (counted with the server's tokenizer when it
    is in-process, else ~4 characters a token)."""
    rules = [f"Rule {i}: you are sub-agent of a team; answer briefly, call a tool when it helps, "
             f"and report what you found." for i in range(tokens // 8 + 1)]
    text = ""
    for r in rules:
        if (len(tok.encode(text + r)) if tok else (len(text) + len(r)) / 4) > tokens:
            break
        text += r + " "
    return text.strip()


@dataclass
class Agent:
    requests: int = 0
    ttft: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tool_calls: int = 0
    error: str = ""


async def one_request(client, base, body) -> tuple[float | None, dict | None, list, str]:
    """-> (ttft, usage, tool calls, error)."""
    t0, ttft, usage, calls = time.perf_counter(), None, None, {}
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return None, None, [], f"HTTP {resp.status_code}"
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return ttft, usage, [], "stream error"
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                d = choice.get("delta", {})
                if ttft is None and (d.get("content") or d.get("reasoning_content") or d.get("tool_calls")):
                    ttft = time.perf_counter() - t0
                for tc in d.get("tool_calls") or ():
                    c = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                    c["id"] = tc.get("id") or c["id"]
                    fn = tc.get("function") or {}
                    c["name"] += fn.get("name") or ""
                    c["arguments"] += fn.get("arguments") or ""
    return ttft, usage, [calls[i] for i in sorted(calls)], ""


async def agent(client, base, model, system, i, args) -> Agent:
    a = Agent()
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": f"Task {i}: explain {NAMES[i % len(NAMES)]} to agent {i}."}]
    try:
        for _ in range(args.rounds):
            body = {"model": model, "messages": messages, "tools": TOOLS, "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                    "thinking": False}
            ttft, usage, calls, error = await one_request(client, base, body)
            a.requests += 1
            if error:
                a.error = error
                return a
            if ttft is not None:
                a.ttft.append(ttft)
            if usage:
                a.completion_tokens += usage["completion_tokens"]
                a.prompt_tokens += usage["prompt_tokens"]
                a.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            if not calls:
                break
            a.tool_calls += len(calls)
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in calls]})
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": f"{c['name']}: (documentation text)"}
                         for c in calls]
    except Exception as e:  # a load test counts failures instead of stopping at the first
        a.error = type(e).__name__
    return a


def metric_values(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def swarm(base: str, n: int, system: str, args) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.time_limit), limits=limits) as client:
        model = (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        # warm-up, before timing, with a prompt that shares nothing with the agents'
        await one_request(client, base, {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 2, "stream": True, "thinking": False})
        before = metric_values((await client.get(base + "/metrics")).text)
        peak, stop = [0.0], asyncio.Event()

        async def poll():
            while not stop.is_set():
                try:
                    m = metric_values((await client.get(base + "/metrics")).text)
                except httpx.HTTPError:  # a kept-alive connection the server closed: next poll
                    continue
                peak[0] = max(peak[0], m.get("hybrid_kv_blocks_used", 0.0))
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll())
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(agent(client, base, model, system, i, args)) for i in range(n)]
        done, late = await asyncio.wait(tasks, timeout=args.time_limit)
        for t in late:
            t.cancel()
        agents = [t.result() if t in done else Agent(error="time limit") for t in tasks]
        wall = time.perf_counter() - t0
        stop.set()
        await poller
        after = metric_values((await client.get(base + "/metrics")).text)
    computed = after.get("hybrid_prefill_tokens_computed_total", float("nan")) - \
        before.get("hybrid_prefill_tokens_computed_total", float("nan"))
    bpt = after.get("hybrid_kv_bytes_per_token", float("nan"))
    block = after.get("hybrid_kv_block_size", float("nan"))
    ok = [a for a in agents if not a.error]
    ttft = percentiles([t for a in ok for t in a.ttft], (50, 99))
    tokens = sum(a.completion_tokens for a in ok)
    longest = max((a.prompt_tokens / max(a.requests, 1) + args.max_tokens for a in ok), default=0)
    return {"agents": n, "requests": sum(a.requests for a in agents), "tool_calls": sum(a.tool_calls for a in ok),
            "prompt_tokens": sum(a.prompt_tokens for a in ok), "prefill_computed": computed,
            "cached_tokens": sum(a.cached_tokens for a in ok),
            "kv_peak_bytes": peak[0] * block * bpt, "kv_unshared_bytes": n * longest * bpt,
            "ttft_ms": {p: v * 1000 for p, v in ttft.items()}, "wall_s": wall, "tokens": tokens,
            "tok_per_s": tokens / wall if wall else 0.0,
            "errors": dict(Counter(a.error for a in agents if a.error))}


class InProcessServer:
    """hybrid serve's app over a fresh Engine on `model`, on a free loopback port."""

    def __init__(self, model, max_running: int, context: int, block_size: int):
        import socket

        import uvicorn

        from hybrid.commands.serve import build_backend
        from hybrid.serve.app import create_app
        from hybrid.serve.config import ServeConfig

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = ServeConfig(port=port, model_name="swarm", max_running=max_running, max_queued=4 * max_running,
                          max_tokens=1024, context_length=context, kv_block_size=block_size)
        cfg.validate()
        self.backend = build_backend(model, cfg)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.backend, cfg), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("swarm: the in-process server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.backend.engine.close()


def report(rows: list[dict]) -> None:
    one = {r["mode"]: r["tok_per_s"] for r in rows if r["agents"] == 1}
    mib = 1024 ** 2
    print(f"{'mode':>6} {'agents':>6} {'req':>5} {'prefill computed / sent':>24} {'KV peak MiB':>11} "
          f"{'unshared':>9} {'TTFT p50':>9} {'p99 ms':>8} {'tok/s':>7} {'x one':>6}  errors")
    for r in rows:
        base = one.get(r["mode"])
        x = f"{r['tok_per_s'] / base:.2f}" if base else "-"
        print(f"{r['mode']:>6} {r['agents']:6d} {r['requests']:5d} "
              f"{r['prefill_computed']:>11.0f} / {r['prompt_tokens']:<10d} "
              f"{r['kv_peak_bytes'] / mib:11.2f} {r['kv_unshared_bytes'] / mib:9.2f} "
              f"{r['ttft_ms'][50]:9.1f} {r['ttft_ms'][99]:8.1f} {r['tok_per_s']:7.1f} {x:>6}  "
              f"{r['errors'] or '-'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", default="1,16", metavar="N,N,...", help="agent counts to run (default 1,16)")
    p.add_argument("--url", default=None, help="a running server (loopback only); default: serve in-process")
    p.add_argument("--model", default=None, help="checkpoint to serve in-process (default: the demo model)")
    p.add_argument("--system-tokens", type=int, default=1500,
                   help="shared system prompt length (default 1500: the demo model's context is 2048)")
    p.add_argument("--max-tokens", type=int, default=32, help="completion limit per request (default 32)")
    p.add_argument("--rounds", type=int, default=2, help="requests per agent at most (tool round trips; default 2)")
    p.add_argument("--context", type=int, default=2048, help="in-process server's context length (default 2048)")
    p.add_argument("--kv-block-size", type=int, default=16, help="in-process KV block size (default 16)")
    p.add_argument("--compare", action="store_true", help="also run with whole-context slots (no sharing)")
    p.add_argument("--time-limit", type=float, default=240.0, help="seconds a run may take (default 240)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    try:
        counts = [int(c) for c in args.agents.split(",")]
    except ValueError:
        print(f"swarm: --agents must be comma-separated integers, got {args.agents!r}", file=sys.stderr)
        return 2
    if min(counts) < 1 or args.rounds < 1 or args.max_tokens < 1 or args.system_tokens < 1:
        print("swarm: --agents, --rounds, --max-tokens and --system-tokens must be >= 1", file=sys.stderr)
        return 2
    rows = []
    if args.url is not None:
        if urlparse(args.url).hostname not in LOOPBACK:
            print(f"swarm: refusing {args.url}: only loopback servers", file=sys.stderr)
            return 2
        system = system_prompt(None, args.system_tokens)
        for n in counts:
            rows.append(dict(asyncio.run(swarm(args.url.rstrip("/"), n, system, args)), mode="server"))
    else:
        import hybrid

        model = hybrid.load(args.model, progress=False)
        system = system_prompt(model.tokenizer, args.system_tokens)
        modes = [("paged" if args.kv_block_size else "slots", args.kv_block_size)]
        modes += [("slots", 0)] if args.compare and args.kv_block_size else []
        for mode, block_size in modes:
            for n in counts:
                server = InProcessServer(model, n, args.context, block_size)
                try:
                    row = dict(asyncio.run(swarm(server.url, n, system, args)), mode=mode)
                    print(f"swarm: {mode} x {n} agents: {row['wall_s']:.1f} s", file=sys.stderr)
                    if not block_size:  # whole-context slots: all of it is allocated up front
                        row["kv_peak_bytes"] = n * args.context * model.kv_bytes_per_token()
                        row["kv_unshared_bytes"] = row["kv_peak_bytes"]
                    rows.append(row)
                finally:
                    server.close()
    if args.json:
        print(json.dumps(rows))
    else:
        report(rows)
    return 0 if not any(r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
