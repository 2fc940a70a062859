"""What the planner needs to know about a model: shapes, byte counts, and a config hash.

A ModelSpec is made by the models layer from a checkpoint's config (hybrid/models/spec.py:
spec_from_config, load_model_spec; the architecture computes its own numbers, this module
re-derives none) or from the built-in "kimi-k2.5" description, which lets `hybrid plan` /
`hybrid doctor` reason about K2.5 on a machine that does not hold the 600 GB checkpoint.

The config hash covers only the fields that decide placement (layer count and kinds, expert
count, top-k and shapes; each architecture names them): a profile made for one checkpoint stays
valid for another with the same architecture, and is refused for a different one.

Legend: L MoE layers, E routed experts, K experts per token, H hidden, I expert width.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

GROUP = 32  # INT4/INT8 quantisation group (Kimi ships group 32)


def expert_format_bytes(fmt: str, n: int, k: int) -> int:
    """Exact bytes of one [N, K] matrix in a weight format (matches csrc/core/kernels.h packing).

    int4_g32: N*K/2 nibbles + N*K/32 bf16 scales; int8_g32: N*K + N*K/32*2; bf16: N*K*2;
    fp32: N*K*4 (the GPU cache's precise mode).
    """
    if fmt == "int4_g32":
        return n * k // 2 + n * k // GROUP * 2
    if fmt == "int8_g32":
        return n * k + n * k // GROUP * 2
    if fmt == "bf16":
        return n * k * 2
    if fmt == "fp32":
        return n * k * 4
    raise ValueError(f"unknown weight format {fmt!r} (expected int4_g32, int8_g32, bf16, fp32)")


DEVICE_WEIGHT_BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.0, "int8": 1.0, "fp32": 4.0}


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    hidden: int                 # H
    dense_intermediate: int     # dense-layer MLP width
    expert_intermediate: int    # I
    num_experts: int            # E
    top_k: int                  # K
    shared_experts: int
    num_layers: int             # all decoder layers (dense + MoE)
    moe_layers: tuple = field(default=())   # decoder-layer indices of the MoE layers
    attention_params: int = 0   # device parameters of one layer's attention
    kv_bytes: int = 0           # KV cache bytes one token costs (bf16), all layers
    attention_flops_per_key: int = 0  # per query token, per context key, one layer
    vocab_size: int = 0
    tie_word_embeddings: bool = False
    expert_format: str = "int4_g32"   # format the CPU experts are stored in
    # Bytes of one routed expert as the CPU holds it when that is not one of our formats (a GGUF's
    # own block types, e.g. Q2_K, averaged over layers); 0: counted from expert_format.
    stored_expert_bytes: int = 0
    # Bytes of the device-side matrices of a GGUF file kept in their blocks on a CPU device
    # (device_weights="blocks": the file's bytes where a kernel runs the type, bf16 elsewhere);
    # 0: not a GGUF (no "blocks" format).
    stored_device_bytes: int = 0
    # Weights of the vision tower and projector (Kimi K2.5's MoonViT), on the device in the compute
    # dtype beside the text model's device weights; 0: text only (or images left off).
    vision_params: int = 0
    config_hash: str = ""
    # The architecture's ModelFacts (hybrid/models/facts.py): the device-memory budget is counted
    # from them by the one accounting hybrid.load uses too (device_memory.py), so they agree.
    facts: object = field(default=None, compare=False, hash=False, repr=False)

    # --- parameter counts -------------------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        return self.attention_params

    @property
    def expert_params(self) -> int:
        """One routed expert: gate, up [I, H] and down [H, I]."""
        return 3 * self.hidden * self.expert_intermediate

    @property
    def shared_params_per_layer(self) -> int:
        return self.shared_experts * self.expert_params

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.dense_intermediate

    @property
    def router_params_per_layer(self) -> int:
        return self.num_experts * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - len(self.moe_layers)

    def device_params(self) -> dict:
        """Parameters that live on the GPU, by part. The embedding table stays in RAM
        (DESIGN.md, decode step 1: only the looked-up rows go to the GPU)."""
        nl, nm = self.num_layers, len(self.moe_layers)
        return {
            "attention": nl * self.attention_params_per_layer,
            "shared_experts": nm * self.shared_params_per_layer,
            "dense_mlp": self.num_dense_layers * self.dense_mlp_params,
            "routers": nm * self.router_params_per_layer,
            "lm_head": self.lm_head_params if self.lm_head_params else self.embedding_params,
        }

    def device_weight_bytes(self, fmt: str = "bf16") -> int:
        if fmt == "blocks" and self.stored_device_bytes:
            return self.stored_device_bytes
        if fmt not in DEVICE_WEIGHT_BYTES_PER_PARAM:
            raise ValueError(f"unknown device weight format {fmt!r} "
                             f"(expected one of {sorted(DEVICE_WEIGHT_BYTES_PER_PARAM)})")
        # Routers and norms stay bf16/fp32 in practice; they are < 0.2% of the total.
        return int(sum(self.device_params().values()) * DEVICE_WEIGHT_BYTES_PER_PARAM[fmt])

    def device_bytes_per_param(self, fmt: str = "bf16") -> float:
        """Average bytes a device-side weight reads per parameter in `fmt` (the cost model's)."""
        if fmt == "blocks" and self.stored_device_bytes:
            return self.stored_device_bytes / max(1, sum(self.device_params().values()))
        return DEVICE_WEIGHT_BYTES_PER_PARAM.get(fmt, 2.0)

    def expert_bytes(self, fmt: str | None = None) -> int:
        """Exact bytes of one routed expert (3 matrices) in `fmt` (default: storage format)."""
        if fmt is None and self.stored_expert_bytes:
            return self.stored_expert_bytes
        fmt = fmt or self.expert_format
        h, i = self.hidden, self.expert_intermediate
        return 2 * expert_format_bytes(fmt, i, h) + expert_format_bytes(fmt, h, i)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token (bf16), all layers (the architecture's number)."""
        return self.kv_bytes

    @property
    def expert_flops_per_token(self) -> int:
        return 2 * self.expert_params

    def routed_ram_bytes(self) -> int:
        return len(self.moe_layers) * self.num_experts * self.expert_bytes()

    def summary(self) -> dict:
        return {"id": self.model_id, "config_hash": self.config_hash,
                "moe_layers": len(self.moe_layers), "experts": self.num_experts,
                "top_k": self.top_k, "hidden": self.hidden,
                "expert_intermediate": self.expert_intermediate,
                "expert_format": self.expert_format, "vision_params": self.vision_params}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d.pop("facts")
        return d


def config_hash(cfg: dict, fields) -> str:
    """Hash of `fields` of a config dict (missing ones count as null)."""
    picked = {k: cfg.get(k) for k in fields}
    blob = json.dumps(picked, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def default_expert_format(quant_method: str | None) -> str:
    """The format hybrid.load keeps a checkpoint's routed experts in by default
    (hybrid/runtime/expert_factory.py): compressed-tensors INT4 passes through, FP8 becomes int8
    group-32, float experts stay bf16."""
    if quant_method == "compressed-tensors":
        return "int4_g32"
    if quant_method == "fp8":
        return "int8_g32"
    return "bf16"
