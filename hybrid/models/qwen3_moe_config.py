"""Qwen3-MoE configuration read from a checkpoint's config.json (model_type "qwen3_moe").

Fields carry the checkpoint's own names (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-*). Every
shape comes from config.json; behaviour fields default exactly as transformers' Qwen3MoeConfig
defaults them, so a checkpoint means the same thing here and there. Both spellings transformers
reads are accepted: `num_experts` (as shipped) or `num_local_experts` (what transformers 5
writes), and `rope_theta` + `rope_scaling` (as shipped) or `rope_parameters`.

The generic names the rest of hybrid reads (n_routed_experts, tensor_prefix, quant,
eos_token_ids, is_moe_layer) are properties here, so one fact stays in one field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybrid.config import (SIZE_LIMIT, ConfigError, QuantConfig, RopeConfig, check_common_fields, check_flags,
                           check_sizes, field_checker, is_int, parse_quant, parse_rope, read_fields, unknown_fields)

MODEL_TYPE = "qwen3_moe"

# Fields that must be present: every tensor's shape follows from them. num_experts may also be
# spelled num_local_experts (read separately, below).
_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "num_experts_per_tok",
)

# Behaviour fields with transformers' Qwen3MoeConfig defaults (same values on purpose).
_DEFAULTS: dict[str, Any] = {
    "head_dim": None,  # transformers: hidden_size // num_attention_heads when absent
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "decoder_sparse_step": 1,
    "norm_topk_prob": False,
    "mlp_only_layers": None,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "rope_theta": 10000.0,
}

# Keys that carry no meaning for inference (training knobs, bookkeeping, values read elsewhere).
_IGNORED = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "output_router_logits", "router_aux_loss_coef",
    "max_window_layers", "sliding_window", "model_type", "rope_scaling", "rope_parameters",
    "quantization_config", "num_experts", "num_local_experts", "_name_or_path", "id2label",
    "label2id", "return_dict", "output_hidden_states", "output_attentions", "is_encoder_decoder",
    "tokenizer_class", "chunk_size_feed_forward", "problem_type", "pretraining_tp",
}


@dataclass(frozen=True)
class Qwen3MoeConfig:
    model_type: str
    vocab_size: int
    hidden_size: int                 # H
    intermediate_size: int           # dense-layer MLP width
    moe_intermediate_size: int       # I, one routed expert's width
    num_hidden_layers: int
    num_attention_heads: int         # query heads
    num_key_value_heads: int         # K/V heads (GQA: num_attention_heads is a multiple)
    head_dim: int                    # D, per head (q, k and v)
    num_experts: int                 # E routed experts per MoE layer
    num_experts_per_tok: int         # K picked per token
    decoder_sparse_step: int         # layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...]  # ... and i is not listed here
    norm_topk_prob: bool             # renormalise the K picked probabilities to sum 1
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    attention_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    quant: QuantConfig | None = None
    extra: dict = field(default_factory=dict, compare=False)

    # ---- the generic names the rest of hybrid reads ------------------------------------------
    tensor_prefix = ""  # tensors are named model.layers.* / lm_head as shipped

    @property
    def n_routed_experts(self) -> int:
        return self.num_experts

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def is_moe_layer(self, layer: int) -> bool:
        """transformers' Qwen3MoeDecoderLayer rule, exactly."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per K/V head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Qwen3MoeConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        if raw.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type {raw.get('model_type')!r} is not {MODEL_TYPE!r}")
        v = read_fields(raw, _REQUIRED, _DEFAULTS, source, given={"num_experts": _num_experts(raw, source)})
        bad = field_checker(source, v, raw)

        check_sizes(v, (*_REQUIRED, "num_experts"), bad)
        H, nh, nkv = v["hidden_size"], v["num_attention_heads"], v["num_key_value_heads"]
        if nh % nkv:
            bad("num_key_value_heads", f"must divide num_attention_heads={nh}")
        if v["head_dim"] is None:
            v["head_dim"] = H // nh
        if not is_int(v["head_dim"]) or not 0 < v["head_dim"] <= SIZE_LIMIT or v["head_dim"] % 2:
            bad("head_dim", "must be a positive even integer (RoPE rotates halves)")
        if v["num_experts_per_tok"] > v["num_experts"]:
            bad("num_experts_per_tok", f"exceeds num_experts={v['num_experts']}")
        if v["hidden_act"] != "silu":
            bad("hidden_act", "is not supported (only 'silu')")
        if v["use_sliding_window"]:
            bad("use_sliding_window", "is not supported (sliding-window attention)")
        if not is_int(v["decoder_sparse_step"]) or v["decoder_sparse_step"] <= 0:
            bad("decoder_sparse_step", "must be a positive integer")
        dense = [] if v["mlp_only_layers"] is None else v["mlp_only_layers"]
        L = v["num_hidden_layers"]
        if not isinstance(dense, list) or not all(is_int(i) and 0 <= i < L for i in dense):
            bad("mlp_only_layers", f"must be a list of layer indices in 0..{L - 1}")
        check_common_fields(v, bad, source)
        check_flags(v, ("norm_topk_prob", "attention_bias", "tie_word_embeddings"), bad)

        rope = parse_rope(raw, v, source)
        quant = parse_quant(raw.get("quantization_config"), source)
        if quant is not None and quant.method != "fp8":
            raise ConfigError(f"{source}: quantization_config.quant_method {quant.method!r} is not supported "
                              f"for {MODEL_TYPE} (supported: fp8)")
        extra = unknown_fields(raw, set(_REQUIRED) | set(_DEFAULTS) | _IGNORED, source)
        return cls(
            model_type=MODEL_TYPE,
            **{k: v[k] for k in _REQUIRED},
            head_dim=v["head_dim"],
            num_experts=v["num_experts"],
            decoder_sparse_step=v["decoder_sparse_step"],
            mlp_only_layers=tuple(sorted(set(dense))),
            norm_topk_prob=bool(v["norm_topk_prob"]),
            max_position_embeddings=v["max_position_embeddings"],
            rms_norm_eps=float(v["rms_norm_eps"]),
            rope=rope,
            attention_bias=bool(v["attention_bias"]),
            tie_word_embeddings=bool(v["tie_word_embeddings"]),
            bos_token_id=v["bos_token_id"],
            eos_token_id=v["eos_token_id"],
            pad_token_id=v["pad_token_id"],
            quant=quant,
            extra=extra,
        )


def _num_experts(raw: dict, source: str):
    a, b = raw.get("num_experts"), raw.get("num_local_experts")
    if a is not None and b is not None and a != b:
        raise ConfigError(f"{source}: fields num_experts={a!r} and num_local_experts={b!r} disagree")
    return a if a is not None else b
