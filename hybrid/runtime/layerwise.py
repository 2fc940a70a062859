"""Layerwise prefill at run time: which chunks stream whole layers to the device, asked of the
planner's cost model once at load (hybrid/planner/cost.py layerwise_threshold), and the
LayerStreamer that runs them (hybrid/experts/layer_stream.py).

    lw = attach_layerwise(network, option, device, dtype, machine, vram_left, mask)   # or None
    with lw.chunk(tokens):       # Model.forward: "layerwise" above the threshold, else "cpu"
        network.forward(...)

option: "auto" (on a CUDA device with CPU-engine experts, when the two layer buffers fit the
VRAM left after the load; else off, with a warning saying why: the buffers do not fit, or the
experts are in GGUF block types, which stay on the CPU path in prefill),
True (on, or an error saying why not: the way tests run it on the CPU with HYBRID_DEVICE_OPS=
torch), False (off).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch

OPTIONS = ("auto", True, False)


class LayerwisePrefill:
    def __init__(self, network, streamer, cost, freq: np.ndarray, mask: np.ndarray,
                 threshold: int | None, max_chunk: int | None = None):
        """threshold: the fewest tokens a forward runs layerwise (the cost model's
        layerwise_threshold; None: never); max_chunk: the most tokens one layerwise forward may
        hold, as its activations must fit beside the two layer buffers (None: unbounded, the
        CPU). The engine's long-prompt chunks stay within both (Model.layerwise_chunks)."""
        self.network, self.streamer = network, streamer
        self.cost, self._freq, self._mask = cost, freq, mask
        self.threshold, self.max_chunk = threshold, max_chunk

    def with_streamer(self, streamer) -> "LayerwisePrefill":
        """The same rule over another LayerStreamer (bench and tests: another kernel backend)."""
        return LayerwisePrefill(self.network, streamer, self.cost, self._freq, self._mask,
                                self.threshold, self.max_chunk)

    def mode(self, tokens: int) -> str:
        """"layerwise" or "cpu": what runs a forward of `tokens` (the cost model's choice)."""
        return "layerwise" if self.threshold is not None and tokens >= self.threshold else "cpu"

    def predict(self, tokens: int) -> dict:
        """The cost model's prefill prediction for a chunk of `tokens` (mode, tok/s)."""
        return self.cost.prefill(self._freq, self._mask, tokens)

    @contextmanager
    def chunk(self, tokens: int):
        """Within: a forward of `tokens` tokens runs in the chosen mode (yielded)."""
        from hybrid.experts.layer_stream import streaming

        mode = self.mode(tokens)
        if mode == "cpu":
            yield mode
            return
        with streaming(list(self.network.moe_layers().values()), self.streamer):
            yield mode


