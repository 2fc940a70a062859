"""Online re-placement for the runtime: the policy simulate.py replays, one step at a time.

Off by default (a profile's `online.enabled` is false). hybrid.load(..., profile=..., online=True
or a dict of OnlinePolicy fields) wires it into a model with LiveReplacement (below), which
follows this contract; for whoever drives decoding otherwise:

    placer = OnlinePlacer(cost_model, profile.mask(spec.moe_layers), spec.moe_layers)
    # in every forward, for every MoE layer, with the router's choice ids [T, K]:
    placer.observe(layer_idx, ids)
    # after the forward:
    for layer_idx, out_e, in_e in placer.end_step():
        caches[layer_idx].swap(out_e, in_e, packed_layers[layer_idx].compact_expert)

`observe` can sit beside a TraceRecorder on MoELayer.trace (call both from one function). The
decision rule (decayed pick rates; swap the most picked uncached expert for the least picked
cached one, at most `max_swaps` per layer per check, only when the saving over `horizon` tokens
beats the PCIe copy) is simulate.py's own numba function, so a replay predicts exactly what the
runtime will do; tests/test_planner_simulate.py checks that. The number of cached experts per
layer never changes, so the VRAM budget holds.

Legend: L MoE layers, E experts, T tokens in a step, K picks per token.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from hybrid.planner import simulate


class OnlinePlacer:
    def __init__(self, cost_model, mask: np.ndarray, layers, policy=None,
                 prior: np.ndarray | None = None):
        self.policy = policy or simulate.OnlinePolicy()
        self.layers = [int(x) for x in layers]
        L, E = len(self.layers), cost_model.model.num_experts
        if mask.shape != (L, E):
            raise ValueError(f"OnlinePlacer: mask shape {mask.shape}, expected [L={L}, E={E}]")
        self._pos = {li: i for i, li in enumerate(self.layers)}
        self.mask = mask.astype(np.bool_).copy()                        # [L, E]
        k = cost_model.model.top_k
        self.ema = (np.where(self.mask, k / E * 2.0, k / E * 0.5) if prior is None
                    else prior.astype(np.float64).copy())               # [L, E] picks/token
        self.window = np.zeros((L, E), dtype=np.float64)                # picks since last check
        cpu, gpu = simulate._pick_costs(cost_model)
        self.saving = cpu - gpu                     # seconds saved per pick moved to the GPU
        self.swap_cost = simulate.swap_cost_s(cost_model)
        self._pairs = np.zeros((max(1, self.policy.max_swaps), 2), dtype=np.int64)
        self._step_tokens = 0
        self._since = 0
        self.swaps = 0

    def observe(self, layer_idx: int, ids) -> None:
        i = self._pos.get(int(layer_idx))
        if i is None:
            raise ValueError(f"OnlinePlacer.observe: layer {layer_idx} is not a MoE layer here")
        if hasattr(ids, "detach"):
            ids = ids.detach().to("cpu").numpy()
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"OnlinePlacer.observe: ids must be [T, K], got {ids.shape}")
        self.window[i] += np.bincount(ids.reshape(-1).astype(np.int64),
                                      minlength=self.window.shape[1])
        self._step_tokens = max(self._step_tokens, ids.shape[0])

    def end_step(self) -> list:
        """Close one forward; at each check returns the swaps made as (layer, out, in)."""
        self._since += self._step_tokens
        self._step_tokens = 0
        if self._since < self.policy.interval:
            return []
        check = simulate._kernels()["check_layer"]
        decay = math.exp(-self._since / self.policy.window)
        out = []
        for i, layer in enumerate(self.layers):
            n = check(self.ema[i], self.window[i], self.mask[i], float(self._since), decay,
                      self.saving, float(self.policy.horizon), self.swap_cost,
                      int(self.policy.max_swaps), self._pairs)
            out.extend((layer, int(self._pairs[j, 0]), int(self._pairs[j, 1])) for j in range(n))
        self.swaps += len(out)
        self._since = 0
        return out


class LiveReplacement:
    """OnlinePlacer wired into a loaded model: the MoE layers' routing observer and the
    model's step-end callback (hybrid/api.py sets both up for load(..., online=...)).

    observe(layer, ids) runs inside a forward, before the layer submits its CPU work, so the
    hit count uses the placement that forward computes with; end_step() runs after the whole
    forward (never mid-forward: the CPU skip mask and the cache must agree for every layer of
    a step) and performs the placer's swaps with GpuExpertCache.swap, the new expert's weights
    read from the packed CPU layout in their own bits (PackedLayer.compact_expert). swap updates the skip
    mask with the slot, so no (token, expert) pair is computed twice or dropped.

    caches: decoder layer -> GpuExpertCache; sources: decoder layer -> compact_expert(e).
    """

    def __init__(self, placer: OnlinePlacer, caches: dict, sources: dict):
        import threading

        missing = sorted(set(caches) - set(sources))
        if missing:
            raise ValueError(f"LiveReplacement: no expert source for layers {missing}")
        self.placer, self.caches, self.sources = placer, caches, sources
        self._lock = threading.Lock()  # the engine thread counts, a frontend thread reads
        self.hits = 0
        self.picks = 0
        self.steps = 0
        self.swaps = 0
        # The latest swaps as (step, layer, out, in), in the order they were made; bounded so
        # a server running for weeks does not grow it without end.
        self.history = deque(maxlen=4096)

    def observe(self, layer_idx: int, ids) -> None:
        """ids [T, K] from the router of decoder layer `layer_idx` (any device)."""
        if hasattr(ids, "detach"):
            ids = ids.detach().to("cpu").numpy()
        ids = np.asarray(ids)
        self.placer.observe(layer_idx, ids)
        cache = self.caches.get(int(layer_idx))
        hits = 0
        if cache is not None:
            hits = int(cache.mask.numpy()[ids.reshape(-1)].sum())   # mask [E] bool, host
        with self._lock:
            self.hits += hits
            self.picks += ids.size

    def end_step(self) -> list:
        """Close one forward: returns the swaps made now as (layer, out, in)."""
        swaps = self.placer.end_step()
        for layer, out_e, in_e in swaps:
            cache = self.caches.get(layer)
            if cache is None:  # the placer's mask had experts here, so the cache must exist
                raise RuntimeError(f"online re-placement: swap {out_e} -> {in_e} for layer "
                                   f"{layer}, which holds no GPU expert cache")
            cache.swap(out_e, in_e, self.sources[layer])
        with self._lock:
            self.history.extend((self.steps, l, o, i) for l, o, i in swaps)
            self.swaps += len(swaps)
            self.steps += 1
        return swaps

    def stats(self) -> dict:
        """Counters for /stats and /metrics: swaps made, cache hits over routed picks."""
        with self._lock:
            return {"swaps": self.swaps, "steps": self.steps, "hits": self.hits,
                    "picks": self.picks,
                    "hit_rate": self.hits / self.picks if self.picks else None}
