"""Replay a routing sequence against a placement, static or online, and predict decode speed.

Where cost.py predicts from expected values (max of the expected CPU and GPU parts), the
replay takes, token by token and layer by layer, the picks that really missed and hit the cache
and charges max(CPU part, GPU part) for that token (their sum on a machine without a GPU,
where the two take turns): the mean of a max, which is what a run would see at batch 1. Costs per pick come from cost.py's LayerCosts for batch 1.

Online re-placement (off unless asked): every `interval` tokens each layer compares the
exponentially decayed pick rates of its cached and uncached experts and swaps the most
picked uncached expert for the least picked cached one, at most `max_swaps` per layer per
check, and only when the expected saving over the next `horizon` tokens,
    (rate_in - rate_out) x (cpu_pick - gpu_pick) x horizon,
exceeds the cost of the copy (the expert's packed bytes over PCIe, charged in full to the
timeline: conservative, since the runtime copies on a side stream). The number of cached
experts per layer never changes, so the VRAM budget holds.

The per-layer decision is one numba function, check_layer, which the runtime's OnlinePlacer
(online.py) calls too: a replay predicts exactly what the runtime does.
The loops are numba-compiled: a million tokens x 60 layers x 8 picks replays in seconds.
Legend: N tokens, L MoE layers, E experts, K picks per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_KERNELS = {}


def _kernels():
    if not _KERNELS:
        import numba

        @numba.njit(cache=False)
        def layer_time(l, h, k, cpu_pick, gpu_pick, cpu_fix, gpu_fix, serial, overlap):
            # One token's time in layer l with h of its k picks cached: the serial part, then
            # the CPU part (misses) and the GPU part (hits), overlapped (max) or in turn (sum).
            c = cpu_fix[l] + (k - h) * cpu_pick[l]
            g = gpu_fix[l] + h * gpu_pick[l]
            if overlap:
                return serial[l] + (c if c > g else g)
            return serial[l] + c + g

        @numba.njit(cache=False)
        def replay_static(seq, mask, cpu_pick, gpu_pick, cpu_fix, gpu_fix, serial, overlap):
            # seq [N, L, K] int16, mask [L, E] bool; per-pick costs [L]; returns hits [L], time
            n, L, k = seq.shape
            hits = np.zeros(L, dtype=np.int64)
            total = 0.0
            for t in range(n):
                for l in range(L):
                    h = 0
                    for j in range(k):
                        if mask[l, seq[t, l, j]]:
                            h += 1
                    hits[l] += h
                    total += layer_time(l, h, k, cpu_pick, gpu_pick, cpu_fix, gpu_fix, serial, overlap)
            return hits, total

        @numba.njit(cache=False)
        def check_layer(ema, window, mask, tokens, decay, saving, horizon, swap_cost,
                        max_swaps, pairs):
            # One layer's periodic check (the online policy's whole decision rule, shared by
            # the replay and OnlinePlacer): fold the window's pick counts over `tokens` tokens
            # into the decayed rates, then swap the most picked uncached expert for the least
            # picked cached one while that pays. ema/window [E] f64, mask [E] bool (updated),
            # pairs [max_swaps, 2] int64 receives (out, in); returns the number of swaps.
            E = ema.shape[0]
            for e in range(E):
                ema[e] = decay * ema[e] + (1.0 - decay) * window[e] / tokens
                window[e] = 0.0
            if saving <= 0.0:
                return 0
            done = 0
            for s in range(max_swaps):
                best_in, best_in_r = -1, -1.0
                worst_out, worst_out_r = -1, 1e300
                for e in range(E):
                    if mask[e]:
                        if ema[e] < worst_out_r:
                            worst_out, worst_out_r = e, ema[e]
                    elif ema[e] > best_in_r:
                        best_in, best_in_r = e, ema[e]
                if best_in < 0 or worst_out < 0:
                    break
                if (best_in_r - worst_out_r) * saving * horizon <= swap_cost:
                    break
                mask[best_in] = True
                mask[worst_out] = False
                pairs[done, 0] = worst_out
                pairs[done, 1] = best_in
                done += 1
            return done

        @numba.njit(cache=False)
        def replay_online(seq, mask0, cpu_pick, gpu_pick, cpu_fix, gpu_fix, serial,
                          rate0, interval, decay, max_swaps, horizon, swap_cost, overlap):
            n, L, k = seq.shape
            E = mask0.shape[1]
            mask = mask0.copy()
            pairs = np.zeros((max(1, max_swaps), 2), dtype=np.int64)
            hits = np.zeros(L, dtype=np.int64)
            ema = rate0.copy()            # [L, E] decayed picks per token
            window = np.zeros((L, E), dtype=np.float64)
            swaps = 0
            total = 0.0
            for t in range(n):
                for l in range(L):
                    h = 0
                    for j in range(k):
                        e = seq[t, l, j]
                        window[l, e] += 1.0
                        if mask[l, e]:
                            h += 1
                    hits[l] += h
                    total += layer_time(l, h, k, cpu_pick, gpu_pick, cpu_fix, gpu_fix, serial, overlap)
                if (t + 1) % interval == 0:
                    for l in range(L):
                        n_sw = check_layer(ema[l], window[l], mask[l], float(interval), decay,
                                           cpu_pick[l] - gpu_pick[l], horizon, swap_cost,
                                           max_swaps, pairs)
                        swaps += n_sw
                        total += n_sw * swap_cost
            return hits, total, swaps, mask

        _KERNELS["static"] = replay_static
        _KERNELS["online"] = replay_online
        _KERNELS["check_layer"] = check_layer
    return _KERNELS


@dataclass
class OnlinePolicy:
    interval: int = 32        # tokens between checks
    window: float = 512.0     # e-folding time of the pick-rate estimate, tokens
    max_swaps: int = 2        # per layer per check
    horizon: float = 512.0    # tokens over which a swap must pay for itself

    def __post_init__(self):
        if self.interval < 1 or self.window <= 0 or self.max_swaps < 0 or self.horizon <= 0:
            raise ValueError(f"online policy: interval >= 1, window > 0, max_swaps >= 0, "
                             f"horizon > 0 required, got {self}")


@dataclass
class SimResult:
    tokens: int
    hits_per_layer: np.ndarray     # [L]
    hit_rate: float
    decode_tok_s: float
    seconds: float                 # predicted decode time of the whole sequence
    swaps: int = 0
    final_mask: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "hit_rate": self.hit_rate,
                "decode_tok_s": self.decode_tok_s, "swaps": self.swaps}


def swap_cost_s(cost_model) -> float:
    """Seconds charged per swap: the expert's packed bytes over PCIe (dequantised on arrival)."""
    return cost_model.cpu_expert_bytes / (cost_model.machine.pcie_gbps * 1e9)


