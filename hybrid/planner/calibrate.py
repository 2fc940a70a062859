"""Calibrate the cost model on this machine: time the real runtime, fit the machine parameters.

The cost model (cost.py) is only as good as its MachineSpec. For the reference workstation the
numbers are assumptions; here they are measured, on a given model, with the runtime itself:

  micro-timings of the real parts, run between the decode steps below so that both see the
  same load from whatever else runs on the machine (summarised like the runs, `typical()`):
    engine   one MoE layer's CPU expert engine, submit + sync of one token with n = 0..K of
             its K picked experts running (the rest skipped by the mask, as the GPU cache
             does):                 t = sync + n x expert_bytes / cpu_kernel_gbps
    cache    a GpuExpertCache of K of the layer's experts (built as a profile builds it), one
             token with n = 1..K hits:  t = fix + n x per_hit
    matmul   torch F.linear of one token against a >= 64 MB weight in the device dtype:
             the "GPU" read rate gpu_mem_gbps (torch on the CPU when there is no GPU)
  decode runs (the model with each placement's GpuExpertCaches, the ones hybrid.load(path,
  profile=...) attaches; a fixed teacher-forced token sequence; wall time per step):
    "none"   nothing cached: whatever the parts above do not explain is per-layer host
             overhead (Python, torch dispatch, and any device work the cost model does not
             itemise: norms, activations, attention arithmetic): layer_overhead_us =
             residual / decoder layers
    "other"  some experts cached: with the host overhead known, what is left is the cache's
             work in place differing from its micro-timing (colder CPU caches, the engine's
             thread beside it): one factor k scales both its fixed part and its per-hit part
             (gpu_cache_layer_us = k x fix, per hit = k x per_hit)

  per_hit splits into the cached expert's bytes at gpu_mem_gbps plus a dispatch overhead
  (gpu_expert_overhead_us, never below 0).

`fit` is a pure function of those timings (tests check it recovers known parameters from
synthetic timings); `part_probes` and `time_placements` take them on a loaded model; `check`
runs the whole loop and predicts the placements the fit did not use (bench/cost_model_check.py
and `hybrid profile --calibrate` call it). The result is a MachineSpec, saved as YAML for
`hybrid plan --machine FILE` / `hybrid doctor --machine FILE`; its `sources` say what each
number came from and on which model.

Legend: K picks per token, E experts, H hidden, I expert width, L MoE layers.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from hybrid.planner.cost import CostModel, MachineSpec


PER_EXPERT_FLOOR_S = 1e-9   # engine seconds per expert below which the fit calls it zero
CACHE_PROBE_BYTES = 256 << 20   # experts the GPU-cache probe holds and rotates through
MAX_CACHE_SCALE = 1e3           # bound on the cache's in-place / micro-timed work factor


@dataclass
class PartTimings:
    """Micro-timings of one model's parts; seconds summarised over repetitions (typical())."""
    engine: dict          # n experts run -> seconds (submit + sync of one token)
    cache: dict           # n cache hits -> seconds (GpuExpertCache.forward of one token)
    matmul_gbps: float    # torch one-token matmul read rate on the device, GB/s
    engine_isa: str = ""
    stat: str = "median"  # how the repetitions were summarised (typical())


STATS = ("median", "q25", "paired")   # "paired": see check()


def typical(values, stat: str = "median") -> float:
    """The statistic every timing here is summarised by. "median"; or "q25", the lower
    quartile, for a machine shared with other work: there a step either runs undisturbed or is
    preempted, the distribution is two humps, and the median can land on either, while the
    lower quartile stays in the undisturbed one (and, unlike the minimum, does not chase one
    lucky sample)."""
    if stat == "median":
        return float(statistics.median(values))
    if stat == "q25":
        return float(np.percentile(np.asarray(values, dtype=np.float64), 25))
    raise ValueError(f"calibrate: statistic {stat!r}, expected one of {STATS}")