def attach_layerwise(network, option, device, dtype, machine, vram_left: int | None, mask=None,
                     spec=None, extra_activations=None):
    """The LayerwisePrefill for `network`, or None (off). machine: the planner's MachineSpec
    (a profile's, or this machine's); vram_left: device bytes free after the load (None:
    unchecked, the CPU); mask [L, E] bool: the cached experts (None: none);
    extra_activations(tokens): device bytes a forward of `tokens` needs beyond the activations
    the load counted (a PREFILL_CHUNK's; None: unchecked). A layerwise chunk is at least the
    threshold and the engine makes them up to twice that, so thousands of tokens: their
    activations (gigabytes for K2.5) must fit in what the buffers leave, which bounds the chunk
    (max_chunk), or layerwise is off when not even the threshold fits."""
    from hybrid.experts.cpu_moe import CpuMoE
    from hybrid.experts.layer_stream import LayerStreamer, check_streamable
    from hybrid.planner.cost import CostModel
    from hybrid.planner.device_memory import layerwise_bytes

    if option not in OPTIONS:
        raise ValueError(f"layerwise_prefill must be 'auto', True or False, got {option!r}")
    device = torch.device(device)
    if option is False or (option == "auto" and device.type != "cuda"):
        return None
    moes = list(network.moe_layers().values())
    hosts = [m.host_experts() for m in moes]

    def off(why: str, warn: bool = True):
        if option is True:
            raise ValueError(f"layerwise_prefill=True: {why}")
        if warn:
            warnings.warn(f"layerwise prefill is off: {why}")
        return None

    if not moes:
        return None
    if not all(isinstance(h, CpuMoE) for h in hosts):
        return off("it streams the CPU engine's packed experts (experts_backend='cpu')", warn=False)
    layers = [h.layer for h in hosts]
    try:
        check_streamable(layers)
    except ValueError as e:
        return off(str(e).removeprefix("layerwise prefill: "))
    first = layers[0]
    per = first.expert_nbytes
    need = layerwise_bytes(first.num_experts, per, per)
    if vram_left is not None and need > vram_left:
        return off(f"its two layer buffers need {need / 2**30:.2f} GiB on {device}, "
                   f"{max(0, vram_left) / 2**30:.2f} GiB is left after the load")
    if spec is None:
        raise ValueError("attach_layerwise: needs the model's ModelSpec for the cost model")
    cost = CostModel(spec, machine, layerwise_prefill=True)
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    freq = np.full((L, E), K / E)   # no trace at load: every expert equally likely
    mask = np.zeros((L, E), dtype=bool) if mask is None else mask
    threshold = cost.layerwise_threshold(freq, mask)
    if threshold is None and option == "auto":
        return None   # no chunk pays for the copy on this machine: hold no buffers for it
    max_chunk = None
    if threshold is not None and vram_left is not None and extra_activations is not None:
        room = vram_left - need   # for a long chunk's activations, beyond those counted
        max_chunk = largest_chunk(threshold, 2 * threshold - 1, lambda t: extra_activations(t) <= room)
        if max_chunk is None:
            return off(f"a chunk of {threshold} tokens (the fewest that pay for the copy) needs "
                       f"{extra_activations(threshold) / 2**30:.2f} GiB of activations on {device} "
                       f"beyond the {need / 2**30:.2f} GiB of layer buffers, and "
                       f"{max(0, vram_left) / 2**30:.2f} GiB is left after the load")
    streamer = LayerStreamer(layers, device, dtype)
    return LayerwisePrefill(network, streamer, cost, freq, mask, threshold, max_chunk)


def largest_chunk(lo: int, hi: int, fits) -> int | None:
    """The most tokens t in [lo, hi] with fits(t), or None when fits(lo) fails; fits must hold
    for every t below one that fits (activations grow with the tokens)."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def vram_left(device, max_vram: int | None, need) -> int | None:
    """Device bytes free for layerwise buffers after the load (need: the load's DeviceBudget,
    hybrid/runtime/memory.py check_fits): max_vram less everything the load counted, and on
    CUDA the free memory less what is counted but made later (the KV cache, the activations);
    None: unchecked (the CPU with no max_vram)."""
    device = torch.device(device)
    left = None if max_vram is None else int(max_vram) - need.total
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] - need.kv_cache - need.activations
        left = free if left is None else min(left, free)
    return left


def machine_for(prof, device=None):
    """The cost model's machine: the profile's (what its placement was planned for), else this
    machine's (hybrid.planner.cost.local_machine: nominal GPU rates) with, on a CUDA device, the
    pinned host -> device copy rate measured (hybrid.hardware, ~256 MiB copied, once)."""
    from hybrid import hardware
    from hybrid.planner.cost import MachineSpec, local_machine

    if prof is not None and isinstance(prof.data.get("machine"), dict):
        return MachineSpec.from_dict(prof.data["machine"], where=f"{prof.path}: machine")
    m = local_machine(measure=False)
    if device is not None and torch.device(device).type == "cuda":
        m.pcie_gbps = hardware.h2d_bandwidth_gbps(torch.device(device).index or 0)
        m.sources["pcie_gbps"] = "measured: hybrid.hardware.h2d_bandwidth_gbps (pinned, 256 MiB)"
    return m
