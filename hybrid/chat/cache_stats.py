"""GPU expert-cache hit rate for the frontends (/stats in chat, /metrics in serve).

A hit is a routed (token, expert) pick whose expert the layer holds on the device (its
GpuExpertCache.held_mask()); the rate is hits / picks over every MoE layer since the counter
was attached. It registers a routing observer on each MoE layer (MoELayer.add_observer), beside
any other (a planner trace recorded in the same process keeps working).

Legend: T tokens, K experts picked per token, E experts.
"""

from __future__ import annotations

import threading


class CacheHitCounter:
    def __init__(self):
        self._lock = threading.Lock()  # the engine thread counts, a frontend thread reads
        self.hits = 0
        self.picks = 0

    def rate(self) -> float | None:
        with self._lock:
            return self.hits / self.picks if self.picks else None

    def _hook(self, moe):
        def on_routing(layer: int, ids) -> None:  # ids [T, K] int32, host
            cache = moe.device_experts()
            if cache is None:
                return
            picked = ids.reshape(-1).long()  # [T*K]
            hits = int(cache.held_mask()[picked].sum())  # [E] bool, host
            with self._lock:
                self.hits += hits
                self.picks += picked.numel()
        return on_routing


def attach_hit_counter(model) -> CacheHitCounter | None:
    """Count cache hits on a loaded Model; None when it holds no experts on the device."""
    moe = [m for m in model.moe_layers().values() if m.device_experts() is not None]
    if not moe:
        return None
    counter = CacheHitCounter()
    for m in moe:
        m.add_observer(on_routing=counter._hook(m))
    return counter


def hit_rate(model, counter: CacheHitCounter | None) -> float | None:
    """The counter's rate (None: no cache, or no picks yet)."""
    return counter.rate() if counter is not None else None
