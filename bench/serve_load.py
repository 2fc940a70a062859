"""Load test for `hybrid serve`: N concurrent streaming clients, M requests in all.

    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 8 --requests 64
    python bench/serve_load.py --url http://127.0.0.1:8000 --sweep 1,8,32,100 --max-tokens 128

Each client sends streaming /v1/chat/completions requests back to back until M requests have
been sent in total (or --time-limit passes). Reported: request throughput, aggregate generated
tokens per second (and its ratio to the single-client figure when --baseline-tok-s is given),
time to first token and inter-token latency percentiles, errors by kind.

Loopback only: this tool refuses any other host, so it cannot be pointed at someone's server.
Output lengths are fixed (ignore_eos, greedy) so runs are comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float | None = None  # seconds from sending to the first generated text
    gaps: list[float] = field(default_factory=list)  # seconds between text chunks
    tokens: int = 0
    seconds: float = 0.0


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict[int, float]:
    if not xs:
        return {p: float("nan") for p in ps}
    s = sorted(xs)
    return {p: s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] for p in ps}


async def one_request(client, url: str, body: dict, headers: dict) -> Result:
    r = Result()
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                r.error = f"HTTP {resp.status_code}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = "stream error"
                    return r
                if chunk.get("usage"):
                    r.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("reasoning_content"):
                        now = time.perf_counter()
                        if last is None:
                            r.ttft = now - t0
                        else:
                            r.gaps.append(now - last)
                        last = now
        r.ok = True
    except Exception as e:  # a load test counts failures instead of stopping at the first
        r.error = type(e).__name__
    finally:
        r.seconds = time.perf_counter() - t0
    return r


async def run(args) -> dict:
    import httpx

    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        model = args.model
        if model is None:
            models = (await client.get(base + "/v1/models", headers=headers)).json()
            model = models["data"][0]["id"]
        prompt = ("Count the benchmark items one by one. " * 64)[: args.prompt_chars]
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True, "thinking": False}
        url = base + "/v1/chat/completions"
        results: list[Result] = []
        sent = 0
        deadline = time.perf_counter() + args.time_limit

        async def worker():
            nonlocal sent
            while sent < args.requests and time.perf_counter() < deadline:
                sent += 1
                results.append(await one_request(client, url, body, headers))

        # One request first so the server has compiled/warmed everything before timing starts.
        await one_request(client, url, dict(body, max_tokens=2), headers)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttft = percentiles([r.ttft for r in ok if r.ttft is not None])
    itl = percentiles([g for r in ok for g in r.gaps])
    return {"clients": args.clients, "requests": len(results), "ok": len(ok), "wall_s": wall,
            "req_per_s": len(ok) / wall if wall else 0.0, "tokens": tokens,
            "tok_per_s": tokens / wall if wall else 0.0,
            "ttft_ms": {p: v * 1000 for p, v in ttft.items()}, "itl_ms": {p: v * 1000 for p, v in itl.items()},
            "errors": dict(Counter(r.error for r in results if not r.ok))}


def report(res: dict, baseline: float | None) -> None:
    print(f"clients {res['clients']:4d}  requests {res['ok']}/{res['requests']} ok in {res['wall_s']:.2f} s  "
          f"{res['req_per_s']:.2f} req/s  {res['tok_per_s']:.1f} tok/s aggregate"
          + (f" ({res['tok_per_s'] / baseline:.2f}x one client)" if baseline else ""))
    t, i = res["ttft_ms"], res["itl_ms"]
    print(f"  time to first token ms  p50 {t[50]:.1f}  p90 {t[90]:.1f}  p99 {t[99]:.1f}")
    print(f"  inter-token latency ms  p50 {i[50]:.1f}  p90 {i[90]:.1f}  p99 {i[99]:.1f}")
    if res["errors"]:
        print(f"  errors: {res['errors']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--clients", type=int, default=1, help="concurrent clients (default 1)")
    p.add_argument("--requests", type=int, default=16, help="requests in total (default 16)")
    p.add_argument("--sweep", default=None, metavar="N,N,...",
                   help="run once per client count (e.g. 1,8,32,100), each with max(--requests, 2N) "
                        "requests; the first count is the baseline for the speed-up")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--prompt-chars", type=int, default=200, help="prompt length in characters (default 200)")
    p.add_argument("--model", default=None, help="model id (default: the first in /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--time-limit", type=float, default=300.0, help="stop sending after this many seconds (per run)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--baseline-tok-s", type=float, default=None,
                   help="single-client tok/s, to report the aggregate speed-up against")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    host = urlparse(args.url).hostname
    if host not in LOOPBACK:
        print(f"serve_load: refusing {args.url}: only loopback servers ({', '.join(sorted(LOOPBACK))})",
              file=sys.stderr)
        return 2
    try:
        counts = [int(c) for c in args.sweep.split(",")] if args.sweep else [args.clients]
    except ValueError:
        print(f"serve_load: --sweep must be comma-separated integers, got {args.sweep!r}", file=sys.stderr)
        return 2
    for name, value in (("clients", min(counts)), ("requests", args.requests), ("max-tokens", args.max_tokens)):
        if value < 1:
            print(f"serve_load: --{name} must be >= 1", file=sys.stderr)
            return 2
    results, baseline = [], args.baseline_tok_s
    for n in counts:
        run_args = argparse.Namespace(**vars(args))
        run_args.clients = n
        run_args.requests = max(args.requests, 2 * n) if args.sweep else args.requests
        res = asyncio.run(run(run_args))
        results.append(res)
        if args.json:
            continue
        report(res, baseline)
        if args.sweep and baseline is None:
            baseline = res["tok_per_s"]
    if args.json:
        print(json.dumps(results if args.sweep else results[0]))
    return 0 if not any(r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