@dataclass
class RunTiming:
    """One decode run of one placement: wall seconds per decode step."""
    label: str
    mask: np.ndarray          # [L, E] bool, the cached experts
    step_s: list = field(default_factory=list)
    stat: str = "median"

    @property
    def typical_s(self) -> float:
        return typical(self.step_s, self.stat)


def _line(points: dict) -> tuple[float, float]:
    """Least-squares intercept and slope through {x: y}."""
    x = np.array(sorted(points), dtype=np.float64)
    y = np.array([points[k] for k in sorted(points)], dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"calibrate: need timings at two or more counts, got {sorted(points)}")
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def fit(cost: CostModel, parts: PartTimings, freq: np.ndarray, none: RunTiming,
        other: RunTiming, model_label: str = "",
        overlap: bool | None = None) -> tuple[MachineSpec, dict]:
    """The machine parameters that make `cost` (its model, kv_tokens, formats) reproduce these
    timings. `cost.machine` supplies what is not fitted (RAM size, names, PCIe, flags).
    freq [L, E]: the routing of the timed token sequence (Trace.frequencies()).
    overlap: whether the cache's device work runs beside the CPU engine (MachineSpec.
    device_overlaps_cpu; None: as cost.machine says).
    Returns the fitted MachineSpec and a report of the fit (every intermediate number)."""
    m = cost.model
    L = len(m.moe_layers)
    if none.mask.any():
        raise ValueError("calibrate.fit: the 'none' run must cache nothing")
    if not other.mask.any():
        raise ValueError("calibrate.fit: the 'other' run must cache some experts")
    sync_s, per_expert_s = _line(parts.engine)
    below_resolution = per_expert_s <= PER_EXPERT_FLOOR_S
    if below_resolution:
        # Experts so small the engine's time does not grow with their number (tiny models):
        # the whole cost is the fixed part.
        sync_s, per_expert_s = float(np.mean(list(parts.engine.values()))), PER_EXPERT_FLOOR_S
    hits = {n: t for n, t in parts.cache.items() if n >= 1}
    cache_fix_s, per_hit_s = _line(hits)
    gpu_bytes_s = cost.gpu_expert_bytes / (parts.matmul_gbps * 1e9)
    base = cost.machine
    mc = dataclasses.replace(
        base, name=f"this machine, calibrated on {model_label or m.model_id}",
        cpu_kernel_gbps=cost.cpu_expert_bytes / per_expert_s / 1e9,
        sync_us=max(0.0, sync_s) * 1e6,
        gpu_mem_gbps=parts.matmul_gbps,
        gpu_expert_overhead_us=max(0.0, per_hit_s - gpu_bytes_s) * 1e6,
        gpu_cache_layer_us=0.0, layer_overhead_us=0.0, sources=dict(base.sources),
        device_overlaps_cpu=base.device_overlaps_cpu if overlap is None else bool(overlap))

    def predicted(machine, mask):
        c = dataclasses.replace(cost, machine=machine)
        return c.costs(freq, 1).step_time(mask)

    # Host overhead: what the no-cache run leaves unexplained, per decoder layer.
    resid_none = none.typical_s - predicted(mc, none.mask)
    mc.layer_overhead_us = max(0.0, resid_none / m.num_layers) * 1e6
    # The cache in place: its micro-timed work (fixed part per layer, per hit) runs k times
    # slower or faster inside a decode step (colder CPU caches, the engine's thread beside it);
    # k is what makes the other run add up.
    layers_cached = int(other.mask.any(axis=1).sum())
    resid_other = other.typical_s - predicted(mc, other.mask)

    def scaled(k):
        return dataclasses.replace(
            mc, gpu_cache_layer_us=max(0.0, k * cache_fix_s) * 1e6,
            gpu_expert_overhead_us=max(0.0, k * per_hit_s - gpu_bytes_s) * 1e6)

    lo, hi = 0.0, 1.0
    while predicted(scaled(hi), other.mask) < other.typical_s and hi < MAX_CACHE_SCALE:
        lo, hi = hi, hi * 2
    for _ in range(60):   # bisection: predicted time grows with k
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(scaled(mid), other.mask) < other.typical_s else (lo, mid)
    k = min(hi, MAX_CACHE_SCALE)
    mc = scaled(k)
    where = f"calibrated on {model_label or m.model_id}"
    mc.sources.update({
        "cpu_kernel_gbps": f"measured ({where}): expert engine seconds per expert "
                           f"({parts.engine_isa or 'native'}), one token, {L} MoE layer(s)",
        "sync_us": f"measured ({where}): engine submit + sync with no expert to run "
                   f"(intercept of the fit)",
        "gpu_mem_gbps": f"measured: torch one-token matmul read rate on the device"
                        f"{' (torch on the CPU: no GPU)' if not base.gpu_present else ''}",
        "gpu_expert_overhead_us": f"measured ({where}): GpuExpertCache seconds per hit, "
                                  f"times the in-place factor (gpu_cache_layer_us), minus the "
                                  f"expert's bytes at gpu_mem_gbps",
        "layer_overhead_us": f"fitted ({where}): the no-cache decode run's time the parts do "
                             f"not explain, per decoder layer",
        "gpu_cache_layer_us": f"measured and fitted ({where}): GpuExpertCache fixed seconds "
                              f"per call, times the factor {k:.3g} that makes the "
                              f"'{other.label}' run add up (the cache's work in place)",
    })
    if overlap is not None:
        mc.sources["device_overlaps_cpu"] = (
            f"{'yes' if overlap else 'no'}: torch's and the engine's threads "
            f"{'fit' if overlap else 'do not fit'} in the cores side by side ({where})")
    report = {
        "engine_sync_us": sync_s * 1e6, "engine_us_per_expert": per_expert_s * 1e6,
        "engine_per_expert_below_resolution": bool(below_resolution),
        "cache_fix_us_micro": cache_fix_s * 1e6, "cache_us_per_hit": per_hit_s * 1e6,
        "cached_expert_bytes_us": gpu_bytes_s * 1e6,
        "statistic": none.stat, "none_step_ms": none.typical_s * 1e3,
        "none_residual_ms": resid_none * 1e3,
        "other_label": other.label, "other_step_ms": other.typical_s * 1e3,
        "other_residual_ms": resid_other * 1e3, "layers_cached": layers_cached,
        "cache_in_place_factor": k,
    }
    return mc, report


