"""Calibration runs on a loaded model (hybrid.api.Model): the parts' micro-timings, the routing
of a fixed token sequence, every placement timed step by step, and the fit of the cost model
to them (the fitting itself is the planner's: hybrid/planner/calibrate.py).

Runtime layer: it drives a loaded model's MoE layers through their attach points
(moe_layers(), host_experts(), set_device_experts(), add_observer()).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from hybrid.planner.calibrate import PartTimings, typical

CACHE_PROBE_BYTES = 256 << 20   # experts the GPU-cache probe holds and rotates through


# ---- measurements on a loaded model (hybrid.api.Model) ---------------------------------------

def moe_layers(model) -> list:
    """The MoELayer of every MoE decoder layer, in order."""
    return list(model.moe_layers().values())


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
    engine = native.num_threads()
    return torch.get_num_threads() + engine <= n


def part_probes(model, matmul_bytes: int = 64 << 20) -> tuple[dict, dict]:
    """Callables that run one of the model's parts once, keyed ("engine", n) for the CPU
    engine with n of K picked experts running, ("cache", n) for a GpuExpertCache with n hits,
    ("matmul",) for torch's one-token matmul over a >= 64 MB weight; and facts (weight bytes
    of the matmul, engine ISA). They hold their cache and the matmul weight until dropped."""
    import torch

    from hybrid.experts.cpu_moe import CpuMoE
    from hybrid.experts.gpu_cache import GpuExpertCache

    moe = moe_layers(model)
    if not moe:
        raise ValueError(f"{model.path}: the model has no MoE layer to calibrate on")
    routed = moe[0].host_experts()
    if not isinstance(routed, CpuMoE):
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
    # The cache holds int4/int8 experts in the packed layer's bytes, bf16 ones in the compute dtype.
    per = routed.layer.expert_nbytes * (2 if routed.layer.format == "bf16" and dt == torch.float32 else 1)
    C = max(1, min(E - K, max(K, CACHE_PROBE_BYTES // per)))
    held = list(range(C))
    cache = GpuExpertCache.from_packed(routed, held, dev, dt)
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
    return probes, {"matmul_bytes": W.numel() * item, "isa": routed.isa}


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
        m_.add_observer(on_routing=hook)
    try:
        kv = _prefill(model, prompt_ids, len(decode_ids))
        on[0] = True
        for i, tok in enumerate(decode_ids):
            _step(model, kv, tok, len(prompt_ids) + i)
    finally:
        for m_ in moe:
            m_.remove_observer(hook)
    return rec.to_trace(notes={"prompt_tokens": len(prompt_ids),
                               "decode_tokens": len(decode_ids)})


def _prefill(model, prompt_ids, room: int):
    import torch

    P = len(prompt_ids)
    kv = model.make_cache(1, P + room + 1)
    pos = torch.arange(P)
    model.network.forward(torch.as_tensor(prompt_ids, dtype=torch.long), pos,
                      torch.zeros(P, dtype=torch.long), kv, pos[-1:])
    return kv


def _step(model, kv, tok: int, pos: int) -> float:
    """One teacher-forced decode step (every placement sees the same tokens, so the same
    routing); wall seconds."""
    import torch

    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model.network.forward(torch.tensor([int(tok)]), torch.tensor([pos]),
                      torch.zeros(1, dtype=torch.long), kv)
    sync()
    return time.perf_counter() - t0


def nested_caches(model, counts: np.ndarray, fractions) -> dict:
    """fraction -> {decoder layer: GpuExpertCache or None}: every layer's round(f x E) most
    picked experts (calibrate.fraction_mask's placement). One cache per layer holds the largest
    placement, most picked first; the smaller ones are views of its first slots
    (GpuExpertCache.head), so the device copies exist once. The caches are GpuExpertCache.from_packed, what hybrid.load(path,
    profile=...) builds."""
    from hybrid.experts.gpu_cache import GpuExpertCache

    moe = moe_layers(model)
    E = counts.shape[1]
    sizes = {f: int(round(f * E)) for f in fractions}
    top = max(sizes.values())
    out = {f: {} for f in fractions}
    for i, mlp in enumerate(moe):
        order = [int(e) for e in np.argsort(-counts[i].astype(np.float64), kind="stable")]
        big = (GpuExpertCache.from_packed(mlp.host_experts(), order[:top], model.device,
                                          model.dtype) if top else None)
        for f, n in sizes.items():
            out[f][mlp.layer] = None if n == 0 else big.head(n)
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
                        moe[layer].set_device_experts(cache)
                    dt = _step(model, kvs[label], tok, len(prompt_ids) + i)
                    if i >= warmup:
                        out[label].append(dt)
                for m_ in moe.values():
                    m_.set_device_experts(None)
                for k, fn in probes.items():
                    t0 = time.perf_counter()
                    fn()
                    probe_t[k].append(time.perf_counter() - t0)
    finally:
        for m_ in moe.values():
            m_.set_device_experts(None)
    return out, probe_t


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

    from hybrid.models.spec import load_model_spec
    from hybrid.planner.calibrate import RunTiming, fit, fraction_mask, typical, write_profile
    from hybrid.planner.cost import CostModel, local_machine

    fractions = sorted({float(f) for f in fractions})
    if 0.0 not in fractions or fit_on not in fractions or fit_on <= 0:
        raise ValueError(f"calibrate: fractions {fractions} must include 0 and fit_on {fit_on} > 0")
    fmt = {"int4": "int4_g32", "int8": "int8_g32", "bf16": "bf16"}[
        moe_layers(model)[0].host_experts().layer.format]
    spec = dataclasses.replace(load_model_spec(str(path)), expert_format=fmt)
    dev_fmt = "fp32" if model.dtype == torch.float32 else "bf16"
    cache_fmt = dev_fmt if fmt == "bf16" else fmt  # the device cache keeps int experts as they are
    P, N = len(prompt_ids), len(decode_ids)
    log(f"model {path} ({label}): {len(spec.moe_layers)} MoE layer(s) x {spec.num_experts} "
        f"experts, top-{spec.top_k}, expert {spec.expert_bytes() / 1e6:.3f} MB ({fmt}); "
        f"torch threads {torch.get_num_threads()}")
    trace = record_routing(model, spec, prompt_ids, decode_ids)
    freq = trace.frequencies()

    cost = CostModel(spec, local_machine(measure=False), gpu_expert_format=cache_fmt,
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


