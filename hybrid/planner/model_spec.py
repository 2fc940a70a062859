"""What the planner needs to know about a model: shapes, byte counts, and a config hash.

A ModelSpec comes from a checkpoint's config.json (DeepSeek-V3 field names; Kimi K2.5's
multimodal config nests them under "text_config") or from the built-in "kimi-k2.5" description,
which lets `hybrid plan` / `hybrid doctor` reason about K2.5 on a machine that does not hold the
600 GB checkpoint. The built-in values are K2.5's published config.json; a real checkpoint is
always read from its own file.

The config hash covers only the fields that decide placement (layer count and kinds, expert
count, top-k and shapes): a profile made for one checkpoint stays valid for another with the
same architecture, and is refused for a different one.

Legend: L MoE layers, E routed experts, K experts per token, H hidden, I expert width.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

# The fields the hash covers, in the checkpoint's own names.
_HASHED_FIELDS = (
    "hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
    "num_experts_per_tok", "n_shared_experts", "num_hidden_layers", "first_k_dense_replace",
    "moe_layer_freq", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "num_attention_heads", "vocab_size",
)

# Kimi K2.5 text model (moonshotai/Kimi-K2.5 config.json, "text_config").
KIMI_K25_CONFIG = {
    "model_type": "kimi_k2",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 384,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "num_attention_heads": 64,
    "vocab_size": 163840,
    "tie_word_embeddings": False,
}

BUILTIN_MODELS = {"kimi-k2.5": KIMI_K25_CONFIG, "k2.5": KIMI_K25_CONFIG}

GROUP = 32  # INT4/INT8 quantisation group (Kimi ships group 32)


def expert_format_bytes(fmt: str, n: int, k: int) -> int:
    """Exact bytes of one [N, K] matrix in a weight format (matches csrc/kernels.h packing).

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
    q_lora_rank: int = 0        # 0: plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_heads: int = 64
    vocab_size: int = 0
    tie_word_embeddings: bool = False
    expert_format: str = "int4_g32"   # format the CPU experts are stored in
    config_hash: str = ""
    # The checkpoint's config.json as read (the device-memory budget is computed from it by
    # the loader's own accounting, hybrid/loaders/memory.py, so planner and loader agree).
    config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    # --- parameter counts -------------------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        h, nh = self.hidden, self.num_heads
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank * nh * qk
        else:
            q = h * nh * qk
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
        o = nh * self.v_head_dim * h
        return q + kv_a + kv_b + o

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
        if fmt not in DEVICE_WEIGHT_BYTES_PER_PARAM:
            raise ValueError(f"unknown device weight format {fmt!r} "
                             f"(expected one of {sorted(DEVICE_WEIGHT_BYTES_PER_PARAM)})")
        # Routers and norms stay bf16/fp32 in practice; they are < 0.2% of the total.
        return int(sum(self.device_params().values()) * DEVICE_WEIGHT_BYTES_PER_PARAM[fmt])

    def expert_bytes(self, fmt: str | None = None) -> int:
        """Exact bytes of one routed expert (3 matrices) in `fmt` (default: storage format)."""
        fmt = fmt or self.expert_format
        h, i = self.hidden, self.expert_intermediate
        return 2 * expert_format_bytes(fmt, i, h) + expert_format_bytes(fmt, h, i)

    @property
    def kv_bytes_per_token(self) -> int:
        """Latent KV cache (bf16): (kv_lora_rank + rope dim) x 2 bytes x every layer."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * 2 * self.num_layers

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
                "expert_format": self.expert_format}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d.pop("config")
        return d


def config_hash(cfg: dict) -> str:
    picked = {k: cfg.get(k) for k in _HASHED_FIELDS}
    blob = json.dumps(picked, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise ValueError(f"{where}: config field {key!r} is missing")
    v = cfg[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{where}: config field {key!r} must be a non-negative integer, got {v!r}")
    return v


def default_expert_format(cfg: dict) -> str:
    """The format hybrid.load keeps a checkpoint's routed experts in by default (loaders/
    experts.py): compressed-tensors INT4 passes through, FP8 becomes int8 group-32, float
    experts stay bf16."""
    q = cfg.get("quantization_config") or {}
    if "text_config" in cfg and not q:
        q = (cfg["text_config"] or {}).get("quantization_config") or {}
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method == "compressed-tensors":
        return "int4_g32"
    if method == "fp8":
        return "int8_g32"
    return "bf16"


def spec_from_config(cfg: dict, model_id: str, where: str = "config",
                     expert_format: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a DeepSeek-V3-style config dict (text_config is unwrapped).
    expert_format: how the CPU holds the experts (default: what hybrid.load does with this
    checkpoint, default_expert_format)."""
    raw = cfg
    expert_format = expert_format or default_expert_format(cfg)
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        cfg = cfg["text_config"]
    n_layers = _need(cfg, "num_hidden_layers", where)
    first_dense = cfg.get("first_k_dense_replace", 0) or 0
    freq = cfg.get("moe_layer_freq", 1) or 1
    moe = tuple(i for i in range(n_layers) if i >= first_dense and i % freq == 0)
    if not moe:
        raise ValueError(f"{where}: the model has no MoE layers (num_hidden_layers={n_layers}, "
                         f"first_k_dense_replace={first_dense})")
    e = _need(cfg, "n_routed_experts", where)
    k = _need(cfg, "num_experts_per_tok", where)
    if not 0 < k <= e:
        raise ValueError(f"{where}: num_experts_per_tok={k} must be in 1..n_routed_experts={e}")
    return ModelSpec(
        model_id=model_id,
        hidden=_need(cfg, "hidden_size", where),
        dense_intermediate=cfg.get("intermediate_size", 0) or 0,
        expert_intermediate=_need(cfg, "moe_intermediate_size", where),
        num_experts=e, top_k=k,
        shared_experts=cfg.get("n_shared_experts", 0) or 0,
        num_layers=n_layers, moe_layers=moe,
        q_lora_rank=cfg.get("q_lora_rank") or 0,
        kv_lora_rank=cfg.get("kv_lora_rank", 512),
        qk_nope_head_dim=cfg.get("qk_nope_head_dim", 128),
        qk_rope_head_dim=cfg.get("qk_rope_head_dim", 64),
        v_head_dim=cfg.get("v_head_dim", 128),
        num_heads=_need(cfg, "num_attention_heads", where),
        vocab_size=cfg.get("vocab_size", 0) or 0,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        config_hash=config_hash(cfg),
        expert_format=expert_format,
        config=raw,
    )


def load_model_spec(model: str | None) -> ModelSpec:
    """`model`: a checkpoint directory, a config.json path, or a built-in name ("kimi-k2.5")."""
    if model is None or model.lower() in BUILTIN_MODELS:
        name = "kimi-k2.5" if model is None else model.lower()
        return spec_from_config(BUILTIN_MODELS[name], "kimi-k2.5", where="built-in kimi-k2.5",
                                expert_format="int4_g32")   # Kimi ships INT4 group-32 experts
    path = model
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model {model!r}: not a checkpoint directory with config.json, a config.json file, "
            f"or a built-in model ({', '.join(sorted(BUILTIN_MODELS))})")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    mid = cfg.get("_name_or_path") or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return spec_from_config(cfg, str(mid), where=path)