# ---- measurements on a loaded model (hybrid.api.Model) ---------------------------------------

def moe_layers(model) -> list:
    """The MoELayer of every MoE decoder layer, in order."""
    return [layer.mlp for layer in model.net.layers if hasattr(layer.mlp, "routed")]


def side_by_side(model) -> bool:
    """Without a GPU, can the cache's torch work and the CPU engine run at the same time?
    MoELayer starts the cached experts right after submitting the CPU ones; they overlap when
    torch's threads and the engine's fit in the physical cores together, and otherwise take
    turns on the same cores (hybrid.load's default gives each every core)."""
    import torch

    from hybrid import native
    from hybrid.hardware import cores

    c = cores()
    n = min(c["physical"], c["usable"])
    loader = getattr(model.net, "experts_loader", None)
    engine = getattr(loader, "threads", None) or native.num_threads()
    return torch.get_num_threads() + engine <= n


def part_probes(model, matmul_bytes: int = 64 << 20) -> tuple[dict, dict]:
    """Callables that run one of the model's parts once, keyed ("engine", n) for the CPU
    engine with n of K picked experts running, ("cache", n) for a GpuExpertCache with n hits,
    ("matmul",) for torch's one-token matmul over a >= 64 MB weight; and facts (weight bytes
    of the matmul, engine ISA). They hold their cache and the matmul weight until dropped."""
    import torch

    from hybrid.experts.gpu_cache import GpuExpertCache

    moe = moe_layers(model)
    if not moe:
        raise ValueError(f"{model.path}: the model has no MoE layer to calibrate on")
    routed = moe[0].routed
    packed = getattr(routed, "layer", None)
    if packed is None or not hasattr(routed, "submit"):
        raise ValueError("calibrate: the routed experts do not run on the CPU engine "
                         "(load with experts_backend='cpu')")
    cfg = model.config
    E, K, H = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    dev, dt = model.device, model.dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, H, generator=g).to(dev, dt)                          # [1, H]
    w = torch.full((1, K), 1.0 / K, device=dev)                             # [1, K]
    xh, wh = x.cpu(), w.cpu()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    probes = {}

    # Engine: rotate through the layer's experts so repetitions do not re-read the same ones.
    rot = [0]

    def engine_run(n):
        start = rot[0]
        rot[0] = (rot[0] + K) % E
        ids = ((torch.arange(K) + start) % E).to(torch.int32)[None, :]     # [1, K]
        skip = torch.zeros(E, dtype=torch.bool)                             # [E]
        skip[ids[0, n:].long()] = True
        routed.submit(xh, ids, wh, skip)
        routed.sync()

    for n in range(K + 1):
        probes[("engine", n)] = lambda n=n: engine_run(n)

    # A GPU cache as a profile builds it, n of the K picks hitting it. It holds up to
    # CACHE_PROBE_BYTES of experts (at least K) and the hits rotate through them: in a decode
    # step the cached experts were last read a whole forward ago, so a probe re-reading the
    # same small experts from the CPU's caches would make them look faster than they run.
    item = torch.empty((), dtype=dt).element_size()
    per = 3 * H * cfg.moe_intermediate_size * item
    C = max(1, min(E - K, max(K, CACHE_PROBE_BYTES // per)))
    held = list(range(C))
    cache = GpuExpertCache.from_packed(packed, held, dev, dt)
    others = list(range(C, E))
    crot = [0]

    def cache_run(n):
        start = crot[0]
        crot[0] = (crot[0] + n) % C
        hit = [held[(start + j) % C] for j in range(n)]
        ids = torch.tensor([hit + others[:K - n]], device=dev)            # [1, K]
        cache.forward(x, ids, w)
        sync()

    for n in range(1, min(K, C) + 1):
        if K - n <= len(others):
            probes[("cache", n)] = lambda n=n: cache_run(n)

    # torch's one-token matmul read rate (the "GPU" memory rate of cost.py).
    W = torch.randn(max(1, matmul_bytes // (H * item)), H, generator=g).to(dev, dt)

    def mm():
        torch.nn.functional.linear(x, W)
        sync()

    probes[("matmul",)] = mm
    return probes, {"matmul_bytes": W.numel() * item, "isa": str(getattr(routed, "isa", ""))}


def parts_from_times(times: dict, facts: dict, stat: str) -> PartTimings:
    """PartTimings from {probe key: [seconds, ...]} (part_probes' keys)."""
    t = {k: typical(v, stat) for k, v in times.items() if v}
    return PartTimings(engine={k[1]: v for k, v in t.items() if k[0] == "engine"},
                       cache={k[1]: v for k, v in t.items() if k[0] == "cache"},
                       matmul_gbps=facts["matmul_bytes"] / t[("matmul",)] / 1e9,
                       engine_isa=facts["isa"], stat=stat)


def _time_turns(fns: dict, reps: int) -> dict:
    """key -> seconds of each of `reps` calls of fns[key](), the keys taking turns (one
    warm-up call each), so load from elsewhere on the machine affects every key alike."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def measure_parts(model, reps: int = 30, stat: str = "median") -> PartTimings:
    """Micro-timings of the engine, the GPU cache and torch's matmul on `model`'s own parts,
    on their own (check() instead times them between decode steps)."""
    probes, facts = part_probes(model)
    return parts_from_times(_time_turns(probes, reps), facts, stat)


def record_routing(model, spec, prompt_ids, decode_ids):
    """Run the fixed token sequence once with a TraceRecorder on every MoE layer (untimed: the
    hook costs time) and return the Trace of the decode steps only."""
    from hybrid.planner.trace import TraceRecorder

    moe = moe_layers(model)
    rec = TraceRecorder.for_spec(spec, keep_sequence=True, source="recorded: calibration tokens")
    on = [False]

    def hook(layer, ids):
        if on[0]:
            rec.record(layer, ids)

    for m_ in moe:
        m_.trace = hook
    try:
        kv = _prefill(model, prompt_ids, len(decode_ids))
        on[0] = True
        for i, tok in enumerate(decode_ids):
            _step(model, kv, tok, len(prompt_ids) + i)
    finally:
        for m_ in moe:
            m_.trace = None
    return rec.to_trace(notes={"prompt_tokens": len(prompt_ids),
                               "decode_tokens": len(decode_ids)})


def _prefill(model, prompt_ids, room: int):
    import torch

    P = len(prompt_ids)
    kv = model.new_cache(1, P + room + 1)
    pos = torch.arange(P)
    model.net.forward(torch.as_tensor(prompt_ids, dtype=torch.long), pos,
                      torch.zeros(P, dtype=torch.long), kv, pos[-1:])
    return kv


def _step(model, kv, tok: int, pos: int) -> float:
    """One teacher-forced decode step (every placement sees the same tokens, so the same
    routing); wall seconds."""
    import torch

    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model.net.forward(torch.tensor([int(tok)]), torch.tensor([pos]),
                      torch.zeros(1, dtype=torch.long), kv)
    sync()
    return time.perf_counter() - t0


def nested_caches(model, counts: np.ndarray, fractions) -> dict:
    """fraction -> {decoder layer: GpuExpertCache or None}: every layer's round(f x E) most
    picked experts (calibrate.fraction_mask's placement). One cache per layer holds the largest
    placement, most picked first; the smaller ones are views of its first slots, so the bf16
    copies exist once. The caches are GpuExpertCache.from_packed, what hybrid.load(path,
    profile=...) builds."""
    from hybrid.experts.gpu_cache import GpuExpertCache

    moe = moe_layers(model)
    E = counts.shape[1]
    sizes = {f: int(round(f * E)) for f in fractions}
    top = max(sizes.values())
    out = {f: {} for f in fractions}
    for i, mlp in enumerate(moe):
        order = [int(e) for e in np.argsort(-counts[i].astype(np.float64), kind="stable")]
        big = (GpuExpertCache.from_packed(mlp.routed.layer, order[:top], model.device,
                                          model.dtype) if top else None)
        for f, n in sizes.items():
            out[f][mlp.layer] = None if n == 0 else GpuExpertCache(
                order[:n], E, big.gate[:n], big.up[:n], big.down[:n])
    return out


def time_placements(model, prompt_ids, decode_ids, placements: dict, rounds: int = 3,
                    warmup: int = 2, probes: dict | None = None) -> tuple[dict, dict]:
    """(label -> wall seconds of every decode step, for each placement {layer: cache or
    None}; probe key -> seconds of each probe call). Placements take turns step by step (each
    with its own KV cache), and between two steps every probe (part_probes) runs once, so load
    from elsewhere on the machine lands on all of them alike; the first `warmup` steps of each
    round are dropped."""
    moe = {m_.layer: m_ for m_ in moe_layers(model)}
    out = {label: [] for label in placements}
    probes = probes or {}
    probe_t = {k: [] for k in probes}
    for fn in probes.values():
        fn()                                                   # warm-up, untimed
    labels = list(placements)
    try:
        for r in range(rounds):
            kvs = {label: _prefill(model, prompt_ids, len(decode_ids)) for label in labels}
            for i, tok in enumerate(decode_ids):
                turn = labels[i % len(labels):] + labels[:i % len(labels)]   # rotate the order
                for label in turn:
                    for layer, cache in placements[label].items():
                        moe[layer].gpu_cache = cache
                    dt = _step(model, kvs[label], tok, len(prompt_ids) + i)
                    if i >= warmup:
                        out[label].append(dt)
                for m_ in moe.values():
                    m_.gpu_cache = None
                for k, fn in probes.items():
                    t0 = time.perf_counter()
                    fn()
                    probe_t[k].append(time.perf_counter() - t0)
    finally:
        for m_ in moe.values():
            m_.gpu_cache = None
    return out, probe_t


# ---- placements for the check -----------------------------------------------------------------

def fraction_mask(counts: np.ndarray, fraction: float) -> np.ndarray:
    """[L, E] bool: in every layer the round(fraction x E) most picked experts."""
    from hybrid.planner.plan import place_uniform

    L, E = counts.shape
    return place_uniform(counts, int(round(fraction * E)) * L)


def write_profile(path: str, cost: CostModel, trace, mask: np.ndarray, label: str,
                  context_tokens: int) -> None:
    """A profile caching exactly `mask`, for hybrid.load(..., profile=path). Its budget is the
    VRAM this placement needs (a calibration run fixes the placement, not the budget)."""
    from hybrid.planner import plan as planner
    from hybrid.planner import profile as profiles

    budget = planner.budget_for_slots(cost, context_tokens, int(mask.sum()))
    freq = trace.frequencies()
    res = planner.PlanResult(budget=budget, masks={label: mask},
                             predictions={label: planner.predict(cost, freq, mask)})
    prof = profiles.build(cost.model, cost.machine, trace, res, cost, strategy=label,
                          command=f"calibration placement {label!r} (hybrid.planner.calibrate)")
    profiles.save(prof, path)


# ---- the whole loop ---------------------------------------------------------------------------

def check(model, path, prompt_ids, decode_ids, fractions, fit_on: float, rounds: int = 3,
          label: str = "", profiles_dir=None, stat: str = "paired",
          log=print) -> dict:
    """Record the routing of the token sequence, time every placement (the most picked
    `fraction` of each layer's experts cached) and, between their steps, the parts; fit on none
    and `fit_on`, and
    predict every placement with the fitted machine. Returns machine, fit report, parts, rows
    (measured vs predicted per placement), steps_s and the worst error on the placements the
    fit did not use. `model` is a loaded hybrid Model of checkpoint `path`."""
    import gc
    import os
    import tempfile

    import torch

    from hybrid.planner.cost import local_machine
    from hybrid.planner.model_spec import load_model_spec

    fractions = sorted({float(f) for f in fractions})
    if 0.0 not in fractions or fit_on not in fractions or fit_on <= 0:
        raise ValueError(f"calibrate: fractions {fractions} must include 0 and fit_on {fit_on} > 0")
    fmt = {"int4": "int4_g32", "int8": "int8_g32", "bf16": "bf16"}[
        moe_layers(model)[0].routed.layer.format]
    spec = dataclasses.replace(load_model_spec(str(path)), expert_format=fmt)
    dev_fmt = "fp32" if model.dtype == torch.float32 else "bf16"
    P, N = len(prompt_ids), len(decode_ids)
    log(f"model {path} ({label}): {len(spec.moe_layers)} MoE layer(s) x {spec.num_experts} "
        f"experts, top-{spec.top_k}, expert {spec.expert_bytes() / 1e6:.3f} MB ({fmt}); "
        f"torch threads {torch.get_num_threads()}")
    trace = record_routing(model, spec, prompt_ids, decode_ids)
    freq = trace.frequencies()

    cost = CostModel(spec, local_machine(measure=False), gpu_expert_format=dev_fmt,
                     device_weight_format=dev_fmt, kv_tokens=P + N // 2, prefill_chunk=P)
    masks = {f: fraction_mask(trace.counts, f) for f in fractions}
    out_dir = profiles_dir or tempfile.mkdtemp(prefix="calibration_profiles_")
    os.makedirs(out_dir, exist_ok=True)
    for f in fractions:
        if f > 0:   # the placements as profiles (what hybrid.load(path, profile=...) takes)
            write_profile(os.path.join(out_dir, f"cached_{int(round(100 * f))}.yaml"), cost,
                          trace, masks[f], f"{f:.0%}", context_tokens=P + N + 1)
    log(f"placement profiles in {out_dir}; building the GPU caches ...")
    placements = nested_caches(model, trace.counts, fractions)
    for f in fractions:   # the caches hold exactly the profiles' experts
        got = {layer: sorted(c.experts) if c else [] for layer, c in placements[f].items()}
        want = {layer: sorted(np.nonzero(masks[f][i])[0].tolist())
                for i, layer in enumerate(spec.moe_layers)}
        if got != want:
            raise AssertionError(f"calibrate: placement {f}: caches differ from the profile")
    probes, facts = part_probes(model)
    log(f"timing {len(fractions)} placements, {rounds} round(s) x {N} steps, taking turns "
        f"step by step, the parts (engine, GPU cache, torch matmul) between steps ...")
    steps, probe_t = time_placements(model, prompt_ids, decode_ids, placements, rounds=rounds,
                                     probes=probes)
    del placements, probes
    gc.collect()
    part_stat = "q25" if stat == "paired" else stat
    parts = parts_from_times(probe_t, facts, part_stat)

    def placement_s(f) -> float:
        """A placement's step time by `stat`. "paired": the no-cache run's lower quartile times
        the median over steps of (this placement's step / the no-cache step of the same
        token), the two taken milliseconds apart, so a burst of load elsewhere that slows
        both cancels in the ratio."""
        if stat != "paired" or f == 0.0:
            return typical(steps[f], part_stat)
        ratio = np.asarray(steps[f]) / np.asarray(steps[0.0])
        return typical(steps[0.0], "q25") * float(np.median(ratio))

    def run(f):
        return RunTiming(label=f"{f:.0%}", mask=masks[f], step_s=[placement_s(f)])

    overlap = None if cost.machine.gpu_present else side_by_side(model)
    machine, report = fit(cost, parts, freq, run(0.0), run(fit_on), label, overlap)
    report["statistic"] = stat
    report["device_overlaps_cpu"] = machine.overlaps
    before = cost.costs(freq, 1)
    after = dataclasses.replace(cost, machine=machine).costs(freq, 1)
    rows, worst = [], 0.0
    for f in fractions:
        meas = placement_s(f)
        pred = after.step_time(masks[f])
        used = f in (0.0, fit_on)
        if not used:
            worst = max(worst, abs(pred / meas - 1))
        rows.append({"cached_fraction": f, "cached_experts": int(masks[f].sum()),
                     "hit_rate": float((freq * masks[f]).sum() / freq.sum()),
                     "statistic": stat, "measured_tok_s": 1 / meas,
                     "median_tok_s": 1 / typical(steps[f], "median"),
                     "q25_tok_s": 1 / typical(steps[f], "q25"),
                     "predicted_tok_s": 1 / pred, "error": pred / meas - 1, "fit_input": used,
                     "uncalibrated_tok_s": 1 / before.step_time(masks[f])})
    return {"machine": machine, "fit": report, "parts": parts, "rows": rows,
            "steps_s": steps, "worst_error": worst, "trace": trace, "profiles_dir": out_dir}


def print_table(rows, log=print) -> None:
    stat = rows[0]["statistic"] if rows else "median"
    log(f"tok/s from step times over all rounds; fit and error on the {stat} statistic "
        f"(each placement's own median and lower quartile q25 shown too)")
    log(f"{'cached':>7} {'experts':>8} {'hit rate':>9} {'median':>9} {'q25':>9} "
        f"{'measured':>9} {'predicted':>10} {'error':>7}  {'uncalibrated':>12}")
    for r in rows:
        log(f"{r['cached_fraction']:>7.1%} {r['cached_experts']:>8d} {r['hit_rate']:>9.1%} "
            f"{r['median_tok_s']:>9.2f} {r['q25_tok_s']:>9.2f} {r['measured_tok_s']:>9.2f} "
            f"{r['predicted_tok_s']:>10.2f} "
            f"{r['error']:>+7.1%}  {r['uncalibrated_tok_s']:>12.2f}"
            + ("  (fit input)" if r["fit_input"] else ""))


def save_machine(machine: MachineSpec, path: str, header: str) -> None:
    import yaml

    with open(path, "w") as fh:
        fh.write(f"# {header}\n")
        yaml.safe_dump(machine.to_dict(), fh, sort_keys=False, width=100)
