"""Placement at load: a profile's cached experts on the device, and the online policy over them.

    prof, spec = load_checked_profile(profile, path, config, device, max_vram)
    attach_device_experts(network, prof, device, dtype)        # one GpuExpertCache per MoE layer
    live = attach_online(network, placer)                      # observes routing, swaps at step ends
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


def load_checked_profile(profile, path: Path, device: torch.device, max_vram):
    """A placement profile (hybrid plan), checked against this checkpoint's config and VRAM."""
    from hybrid.config import read_config_json
    from hybrid.models.spec import spec_from_config
    from hybrid.planner.profile import load as load_profile

    raw, where = read_config_json(path)
    spec = spec_from_config(raw, model_id=path.name, where=where)
    budget = max_vram
    if budget is None and device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0]
    return load_profile(str(profile), model=spec, vram_bytes=budget), spec


def online_placer(prof, spec, online):
    """The OnlinePlacer `online` asks for (None: off), starting from the profile's placement,
    with the profile's machine and expert formats as its cost model."""
    from hybrid.planner.cost import CostModel, MachineSpec
    from hybrid.planner.online import OnlinePlacer
    from hybrid.planner.simulate import OnlinePolicy

    section = prof.data.get("online") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{prof.path}: field 'online' must be a mapping")
    if online is None:
        online = bool(section.get("enabled", False))
    if online is False:
        return None
    options = dict(section.get("policy") or {})
    if isinstance(online, dict):
        options.update(online)
    known = {f.name for f in dataclasses.fields(OnlinePolicy)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"online re-placement: unknown policy option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    policy = OnlinePolicy(**options)
    if not isinstance(prof.data.get("machine"), dict):
        raise ValueError(f"{prof.path}: online re-placement needs the profile's 'machine' section "
                         f"(the costs that decide when a swap pays); make the profile with "
                         f"`hybrid plan`")
    machine = MachineSpec.from_dict(prof.data["machine"], where=f"{prof.path}: machine")
    cost = CostModel(spec, machine, gpu_expert_format=prof.gpu_expert_format)
    return OnlinePlacer(cost, prof.mask(spec.moe_layers), spec.moe_layers, policy)


def attach_device_experts(network, prof, device, dtype) -> int:
    """Give each MoE layer the experts the profile holds on the device (the host executor's
    experts in their own bits, compact_expert); the host executor then skips them. Returns the
    device bytes they take."""
    from hybrid.experts.gpu_cache import GpuExpertCache

    held = 0
    for i, moe in network.moe_layers().items():
        if prof.experts_for_layer(i):
            cache = GpuExpertCache.from_profile(prof, i, moe.host_experts(), device, dtype)
            moe.set_device_experts(cache)
            held += cache.nbytes
    return held


def attach_online(network, placer):
    """Observe every MoE layer's routing and swap experts at each step's end (Model.forward)."""
    from hybrid.planner.online import LiveReplacement

    caches, sources = {}, {}
    for i, moe in network.moe_layers().items():
        if moe.device_experts() is not None:
            caches[i] = moe.device_experts()
            sources[i] = moe.host_experts().compact_expert
    live = LiveReplacement(placer, caches, sources)
    for moe in network.moe_layers().values():
        moe.add_observer(on_routing=live.observe)
    return live
