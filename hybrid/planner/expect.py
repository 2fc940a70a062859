"""What to expect from a model on a machine: does it fit in RAM and VRAM, and how fast will it
decode and prefill, with no GPU expert cache and with the best plan for the VRAM there is.

Without a trace the routing is assumed uniform (every expert picked with probability K / E),
which is the worst case for caching; the result says so. Used by `hybrid doctor`.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from hybrid.planner import plan as planner
from hybrid.planner.cost import CostModel
from hybrid.planner.trace import Trace


def _uniform_trace(spec) -> Trace:
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    counts = np.full((L, E), K, dtype=np.uint64)     # E tokens, each expert picked K times
    return Trace(spec.model_id, spec.config_hash, list(spec.moe_layers), E, K, counts, E,
                 source="assumed uniform routing (no trace)", synthetic=True)


def ram_needed(spec, machine, context_tokens: int) -> dict:
    """Bytes of RAM: packed routed experts (mmapped; they must fit in the page cache to run at
    RAM speed) and the embedding table; without a GPU also the device weights, the KV cache and
    a vision tower (bf16)."""
    parts = {"routed_experts": spec.routed_ram_bytes(),
             "embedding": spec.embedding_params * 2}
    if not machine.gpu_present:  # a GGUF keeps them in its blocks there (device_weights="blocks")
        parts["device_weights"] = spec.device_weight_bytes("blocks" if spec.stored_device_bytes else "bf16")
        parts["kv_cache"] = context_tokens * spec.kv_bytes_per_token
        if spec.vision_params:
            parts["vision_tower"] = spec.vision_params * 2
    parts["total"] = sum(parts.values())
    return parts


def matching_profiles(spec, vram_free: int, folder: str | None = None) -> list:
    """Shipped profiles (profiles/*.yaml beside the package) made for this model that fit in
    `vram_free` bytes, the one using the most VRAM first (it caches the most experts; a smaller
    one may still predict more tok/s when it assumed int8 device weights, a quality trade):
    [(path, needed bytes, tok/s)]."""
    import glob
    import os

    from hybrid.planner import profile as profiles

    if folder is None:
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              os.pardir, "profiles")
    out = []
    for path in sorted(glob.glob(os.path.join(os.path.normpath(folder), "*.yaml"))):
        try:
            p = profiles.load(path, model=spec, vram_bytes=vram_free)
        except (profiles.ProfileError, OSError):
            continue   # another model, or needs more VRAM than there is
        tok_s = (p.data.get("predicted", {}).get("plan", {}) or {}).get("decode_tok_s", 0.0)
        out.append((path, p.vram_needed_bytes, float(tok_s)))
    return sorted(out, key=lambda r: -r[1])


def expectations(spec, machine, trace: Trace | None = None, context_tokens: int = 32768,
                 decode_at: int = 4096) -> dict:
    trace = trace or _uniform_trace(spec)
    out = {"model": spec.summary(), "routing": trace.source, "context_tokens": context_tokens}
    ram = ram_needed(spec, machine, context_tokens)
    out["ram"] = {"needed_bytes": ram["total"], "parts": ram,
                  "available_bytes": machine.ram_bytes,
                  "fits": machine.ram_bytes >= ram["total"]}
    freq = trace.frequencies()
    none = np.zeros(freq.shape, dtype=bool)
    results = {}
    blocks = ("blocks",) if spec.stored_device_bytes and not machine.gpu_present else ()
    for fmt in blocks + ("bf16", "int8"):  # a GGUF without a GPU: its blocks first (the default)
        cm = CostModel(spec, machine, device_weight_format=fmt, kv_tokens=decode_at)
        entry = {"device_weights_bytes": (spec.device_weight_bytes(fmt) if fmt == "blocks"
                                          else planner.device_needs(cm, context_tokens)[0])}
        pre = cm.prefill(freq, none)
        entry["no_cache"] = {"decode_tok_s": cm.decode_tok_s(freq, none),
                             "prefill_tok_s": pre["tok_s"]}
        if machine.gpu_present and machine.vram_bytes:
            try:
                r = planner.make_plan(cm, trace, context_tokens)
                p = r.predictions["plan"]
                entry["vram_fits"] = True
                entry["best_plan"] = {"cached_experts": p["cached_experts"],
                                      "expert_format": cm.gpu_expert_format,
                                      "bytes_per_expert": cm.gpu_expert_bytes,
                                      "hit_rate": p["hit_rate"],
                                      "decode_tok_s": p["decode_tok_s"],
                                      "prefill_tok_s": p["prefill_tok_s"]}
            except planner.PlanError as e:
                entry["vram_fits"] = False
                entry["vram_problem"] = str(e).splitlines()[0]
                need = copy.copy(cm)
                need.machine = copy.copy(machine)
                need.machine.vram_bytes = 1 << 50
                b = planner.compute_budget(need, context_tokens)
                entry["vram_needed_bytes"] = (b.device_weights_bytes + b.kv_cache_bytes
                                              + b.activation_bytes + b.reserve_bytes + b.vision_bytes)
        results[fmt] = entry
    out["device_weights"] = results
    out["layerwise_prefill"] = layerwise_expectation(spec, machine, freq, context_tokens, decode_at)
    if machine.gpu_present and machine.vram_bytes:
        out["profiles"] = [{"path": p, "vram_needed_bytes": n, "decode_tok_s": t}
                           for p, n, t in matching_profiles(spec, machine.vram_bytes)]
    return out


def layerwise_expectation(spec, machine, freq, context_tokens: int, decode_at: int = 4096) -> dict:
    """Layerwise prefill on this machine: its device bytes (two layer buffers, and a
    threshold-sized chunk's activations beyond those counted), whether they fit beside the
    device weights (bf16, else int8) and KV cache, the smallest chunk the cost model streams,
    and the prefill rates at twice that chunk."""
    from hybrid.planner.device_memory import layerwise_bytes

    none = np.zeros(freq.shape, dtype=bool)
    cm = CostModel(spec, machine, layerwise_prefill=True, kv_tokens=decode_at)
    out = {"device_bytes": layerwise_bytes(spec.num_experts, cm.gpu_expert_bytes, cm.cpu_expert_bytes),
           "pinned_host_bytes": 2 * spec.num_experts * cm.cpu_expert_bytes}
    if not (machine.gpu_present and machine.vram_bytes):
        return dict(out, fits=False, note="no GPU")
    note = ""
    for fmt in ("bf16", "int8"):
        cm.device_weight_format = fmt
        try:
            lw, note = planner.layerwise_budget(cm, planner.compute_budget(
                dataclasses.replace(cm, layerwise_prefill=False), context_tokens).experts_bytes,
                context_tokens)
        except planner.PlanError as e:
            lw, note = 0, str(e).splitlines()[0]
        if lw:
            break
    out.update(fits=bool(lw), note=note, device_weights=cm.device_weight_format)
    need, _ = planner.layerwise_need(cm, context_tokens)
    out["chunk_activation_bytes"] = max(0, need - out["device_bytes"])
    t = cm.layerwise_threshold(freq, none)
    out["threshold_tokens"] = t
    if t is not None:
        out["at_twice_threshold"] = cm.prefill(freq, none, 2 * t)
    return out
