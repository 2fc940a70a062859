"""Device memory a configuration needs, from the architecture's facts, before loading anything.

device bytes = weights (per tensor group, in the format chosen for it)
             + KV cache (num_slots x max_len tokens)
             + activations (a prefill chunk's working set, plus a fixed allocator reserve)
             + the vision tower (a multimodal checkpoint's, in the compute dtype)
The facts are hybrid.models.facts.ModelFacts (the model class computes them); hybrid.load
(hybrid/runtime/memory.py) and the planner's budget both count with this one function.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
PREFILL_CHUNK = 512  # tokens per prefill chunk the activation estimate assumes
RESERVE = 512 * 1024**2  # CUDA context, allocator fragmentation, temporaries
UNPACK_GROUP = 16  # packed experts a layerwise copy lands and unpacks on the device at a time


def layerwise_bytes(num_experts: int, device_expert_bytes: int, packed_expert_bytes: int) -> int:
    """Device memory layerwise prefill adds (hybrid/experts/layer_stream.py): two layer
    buffers, each every routed expert of a MoE layer in the device layout, plus UNPACK_GROUP
    experts' packed bytes as they land and their unpacking temporaries (the int8 q of int4
    nibbles and the permuted copy: about 4x the packed bytes)."""
    return 2 * num_experts * device_expert_bytes + UNPACK_GROUP * packed_expert_bytes * 5


def activation_bytes(facts, chunk: int, itemsize: int, formats: dict[str, str] | None = None) -> int:
    """Device working set of one forward of `chunk` tokens (ModelFacts.activation_bytes) plus
    the allocator reserve: what device_bytes counts for a PREFILL_CHUNK, and what layerwise
    prefill's longer chunks are checked against (hybrid/runtime/layerwise.py)."""
    quantised = any(f != "dense" for f in (formats or {}).values())
    return facts.activation_bytes(chunk, itemsize, quantised) + RESERVE


@dataclass
class DeviceBudget:
    weights: int
    kv_cache: int
    activations: int
    routed_experts: int
    gpu_experts: int = 0  # experts a placement profile caches on the device
    layerwise: int = 0    # layerwise prefill's two layer buffers (layerwise_bytes), when on
    vision: int = 0       # the vision tower and projector (image input), when loaded

    @property
    def total(self) -> int:
        return (self.weights + self.kv_cache + self.activations + self.routed_experts + self.gpu_experts
                + self.layerwise + self.vision)

    def describe(self) -> str:
        parts = [f"weights {self.weights / GiB:.2f} GiB", f"KV cache {self.kv_cache / GiB:.2f} GiB",
                 f"activations {self.activations / GiB:.2f} GiB"]
        if self.routed_experts:
            parts.append(f"routed experts {self.routed_experts / GiB:.2f} GiB")
        if self.gpu_experts:
            parts.append(f"cached experts {self.gpu_experts / GiB:.2f} GiB")
        if self.layerwise:
            parts.append(f"layerwise prefill buffers {self.layerwise / GiB:.2f} GiB")
        if self.vision:
            parts.append(f"vision tower {self.vision / GiB:.2f} GiB")
        return " + ".join(parts) + f" = {self.total / GiB:.2f} GiB"


def device_bytes(facts, itemsize: int = 2, formats: dict[str, str] | None = None, max_len: int = 4096,
                 num_slots: int = 1, experts_on_device: bool = False, vision_params: int = 0) -> DeviceBudget:
    """facts: ModelFacts; itemsize: bytes of the compute dtype; formats: {group: dense|int8|fp8|blocks};
    vision_params: the vision tower's weights (MoonViT.parameter_count), 0 without image input."""
    formats = formats or {}
    weights = 0
    for g, (params, rows) in facts.group_params().items():
        f = formats.get(g, "dense")
        # int8/fp8: a byte + an fp32 row scale; "blocks" (a GGUF file's own, CPU device) at most the
        # dense size (tensors whose type has no kernel stay dense), counted as dense: an upper bound
        weights += params * itemsize if f in ("dense", "blocks") else params + rows * 4
    weights += facts.always_dense_params * itemsize + facts.router_params * 4
    kv = facts.kv_bytes_per_token(itemsize) * max_len * num_slots
    acts = activation_bytes(facts, min(PREFILL_CHUNK, max_len), itemsize, formats)
    routed = (len(facts.moe_layers) * facts.num_experts * facts.expert_params * itemsize
              if experts_on_device else 0)
    return DeviceBudget(weights, kv, acts, routed, vision=vision_params * itemsize)
