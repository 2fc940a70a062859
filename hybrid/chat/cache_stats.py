"""GPU expert-cache hit rate for the frontends (/stats in chat, /metrics in serve).

A hit is a routed (token, expert) pick whose expert the layer holds on the device (its
GpuExpertCache.mask); the rate is hits / picks over every MoE layer since the counter was
attached. It uses the MoE layers' public routing hook (`trace`), chaining any hook already set,
so a planner trace recorded in the same process keeps working.

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

    def _hook(self, layer_module, previous):
        def trace(layer: int, ids) -> None:  # ids [T, K] on the device
            if previous is not None:
                previous(layer, ids)
            cache = layer_module.gpu_cache
            if cache is None:
                return
            picked = ids.reshape(-1).to("cpu", non_blocking=False)  # [T*K]
            hits = int(cache.mask[picked].sum())  # mask [E] bool, host
            with self._lock:
                self.hits += hits
                self.picks += picked.numel()
        return trace


def attach_hit_counter(model) -> CacheHitCounter | None:
    """Count cache hits on a loaded Model; None when it holds no experts on the device."""
    net = getattr(model, "net", None)
    moe = [layer.mlp for layer in getattr(net, "layers", [])
           if getattr(getattr(layer, "mlp", None), "gpu_cache", None) is not None]
    if not moe:
        return None
    counter = CacheHitCounter()
    for mlp in moe:
        mlp.trace = counter._hook(mlp, mlp.trace)
    return counter


def hit_rate(model, counter: CacheHitCounter | None) -> float | None:
    """The model's own figure if it reports one, else the counter's (None: no cache, or no picks yet)."""
    fn = getattr(model, "cache_hit_rate", None)
    if fn is not None:
        value = fn() if callable(fn) else fn
        return None if value is None else float(value)
    return counter.rate() if counter is not None else None
