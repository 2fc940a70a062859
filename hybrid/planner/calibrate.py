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
from dataclasses import dataclass, field

import numpy as np

from hybrid.planner.cost import CostModel, MachineSpec


PER_EXPERT_FLOOR_S = 1e-9   # engine seconds per expert below which the fit calls it zero
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
