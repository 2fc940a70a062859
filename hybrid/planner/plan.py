"""Placement: which experts to hold in VRAM, under a budget, to minimise predicted time.

Budget. VRAM minus what hybrid.load itself counts before loading (hybrid/planner/device_memory.py
device_bytes, the one accounting both use): the non-expert device weights (attention, shared
experts, dense MLP, routers, norms, LM head in `device_weight_format`), the latent KV cache for
the requested context, activations for one prefill chunk with the allocator/CUDA-context
reserve, and a multimodal checkpoint's vision tower (ModelSpec.vision_params). What is left,
divided by the exact bytes of one expert in the GPU cache's format (by
default the experts' storage format, which gpu_cache.py keeps: INT4 group-32 for K2.5, 3 x H x I
x (1/2 + 2/32) bytes = 24.8 MB; hybrid.load counts the same), is the number of expert slots.

Optimisation. With the costs of cost.py, layer l with cached set S takes
    T_l(S) = serial_l + sync + max(cpu_fix_l + sum_{e not in S} c_le, gpu_fix_l + sum_{e in S} g_le)
and the step time is the sum over layers. Every expert costs the same bytes, so the budget is a
number of slots N.
  1. In a layer, order experts by c_le, descending (c and g both grow with pick frequency, so
     this is also frequency order). Caching the prefix of length m gives
     h_l(m) = max(CPU part falling by c_(m), GPU part rising by g_(m)); the CPU part is convex
     decreasing and the GPU part increasing, so they cross once.
     F_l(n) = min_{m <= n} h_l(m) is the best prefix that uses at most n slots.
  2. The gains d_l(n) = F_l(n-1) - F_l(n) are non-increasing in n: before the crossing they
     are c_(n), which falls; at the crossing the gain is at most c_(n); after it, 0. So F_l is
     convex, and for a sum of convex functions under a shared count the N largest gains over all
     layers (taken as prefixes) are an exact optimum (the classic unit-weight resource
     allocation argument): the planner is exactly optimal among per-layer prefix placements.
  3. Against ALL subsets: while a layer's CPU part stays the larger (the usual case: the CPU
     experts dominate), the best set of size m is the m largest c, a prefix, so the plan is the
     global optimum. When caching pushes a layer's GPU part above its CPU part, a non-prefix set
     could land nearer the crossing; the loss is bounded by one expert's cost in that layer.
     tests/test_planner_plan.py checks both statements against brute force on small cases.

A measured per-layer fixed cost of holding any cached expert (MachineSpec.gpu_cache_layer_us,
from calibrate.py) adds to h_l(m) for m >= 1; the prefix argument is unchanged, the convexity
of F_l at m = 1 is not, so with that cost the plan is exact per layer and greedy across
layers. Without a GPU (parts add up) a layer is kept only if its savings beat that cost.

Baselines, side by side: "none" (all experts on the CPU), "uniform" (N / L slots per layer, the
most picked experts of each layer), "top-N" (the N most picked (layer, expert) pairs of the
whole model, what KTransformers does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hybrid.planner.cost import CostModel, LayerCosts
from hybrid.planner.units import fmt_bytes

# Headroom beyond the loader's accounting (its activation figure already holds a 512 MB
# CUDA-context and allocator reserve); a caller may ask for more.
EXTRA_RESERVE_BYTES = 0


class PlanError(ValueError):
    """A plan that cannot be made (budget too small, bad input); the message has the numbers."""


@dataclass
class Budget:
    vram_bytes: int
    device_weights_bytes: int
    device_weight_format: str
    kv_cache_bytes: int
    context_tokens: int
    activation_bytes: int
    reserve_bytes: int
    gpu_expert_format: str
    bytes_per_expert: int
    slots: int                      # experts that fit
    max_slots: int                  # L x E (every expert cached)
    layerwise_bytes: int = 0        # layerwise prefill's two layer buffers (0: off)
    layerwise_note: str = ""        # why it is off when it was asked for
    vision_bytes: int = 0           # the vision tower and projector (0: text only)

    @property
    def experts_bytes(self) -> int:
        return self.vram_bytes - self.device_weights_bytes - self.kv_cache_bytes \
            - self.activation_bytes - self.reserve_bytes - self.layerwise_bytes - self.vision_bytes

    def to_dict(self) -> dict:
        return {
            "vram_bytes": self.vram_bytes, "vram": fmt_bytes(self.vram_bytes),
            "device_weights": {"bytes": self.device_weights_bytes,
                               "format": self.device_weight_format,
                               "human": fmt_bytes(self.device_weights_bytes)},
            "kv_cache": {"bytes": self.kv_cache_bytes, "context_tokens": self.context_tokens,
                         "human": fmt_bytes(self.kv_cache_bytes)},
            "activations": {"bytes": self.activation_bytes,
                            "human": fmt_bytes(self.activation_bytes)},
            "cuda_reserve": {"bytes": self.reserve_bytes, "human": fmt_bytes(self.reserve_bytes)},
            "vision_tower": {"bytes": self.vision_bytes, "human": fmt_bytes(self.vision_bytes)},
            "layerwise_prefill": {"bytes": self.layerwise_bytes,
                                  "human": fmt_bytes(self.layerwise_bytes),
                                  **({"note": self.layerwise_note} if self.layerwise_note else {})},
            "experts": {"bytes_available": max(0, self.experts_bytes),
                        "human": fmt_bytes(max(0, self.experts_bytes)),
                        "format": self.gpu_expert_format,
                        "bytes_per_expert": self.bytes_per_expert,
                        "slots": self.slots,
                        "bytes_used": self.slots * self.bytes_per_expert},
        }

    def lines(self) -> list:
        return [
            f"VRAM budget            {fmt_bytes(self.vram_bytes):>12}",
            f"- device weights       {fmt_bytes(self.device_weights_bytes):>12}  "
            f"({self.device_weight_format}: attention, shared experts, dense MLP, routers, norms, "
            f"LM head)",
            f"- KV cache             {fmt_bytes(self.kv_cache_bytes):>12}  "
            f"({self.context_tokens} tokens of latent KV)",
            f"- activations          {fmt_bytes(self.activation_bytes):>12}  (one prefill chunk, "
            f"CUDA context and allocator reserve)",
            f"- extra reserve        {fmt_bytes(self.reserve_bytes):>12}",
            f"- vision tower         {fmt_bytes(self.vision_bytes):>12}  "
            + ("(image input; plan with --no-images to leave it out)" if self.vision_bytes else "(none)"),
            f"- layerwise prefill    {fmt_bytes(self.layerwise_bytes):>12}  "
            + ("(two layer buffers)" if self.layerwise_bytes else f"(off{': ' + self.layerwise_note if self.layerwise_note else ''})"),
            f"= for experts          {fmt_bytes(max(0, self.experts_bytes)):>12}  -> "
            f"{self.slots} experts x {fmt_bytes(self.bytes_per_expert)} ({self.gpu_expert_format})",
        ]


def device_needs(cost: CostModel, context_tokens: int) -> tuple[int, int, int, int]:
    """(device weights, KV cache, activations incl. reserve, vision tower) bytes for one sequence
    of `context_tokens`, from the loader's accounting: exactly what hybrid.load checks."""
    from hybrid.planner.device_memory import device_bytes

    m = cost.model
    fmt = cost.device_weight_format
    if fmt not in ("bf16", "fp32", "int8", "fp8", "blocks"):
        raise PlanError(f"device weight format {fmt!r}: expected bf16, fp32, int8, fp8 or blocks")
    if m.facts is None:
        raise PlanError(f"cannot count device memory for model {m.model_id!r}: its spec carries no "
                        f"architecture facts (make it with hybrid.models.spec)")
    itemsize, formats = _device_dtype(cost)
    b = device_bytes(m.facts, itemsize, formats, max_len=context_tokens, num_slots=1,
                     vision_params=m.vision_params)
    return b.weights, b.kv_cache, b.activations, b.vision


