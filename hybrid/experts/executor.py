"""The expert executor protocol: one interface over every place routed experts can run.

    ex.submit(x, ids, w, skip=None, out=None, accumulate=False)   # returns at once
    y = ex.sync()            # [T, H] fp32 (or `out`, written or added to): the routed share
    ex.capabilities()        # what the MoE layer may rely on (below)
    ex.num_experts           # E of the layer
    ex.unpack_expert(e)      # (gate [I, H], up [I, H], down [H, I]) fp32, dequantised
    ex.compact_expert(e, device)  # CompactExpert (device_layout.py): the expert in its own bits
                             # on `device`, to hold a copy there (the device cache) without loss
    ex.twin()                # host executors: another executor over the same weights (no copy),
                             # for a second job in flight (expert deferral, moe_layer.py)

x [T, H], ids [T, K] int, w [T, K] fp32; skip [E] bool: experts that run elsewhere contribute
nothing here. Executors (one file each, named in EXECUTORS):
  cpu     hybrid/experts/cpu_moe.py CpuMoE: the C++ engine over packed experts in RAM
  torch   hybrid/experts/torch_moe.py TorchMoE: plain torch, the reference
  device  hybrid/experts/gpu_cache.py GpuExpertCache: experts a placement holds in VRAM (INT4/
          INT8 as the host holds them, one grouped launch per layer); also `held_mask()` [E]
          bool (host): the experts it runs, which the host skips
  stream  hybrid/experts/layer_stream.py StreamedLayer: one MoE layer's experts, all of them,
          streamed to the device for a layerwise prefill chunk (MoELayer.set_whole_layer)
"""

from __future__ import annotations

from dataclasses import dataclass

EXECUTORS = {
    "cpu": "hybrid.experts.cpu_moe:CpuMoE",
    "torch": "hybrid.experts.torch_moe:TorchMoE",
    "device": "hybrid.experts.gpu_cache:GpuExpertCache",
    "stream": "hybrid.experts.layer_stream:StreamedLayer",
}


@dataclass(frozen=True)
class Capabilities:
    device: str             # where its inputs must be: "cpu" (host memory) or the device's type
    overlaps_caller: bool   # computes while the caller goes on between submit and sync
    accumulates: bool       # honours out= / accumulate=True
