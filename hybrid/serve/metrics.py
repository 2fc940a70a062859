"""Server counters and their Prometheus text exposition (GET /metrics).

Counters are plain integers updated from the event loop thread only, so no lock is needed; the
gauges for queue depth and running sequences are read from the backend when scraped.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass
class Metrics:
    started: float = field(default_factory=time.monotonic)
    requests: Counter = field(default_factory=Counter)  # (route, status) -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: int = 0  # requests whose client went away before the end
    # (time, tokens) of recent completions pieces, for a sliding-window tok/s.
    _recent: deque = field(default_factory=deque)
    window_s: float = 10.0

    def count_request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def add_tokens(self, n: int) -> None:
        now = time.monotonic()
        self.completion_tokens += n
        self._recent.append((now, n))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        self._trim(now)
        span = min(self.window_s, now - self.started)
        return sum(n for _, n in self._recent) / span if span > 0 else 0.0

    def render(self, gauges: dict[str, float]) -> str:
        """Prometheus text format 0.0.4. `gauges`: name -> value from the backend."""
        lines = [
            "# HELP hybrid_requests_total HTTP requests by route and status.",
            "# TYPE hybrid_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'hybrid_requests_total{{route="{route}",status="{status}"}} {n}')
        scalars = [
            ("hybrid_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens),
            ("hybrid_completion_tokens_total", "counter", "Tokens generated.", self.completion_tokens),
            ("hybrid_requests_cancelled_total", "counter", "Requests whose client disconnected.",
             self.cancelled),
            ("hybrid_generation_tokens_per_second", "gauge",
             f"Tokens generated per second over the last {self.window_s:g} s.", self.tokens_per_second()),
            ("hybrid_uptime_seconds", "gauge", "Seconds since the server started.",
             time.monotonic() - self.started),
        ]
        for name, value in gauges.items():  # a backend value named *_total only ever grows
            kind = "counter" if name.endswith("_total") else "gauge"
            scalars.append((f"hybrid_{name}", kind, _GAUGE_HELP.get(name, name), value))
        for name, kind, help_, value in scalars:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {_num(value)}"]
        return "\n".join(lines) + "\n"


_GAUGE_HELP = {
    "queue_depth": "Requests waiting for a free sequence slot.",
    "running": "Sequences being decoded now.",
    "max_running": "Sequence slots (the engine's batch).",
    "engine_tokens_per_second": "Tokens the engine generated per second over its recent window.",
    "cache_hit_rate": "Fraction of routed expert picks served from the GPU expert cache.",
    "expert_swaps_total": "Experts online re-placement swapped into the GPU expert cache.",
    "prefix_cache_hit_rate": "Fraction of prompt tokens served from the prefix cache.",
    "prefix_hit_tokens_total": "Prompt tokens whose KV was reused from the prefix cache.",
    "prefill_tokens_computed_total": "Prompt tokens the model computed (not reused).",
    "kv_bytes_per_token": "KV cache bytes one token takes (all layers).",
    "kv_blocks_total": "Blocks of the paged KV cache.",
    "kv_blocks_used": "KV blocks held by running sequences.",
    "kv_blocks_shared": "KV blocks held by more than one running sequence (a shared prefix).",
    "kv_blocks_cached": "KV blocks nobody holds, kept for prefix reuse (evicted oldest first).",
    "kv_blocks_free": "KV blocks holding nothing.",
    "kv_blocks_reserved": "KV blocks promised to running sequences, not yet filled.",
    "kv_block_size": "Tokens per KV block.",
}


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"