def _device_dtype(cost: CostModel) -> tuple[int, dict[str, str]]:
    """(itemsize of the compute dtype, {group: int8|fp8}) of cost.device_weight_format."""
    fmt = cost.device_weight_format
    formats = {g: fmt for g in cost.model.facts.group_matrices} if fmt in ("int8", "fp8") else {}
    return (4 if fmt == "fp32" else 2), formats


def budget_for_slots(cost: CostModel, context_tokens: int, slots: int,
                     reserve_bytes: int = EXTRA_RESERVE_BYTES) -> Budget:
    """The budget that holds exactly `slots` experts: VRAM = what that placement needs."""
    m = cost.model
    need = sum(device_needs(cost, context_tokens)) + reserve_bytes + slots * cost.gpu_expert_bytes
    if cost.layerwise_prefill:
        need += layerwise_need(cost, context_tokens)[0]
    c = CostModel(m, _with_vram(cost.machine, need), cost.gpu_expert_format,
                  cost.device_weight_format, cost.kv_tokens, cost.prefill_chunk,
                  cost.layerwise_prefill)
    return compute_budget(c, context_tokens, reserve_bytes)


def _with_vram(machine, vram: int):
    import dataclasses

    return dataclasses.replace(machine, vram_bytes=int(vram))


def compute_budget(cost: CostModel, context_tokens: int,
                   reserve_bytes: int = EXTRA_RESERVE_BYTES) -> Budget:
    m = cost.model
    vram = cost.machine.vram_bytes
    dev, kv, act, vision = device_needs(cost, context_tokens)
    per = cost.gpu_expert_bytes
    left = vram - dev - kv - act - vision - reserve_bytes
    lw, note = layerwise_budget(cost, left, context_tokens)
    left -= lw
    max_slots = len(m.moe_layers) * m.num_experts
    b = Budget(vram_bytes=vram, device_weights_bytes=dev,
               device_weight_format=cost.device_weight_format, kv_cache_bytes=kv,
               context_tokens=context_tokens, activation_bytes=act, reserve_bytes=reserve_bytes,
               gpu_expert_format=cost.gpu_expert_format, bytes_per_expert=per,
               slots=max(0, min(max_slots, left // per)), max_slots=max_slots,
               layerwise_bytes=lw, layerwise_note=note, vision_bytes=vision)
    if left < 0:
        raise PlanError("the model does not fit this GPU before any expert is cached:\n  "
                        + "\n  ".join(b.lines())
                        + f"\n  short by {fmt_bytes(-left)}; try --device-weights int8, a "
                          f"shorter --context, or more VRAM")
    return b


def layerwise_need(cost: CostModel, context_tokens: int) -> tuple[int, int | None]:
    """(bytes, threshold): the VRAM layerwise prefill takes, and the fewest tokens a chunk
    streams (None: no chunk within the context pays, and it takes nothing). The bytes are its
    two layer buffers and the activations of a threshold-sized chunk beyond the PREFILL_CHUNK's
    the budget already counts (hybrid/runtime/layerwise.py bounds the chunk by the same rule):
    K2.5's threshold is thousands of tokens, so gigabytes."""
    from hybrid.planner.device_memory import activation_bytes, layerwise_bytes

    m = cost.model
    L, E, K = len(m.moe_layers), m.num_experts, m.top_k
    t = cost.layerwise_threshold(np.full((L, E), K / E), np.zeros((L, E), dtype=bool), context_tokens)
    if t is None:
        return 0, None
    itemsize, formats = _device_dtype(cost)
    counted = device_needs(cost, context_tokens)[2]   # the activations the budget holds already
    extra = max(0, activation_bytes(m.facts, t, itemsize, formats) - counted)
    return layerwise_bytes(m.num_experts, cost.gpu_expert_bytes, cost.cpu_expert_bytes) + extra, t


def layerwise_budget(cost: CostModel, left: int, context_tokens: int) -> tuple[int, str]:
    """(bytes, note): the VRAM layerwise prefill takes out of `left` (what remains after
    weights, KV cache and activations; layerwise_need), or 0 and why not when cost.layerwise_prefill
    is off, the experts' format cannot stream (GGUF blocks), no chunk within the context pays,
    or the buffers and a chunk's activations do not fit."""
    if not cost.layerwise_prefill:
        return 0, ""
    m = cost.model
    if m.expert_format not in ("int4_g32", "int8_g32", "bf16"):
        return 0, f"experts in {m.expert_format} stay on the CPU path in prefill"
    need, t = layerwise_need(cost, context_tokens)
    if t is None:
        return 0, f"no chunk up to the {context_tokens}-token context is faster streamed than on the CPU path"
    if need > left:
        return 0, (f"its two layer buffers and a {t}-token chunk's activations need {fmt_bytes(need)}, "
                   f"{fmt_bytes(max(0, left))} is left after weights, KV cache and activations")
    return need, ""


def without_layerwise(cost: CostModel, budget: Budget) -> CostModel:
    """The cost model that predicts what runs under `budget`: layerwise prefill off when the
    budget could not hold it."""
    import dataclasses

    if cost.layerwise_prefill and not budget.layerwise_bytes:
        return dataclasses.replace(cost, layerwise_prefill=False)
    return cost


# ---- strategies: each returns a mask [L, E] bool of cached experts --------------------------

def place_none(counts: np.ndarray, slots: int) -> np.ndarray:
    return np.zeros(counts.shape, dtype=bool)


def place_uniform(counts: np.ndarray, slots: int) -> np.ndarray:
    """slots // L per layer (the first slots % L layers get one more), most picked first."""
    L, E = counts.shape
    mask = np.zeros((L, E), dtype=bool)
    per = np.full(L, slots // L)
    per[: slots % L] += 1
    per = np.minimum(per, E)
    for l in range(L):
        order = np.argsort(-counts[l].astype(np.float64), kind="stable")
        mask[l, order[: per[l]]] = True
    return mask


def place_topn(counts: np.ndarray, slots: int) -> np.ndarray:
    """The `slots` most picked (layer, expert) pairs of the whole model."""
    flat = counts.reshape(-1).astype(np.float64)
    n = min(slots, flat.size)
    order = np.argsort(-flat, kind="stable")[:n]
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    return mask.reshape(counts.shape)


def place_optimal(costs: LayerCosts, slots: int) -> np.ndarray:
    """Exact optimum over per-layer prefix placements (module docstring, points 1-2)."""
    L, E = costs.cpu.shape
    if not costs.overlap:
        # No overlap (no GPU: both parts take turns on the CPU): time is linear in the set,
        # caching e saves cpu - gpu, so the largest positive savings are exactly optimal.
        save = (costs.cpu - costs.gpu).reshape(-1)
        order = np.argsort(-save, kind="stable")[: min(slots, save.size)]
        mask = np.zeros(save.size, dtype=bool)
        mask[order[save[order] > 0]] = True
        mask = mask.reshape(L, E)
        if costs.cache_fix is not None:
            # A layer pays its cache's fixed cost once: drop the layers whose picks save less.
            keep = np.where(mask, costs.cpu - costs.gpu, 0.0).sum(axis=1) > costs.cache_fix
            mask &= keep[:, None]
        return mask
    orders = np.argsort(-costs.cpu, axis=1, kind="stable")            # [L, E]
    c = np.take_along_axis(costs.cpu, orders, axis=1)
    g = np.take_along_axis(costs.gpu, orders, axis=1)
    cpu_m = costs.cpu_fix[:, None] + c.sum(axis=1, keepdims=True) \
        - np.concatenate([np.zeros((L, 1)), np.cumsum(c, axis=1)], axis=1)   # [L, E+1]
    gpu_m = costs.gpu_fix[:, None] \
        + np.concatenate([np.zeros((L, 1)), np.cumsum(g, axis=1)], axis=1)
    if costs.cache_fix is not None:
        gpu_m[:, 1:] += costs.cache_fix[:, None]
    h = np.maximum(cpu_m, gpu_m)                                      # h_l(m), m = 0..E
    F = np.minimum.accumulate(h, axis=1)                              # F_l(n)
    gains = F[:, :-1] - F[:, 1:]                                      # d_l(n), n = 1..E
    # Non-increasing in exact arithmetic (docstring); a running minimum removes rounding noise so
    # that the N largest gains are always prefixes.
    gains = np.minimum.accumulate(gains, axis=1)
    flat = gains.reshape(-1)
    take = np.zeros(flat.size, dtype=bool)
    positive = np.nonzero(flat > 0)[0]
    n = min(slots, positive.size)
    if n:
        # Largest gains first; ties broken by position so each layer's picks stay a prefix.
        order = positive[np.lexsort((positive % E, -flat[positive]))][:n]
        take[order] = True
    per_layer = take.reshape(L, E).sum(axis=1)                        # n_l
    mask = np.zeros((L, E), dtype=bool)
    for l in range(L):
        nl = int(per_layer[l])
        m = int(np.argmin(h[l, : nl + 1]))   # the prefix achieving F_l(n_l)
        mask[l, orders[l, :m]] = True
    return mask


STRATEGIES = {"none": place_none, "uniform": place_uniform, "top-N": place_topn}


@dataclass
class PlanResult:
    budget: Budget
    masks: dict                     # strategy -> [L, E] bool
    predictions: dict               # strategy -> {decode_tok_s, prefill_tok_s, hit_rate, ...}
    notes: dict = field(default_factory=dict)


def predict(cost: CostModel, freq: np.ndarray, mask: np.ndarray, batch: int = 1) -> dict:
    pre = cost.prefill(freq, mask)
    return {"decode_tok_s": cost.decode_tok_s(freq, mask, batch),
            "prefill_tok_s": pre["tok_s"],
            "hit_rate": cost.hit_rate(freq, mask),
            "cached_experts": int(mask.sum()),
            "prefill_mode": pre["mode"]}


def make_plan(cost: CostModel, trace, context_tokens: int, batch: int = 1) -> PlanResult:
    """Budget, the three baselines and the optimised plan, with predictions for each."""
    m = cost.model
    if trace.config_hash != m.config_hash:
        raise PlanError(f"trace is for model {trace.model_id!r} ({trace.config_hash}), the plan "
                        f"is for {m.model_id!r} ({m.config_hash})")
    if list(trace.layers) != list(m.moe_layers):
        raise PlanError(f"trace covers layers {trace.layers[:3]}..., the model's MoE layers are "
                        f"{list(m.moe_layers)[:3]}...; slice or re-record the trace")
    budget = compute_budget(cost, context_tokens)
    cost = without_layerwise(cost, budget)
    freq = trace.frequencies()
    costs = cost.costs(freq, batch)
    masks = {name: fn(trace.counts, budget.slots) for name, fn in STRATEGIES.items()}
    masks["plan"] = place_optimal(costs, budget.slots)
    for name, mk in masks.items():
        if mk.sum() > budget.slots:  # a hard invariant, not a tuning choice
            raise AssertionError(f"strategy {name} used {int(mk.sum())} > {budget.slots} slots")
    preds = {name: predict(cost, freq, mk, batch) for name, mk in masks.items()}
    return PlanResult(budget=budget, masks=masks, predictions=preds)
