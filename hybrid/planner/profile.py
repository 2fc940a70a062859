"""Profiles (profiles/*.yaml): the planner's output and the runtime's input.

A profile is plain YAML, meant to be read and diffed by people:

  format: hybrid-profile/1
  model:     id, config_hash, MoE layer count, experts, top-k, expert storage format
  machine:   the machine it was planned for (name, bandwidths, VRAM, RAM)
  trace:     where the routing statistics came from; synthetic: true|false
  budget:    VRAM and what it is spent on (device weights and their format, KV cache for the
             context, activations, CUDA reserve, expert slots and their format)
  cost_model: GPU/CPU expert formats and bytes, context at which decode is predicted
  predicted: decode / prefill tok/s and hit rate for every strategy compared
  strategy:  which strategy `cached` holds (normally "plan")
  online:    the online re-placement policy (enabled: false unless asked)
  notes:     assumptions behind the numbers (device weight format, GPU expert format, ...)
  cached:    decoder-layer index -> compact expert list, e.g. 7: "0-3,17,200"

load() refuses, with the reason, a profile made for another model (config hash), one whose
expert lists are malformed, and one that needs more VRAM than the caller says it has.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np

from hybrid.planner.units import compact_ids, expand_ids, fmt_bytes

PROFILE_FORMAT = "hybrid-profile/1"


class ProfileError(ValueError):
    """A profile that cannot be used here; the message says why."""


def _round(x):
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(f"{float(x):.4g}")
    if isinstance(x, np.integer):
        return int(x)
    return x


def build(model, machine, trace, plan_result, cost_model, strategy: str = "plan",
          trace_path: str | None = None, online: dict | None = None,
          extra_predictions: dict | None = None, command: str | None = None) -> dict:
    mask = plan_result.masks[strategy]
    cached = {int(layer): compact_ids(np.nonzero(mask[i])[0])
              for i, layer in enumerate(model.moe_layers)}
    preds = dict(plan_result.predictions)
    if extra_predictions:
        preds.update(extra_predictions)
    return {
        "format": PROFILE_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "model": model.summary(),
        "machine": _round(machine.summary()),
        "trace": _trace_section(trace, trace_path),
        "budget": plan_result.budget.to_dict(),
        "cost_model": cost_model.describe(),
        "predicted": _round(preds),
        "strategy": strategy,
        "online": online or {"enabled": False},
        "notes": _notes(model, cost_model, plan_result.budget),
        "cached": cached,
    }


def _notes(model, cost_model, budget) -> list:
    """Assumptions a reader must know before trusting the numbers."""
    import dataclasses

    from hybrid.planner.plan import device_needs

    out = []
    fmt = cost_model.device_weight_format
    if fmt != "bf16":
        bf16 = device_needs(dataclasses.replace(cost_model, device_weight_format="bf16"),
                            budget.context_tokens)[0]
        out.append(f"non-expert device weights assumed {fmt} "
                   f"({fmt_bytes(budget.device_weights_bytes)}; bf16 would take "
                   f"{fmt_bytes(bf16)}, which with the KV cache "
                   f"leaves little or no room for experts); load with device_weights='{fmt}'")
    held = cost_model.model.expert_format
    if cost_model.gpu_expert_format != held and held != "bf16":
        out.append(f"cached experts counted as {cost_model.gpu_expert_format} in VRAM, but "
                   f"hybrid's GPU cache holds these {held} experts as they are ({held})")
    out.append("the embedding table stays in RAM (only looked-up rows go to the GPU), so it is "
               "not in the device weights")
    out.append("device memory is counted by hybrid.load's own accounting "
               "(hybrid/planner/device_memory.py), so a profile that fits here passes its check")
    return out


def _trace_section(trace, path) -> dict:
    d = {"path": path, "source": trace.source, "synthetic": bool(trace.synthetic),
         "tokens": int(trace.tokens), "model_id": trace.model_id}
    n = trace.notes or {}
    if trace.synthetic and n.get("generator") == "hybrid.planner.synthetic.make_trace":
        z = n["zipf_exponents"]
        d["regenerate"] = (f"python scripts/make_synthetic_traces.py --out {path or 'TRACE'} "
                           f"--tokens {trace.tokens} --zipf-first {z[0]:g} --zipf-last {z[-1]:g} "
                           f"--drift-every {n['drift_every']} --drift-fraction "
                           f"{n['drift_fraction']:g} --seed {n['seed']}")
    return d


def save(profile: dict, path: str) -> None:
    import yaml

    t = profile["trace"]
    header = ("# hybrid placement profile: which experts live in VRAM. Made by `hybrid plan`.\n"
              + ("# SYNTHETIC TRACE: routing statistics were generated, not recorded.\n"
                 if t["synthetic"] else
                 f"# RECORDED TRACE: {t['tokens']} tokens, {t['source']}\n"))
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(profile, f, sort_keys=False, default_flow_style=False, width=100)


@dataclass
class Profile:
    data: dict
    path: str

    @property
    def cached(self) -> dict:
        """decoder-layer index -> sorted list of cached expert ids."""
        E = int(self.data["model"]["experts"])
        return {int(k): expand_ids(v, E, f"{self.path}: cached[{k}]")
                for k, v in (self.data.get("cached") or {}).items()}

    @property
    def vram_needed_bytes(self) -> int:
        b = self.data["budget"]
        return int(b["device_weights"]["bytes"] + b["kv_cache"]["bytes"]
                   + b["activations"]["bytes"] + b["cuda_reserve"]["bytes"]
                   + b.get("vision_tower", {"bytes": 0})["bytes"]
                   + b.get("layerwise_prefill", {"bytes": 0})["bytes"]
                   + self.num_cached * b["experts"]["bytes_per_expert"])

    @property
    def bytes_per_expert(self) -> int:
        """Device bytes of one cached expert, as the planner counted them (gpu_expert_format)."""
        return int(self.data["budget"]["experts"]["bytes_per_expert"])

    @property
    def num_cached(self) -> int:
        return sum(len(v) for v in self.cached.values())

    @property
    def gpu_expert_format(self) -> str:
        return self.data["budget"]["experts"]["format"]

    def mask(self, moe_layers) -> np.ndarray:
        """[L, E] bool in the order of `moe_layers` (decoder-layer indices)."""
        E = int(self.data["model"]["experts"])
        m = np.zeros((len(moe_layers), E), dtype=bool)
        pos = {int(l): i for i, l in enumerate(moe_layers)}
        for layer, ids in self.cached.items():
            if layer not in pos:
                raise ProfileError(f"{self.path}: cached experts for layer {layer}, which is not a "
                                   f"MoE layer of this model")
            m[pos[layer], ids] = True
        return m

    def experts_for_layer(self, layer_idx: int) -> list:
        return self.cached.get(int(layer_idx), [])


def load(path: str, model=None, vram_bytes: int | None = None) -> Profile:
    """Read and check a profile. `model`: the ModelSpec being run (config hash checked);
    `vram_bytes`: VRAM the runtime can use (refused if the profile needs more)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ProfileError(f"{path}: cannot read profile ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ProfileError(f"{path}: format {got!r}, expected {PROFILE_FORMAT!r}")
    for key in ("model", "budget", "cached"):
        if key not in data:
            raise ProfileError(f"{path}: field {key!r} missing")
    for key in ("config_hash", "experts", "id"):
        if key not in data["model"]:
            raise ProfileError(f"{path}: field model.{key} missing")
    prof = Profile(data=data, path=path)
    try:
        cached = prof.cached
        needed = prof.vram_needed_bytes
    except (KeyError, TypeError) as e:
        raise ProfileError(f"{path}: budget field {e} missing or malformed") from None
    except ValueError as e:
        raise ProfileError(str(e)) from None
    if model is not None:
        if data["model"]["config_hash"] != model.config_hash:
            raise ProfileError(
                f"{path}: made for model {data['model']['id']!r} "
                f"(config {data['model']['config_hash']}), this model is {model.model_id!r} "
                f"(config {model.config_hash}); make a new profile with `hybrid plan`")
        if int(data["model"]["experts"]) != model.num_experts:
            raise ProfileError(f"{path}: {data['model']['experts']} experts per layer, the model "
                               f"has {model.num_experts}")
        bad = sorted(set(cached) - {int(x) for x in model.moe_layers})
        if bad:
            raise ProfileError(f"{path}: cached experts for layers {bad}, which are not MoE "
                               f"layers of this model")
    if vram_bytes is not None and needed > vram_bytes:
        b = data["budget"]
        raise ProfileError(
            f"{path}: needs {fmt_bytes(needed)} of VRAM ({prof.num_cached} experts x "
            f"{fmt_bytes(b['experts']['bytes_per_expert'])} + device weights "
            f"{fmt_bytes(b['device_weights']['bytes'])} + KV {fmt_bytes(b['kv_cache']['bytes'])}"
            f" + activations and reserve), only {fmt_bytes(vram_bytes)} available; use a profile "
            f"for a smaller budget (hybrid plan --vram ...)")
    return prof