def _pick_costs(cost_model):
    """Batch-1 cost per pick (one token reads the whole expert)."""
    mc = cost_model.machine
    cpu = cost_model.cpu_expert_bytes / (mc.cpu_effective_gbps * 1e9)
    gpu = cost_model.gpu_expert_bytes / (mc.gpu_mem_gbps * 1e9) + mc.gpu_expert_overhead_us * 1e-6
    return cpu, gpu


def _inputs(trace, cost_model, mask):
    if trace.seq is None:
        raise ValueError("simulate: the trace has no token sequence (counts only); record or "
                         "generate it with the sequence kept")
    L = trace.num_layers
    lc = cost_model.costs(trace.frequencies(), batch=1)
    cpu, gpu = _pick_costs(cost_model)
    # A layer's cache costs its fixed part whenever it holds experts; the online policy keeps
    # each layer's count, so which layers hold any never changes during a replay.
    gpu_fix = lc.gpu_fix + np.where(mask.any(axis=1), lc.cache_fix, 0.0)
    return (np.asarray(trace.seq), np.full(L, cpu), np.full(L, gpu),
            lc.cpu_fix.astype(np.float64), gpu_fix.astype(np.float64),
            (lc.serial + lc.sync).astype(np.float64), lc.other, bool(lc.overlap))


def replay(trace, mask: np.ndarray, cost_model) -> SimResult:
    """Static placement: hit counts per layer and predicted decode tok/s at batch 1."""
    if mask.shape != (trace.num_layers, trace.num_experts):
        raise ValueError(f"mask shape {mask.shape} does not match the trace "
                         f"[{trace.num_layers}, {trace.num_experts}]")
    seq, cpu, gpu, cfix, gfix, serial, other, overlap = _inputs(trace, cost_model, mask)
    hits, total = _kernels()["static"](seq, mask.astype(np.bool_), cpu, gpu, cfix, gfix, serial,
                                       overlap)
    n = seq.shape[0]
    secs = total + other * n
    return SimResult(tokens=n, hits_per_layer=hits,
                     hit_rate=float(hits.sum() / max(1, n * trace.num_layers * trace.top_k)),
                     decode_tok_s=n / secs if secs > 0 else 0.0, seconds=secs)


def replay_online(trace, mask: np.ndarray, cost_model, policy: OnlinePolicy | None = None,
                  prior: np.ndarray | None = None) -> SimResult:
    """Online policy starting from `mask`; `prior` [L, E] initial pick rates (default: the
    rates implied by the initial mask's plan, i.e. the trace's frequencies are NOT peeked at:
    cached experts start at 1 / E above the uncached ones)."""
    policy = policy or OnlinePolicy()
    seq, cpu, gpu, cfix, gfix, serial, other, overlap = _inputs(trace, cost_model, mask)
    L, E = trace.num_layers, trace.num_experts
    if prior is None:
        prior = np.where(mask, trace.top_k / E * 2.0, trace.top_k / E * 0.5)
    decay = float(np.exp(-policy.interval / policy.window))
    swap_cost = swap_cost_s(cost_model)
    hits, total, swaps, final = _kernels()["online"](
        seq, mask.astype(np.bool_).copy(), cpu, gpu, cfix, gfix, serial,
        prior.astype(np.float64), int(policy.interval), decay, int(policy.max_swaps),
        float(policy.horizon), float(swap_cost), overlap)
    n = seq.shape[0]
    secs = total + other * n
    return SimResult(tokens=n, hits_per_layer=hits,
                     hit_rate=float(hits.sum() / max(1, n * L * trace.top_k)),
                     decode_tok_s=n / secs if secs > 0 else 0.0, seconds=secs,
                     swaps=int(swaps), final_mask=final)
