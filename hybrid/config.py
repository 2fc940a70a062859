"""Model configuration read from a checkpoint's config.json.

One dataclass, `ModelConfig`, holds the text model of a DeepSeek-V3-architecture checkpoint
(deepseek_v3, kimi_k2, and the kimi_k25 multimodal wrapper whose `text_config` holds the LM and
whose tensors are prefixed `language_model.`). Every number comes from config.json; defaults
exist only for fields that transformers' DeepseekV3Config also defaults, and they are the same
values, so a checkpoint means the same thing here and there.

Values we cannot run (another activation, softmax routing, an unknown RoPE type, an unknown
quantisation scheme) raise ConfigError naming the field. Unknown keys are kept in `extra` and
listed in a warning: real checkpoints carry many harmless ones (auto_map, ep_size, ...).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """config.json names something this runtime does not support, or lacks a required field."""


# model_type -> (is a multimodal wrapper whose text model sits under text_config)
MODEL_TYPES = {"deepseek_v3": False, "kimi_k2": False, "kimi_k25": True}

# Fields that must be present: the shapes of every tensor follow from them.
_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "n_routed_experts", "num_experts_per_tok",
    "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
)

# Behaviour fields with transformers' DeepseekV3Config defaults (same values on purpose).
_DEFAULTS: dict[str, Any] = {
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "q_lora_rank": 1536,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_interleave": True,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
    "num_key_value_heads": None,
    "moe_layer_freq": 1,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rope_theta": 10000.0,
}

# Keys that carry no meaning for inference (training knobs, bookkeeping, derived values).
_IGNORED = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "aux_loss_alpha", "seq_aux", "ep_size", "pretraining_tp",
    "attention_dropout", "num_nextn_predict_layers", "num_mtp_layers", "output_router_logits",
    "qk_head_dim", "head_dim", "model_type", "rope_scaling", "rope_parameters",
    "quantization_config", "_name_or_path", "id2label", "label2id", "return_dict",
    "output_hidden_states", "output_attentions", "is_encoder_decoder", "tokenizer_class",
    "chunk_size_feed_forward", "problem_type", "router_aux_loss_coef", "mlp_bias",
}

_ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (transformers' rope_parameters, standardised)."""

    rope_type: str  # "default" | "yarn"
    theta: float
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class QuantConfig:
    """How weights are stored in the checkpoint (config.json quantization_config)."""

    method: str  # "fp8" (DeepSeek-V3 block FP8) | "compressed-tensors" (pack-quantized INT4)
    block_size: tuple[int, int] | None = None  # fp8: (rows, cols) of one scale block
    num_bits: int | None = None  # compressed-tensors
    group_size: int | None = None  # compressed-tensors
    ignore: tuple[str, ...] = ()  # compressed-tensors: modules left unquantised


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None
    n_shared_experts: int
    routed_scaling_factor: float
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    rope_interleave: bool
    attention_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    quant: QuantConfig | None
    tensor_prefix: str  # "" or "language_model." (kimi_k25 wrapper)
    extra: dict = field(default_factory=dict, compare=False)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 when set."""
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if r.rope_type != "default" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def latent_width(self) -> int:
        """Latent KV cache elements per token per layer: compressed kv + shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(MODEL_TYPES)})"
            )
        prefix = ""
        text = raw
        quant_raw = raw.get("quantization_config")
        if MODEL_TYPES[model_type]:
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type {model_type} needs a 'text_config' object")
            inner = text.get("model_type", "deepseek_v3")
            if not isinstance(inner, str) or inner not in MODEL_TYPES or MODEL_TYPES[inner]:
                raise ConfigError(f"{source}: text_config.model_type {inner!r} is not supported")
            prefix = "language_model."
            quant_raw = text.get("quantization_config", quant_raw)
            source = f"{source} (text_config)"
        return _parse_text(text, model_type, prefix, quant_raw, source)


def read_config_json(path: str | Path) -> tuple[dict, str]:
    """(config.json of a checkpoint directory, or that file itself, as a dict; its path as
    text), or ConfigError. A .gguf file (or the first of a split set) gives the config.json its
    metadata describes (hybrid/loaders/gguf_config.py)."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from hybrid.loaders.gguf_config import config_json
        from hybrid.loaders.gguf_file import GGUFFile

        g = GGUFFile(path)  # GGUFError (a ValueError) names the file and what is wrong
        try:
            return config_json(g)
        finally:
            g.close()
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file}: no config.json in checkpoint directory {path}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object")
    return raw, str(cfg_file)


def read_fields(raw: dict, required, defaults: dict, source: str, given: dict | None = None) -> dict:
    """The `required` fields of `raw` (and any already read, `given`), all present, then every
    field of `defaults` as `raw` has it or defaulted; ConfigError names the missing ones."""
    v = {k: raw.get(k) for k in required} | (given or {})
    missing = [k for k in v if v[k] is None]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
    for k, d in defaults.items():
        v[k] = raw.get(k, d)
    return v


def field_checker(source: str, v: dict, raw: dict):
    """bad(name, why): raise ConfigError naming the field and its value (as read or defaulted)."""
    def bad(name, why):
        raise ConfigError(f"{source}: field {name}={v.get(name, raw.get(name))!r} {why}")
    return bad


def unknown_fields(raw: dict, known, source: str) -> dict:
    """The fields of `raw` not in `known`, listed in a warning (real checkpoints carry many)."""
    extra = {k: raw[k] for k in raw if k not in known}
    if extra:
        warnings.warn(f"{source}: ignoring unknown config field(s): {', '.join(sorted(extra))}")
    return extra


def is_int(x) -> bool:
    """A JSON integer (true/false are not numbers here, though Python counts bool as int)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


LONG_CONTEXT_WARNING = 1 << 24  # max_position_embeddings beyond this is legal but unheard of

# Upper bounds of a config's counts and widths: far past any real model (K2.5's largest is the
# vocabulary, 163840), low enough that what is derived from them (per-layer lists, parameter
# counts, the RAM check) stays cheap: a config saying 2^64 layers must be refused, not iterated.
SIZE_LIMIT = 1 << 24
LAYER_LIMIT = 1 << 12


def check_sizes(v: dict, names, bad) -> None:
    """Each field in `names` a positive integer up to its limit (bad(name, why) raises)."""
    for k in names:
        limit = LAYER_LIMIT if k == "num_hidden_layers" else SIZE_LIMIT
        if not is_int(v[k]) or not 0 < v[k] <= limit:
            bad(k, f"must be a positive integer (at most {limit})")


def check_flags(v: dict, names, bad) -> None:
    """Each field in `names` JSON true or false (bool("false") is True: a string or a number here
    would silently flip or fix the meaning)."""
    for k in names:
        if not isinstance(v[k], bool):
            bad(k, "must be true or false")


def check_common_fields(v: dict, bad, source: str) -> None:
    """Checks every architecture's config needs: context length, norm eps, special token ids
    inside the vocabulary (v holds vocab_size, max_position_embeddings, rms_norm_eps and the
    bos/eos/pad token ids as read or defaulted; bad(name, why) raises naming the field)."""
    if not is_int(v["max_position_embeddings"]) or v["max_position_embeddings"] <= 0:
        bad("max_position_embeddings", "must be a positive integer")
    if v["max_position_embeddings"] > LONG_CONTEXT_WARNING:
        warnings.warn(f"{source}: max_position_embeddings={v['max_position_embeddings']} is unusually "
                      f"large; the KV cache is sized by max_len, not by this")
    if not is_number(v["rms_norm_eps"]) or v["rms_norm_eps"] <= 0:
        bad("rms_norm_eps", "must be a positive number")
    vocab = v["vocab_size"]
    for k in ("bos_token_id", "pad_token_id"):
        if v[k] is not None and (not is_int(v[k]) or not 0 <= v[k] < vocab):
            bad(k, f"must be a token id in 0..{vocab - 1} or null")
    e = v["eos_token_id"]
    ids = [e] if is_int(e) else e if isinstance(e, list) else None
    if e is not None and (ids is None or not ids or not all(is_int(i) and 0 <= i < vocab for i in ids)):
        bad("eos_token_id", f"must be a token id in 0..{vocab - 1}, a list of them, or null")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _parse_text(raw: dict, model_type: str, prefix: str, quant_raw, source: str) -> ModelConfig:
    v = read_fields(raw, _REQUIRED, _DEFAULTS, source)
    bad = field_checker(source, v, raw)

    check_sizes(v, _REQUIRED, bad)
    check_common_fields(v, bad, source)
    if not is_number(v["routed_scaling_factor"]) or v["routed_scaling_factor"] <= 0:
        bad("routed_scaling_factor", "must be a positive number")
    if v["hidden_act"] != "silu":
        bad("hidden_act", "is not supported (only 'silu')")
    if v["scoring_func"] != "sigmoid":
        bad("scoring_func", "is not supported (only 'sigmoid' routing)")
    if v["topk_method"] not in ("noaux_tc",):
        bad("topk_method", "is not supported (only 'noaux_tc')")
    if v["moe_layer_freq"] != 1:
        bad("moe_layer_freq", "is not supported (only 1: every layer after the dense ones is MoE)")
    if v["num_key_value_heads"] not in (None, v["num_attention_heads"]):
        bad("num_key_value_heads", "must equal num_attention_heads for MLA")
    if v["q_lora_rank"] is not None:
        check_sizes(v, ("q_lora_rank",), bad)
    if v["n_group"] is None:
        v["n_group"] = 1
    if v["topk_group"] is None:
        v["topk_group"] = v["n_group"]
    E, G = v["n_routed_experts"], v["n_group"]
    if not is_int(G) or G <= 0 or E % G:
        bad("n_group", f"must divide n_routed_experts={E}")
    if not is_int(v["topk_group"]) or not 1 <= v["topk_group"] <= G:
        bad("topk_group", f"must be in 1..n_group={G}")
    if G > 1 and E // G < 2:
        bad("n_group", "leaves fewer than 2 experts per group (group score is the sum of the top 2)")
    if v["num_experts_per_tok"] > v["topk_group"] * (E // G):
        bad("num_experts_per_tok", "exceeds the experts available in topk_group groups")
    if v["n_shared_experts"] is None:
        v["n_shared_experts"] = 0
    if not is_int(v["n_shared_experts"]) or not 0 <= v["n_shared_experts"] <= SIZE_LIMIT:
        bad("n_shared_experts", "must be a non-negative integer or null")
    check_flags(v, ("norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings"), bad)
    if not is_int(v["first_k_dense_replace"]) or not 0 <= v["first_k_dense_replace"] <= v["num_hidden_layers"]:
        bad("first_k_dense_replace", "must be in 0..num_hidden_layers")
    if v["qk_rope_head_dim"] % 2:
        bad("qk_rope_head_dim", "must be even")

    rope = parse_rope(raw, v, source)
    quant = parse_quant(quant_raw, source)
    extra = unknown_fields(raw, set(_REQUIRED) | set(_DEFAULTS) | _IGNORED, source)
    return ModelConfig(
        model_type=model_type,
        rope=rope,
        quant=quant,
        tensor_prefix=prefix,
        extra=extra,
        **{k: v[k] for k in _REQUIRED},
        q_lora_rank=v["q_lora_rank"],
        n_shared_experts=v["n_shared_experts"],
        routed_scaling_factor=float(v["routed_scaling_factor"]),
        n_group=v["n_group"],
        topk_group=v["topk_group"],
        first_k_dense_replace=v["first_k_dense_replace"],
        norm_topk_prob=bool(v["norm_topk_prob"]),
        max_position_embeddings=v["max_position_embeddings"],
        rms_norm_eps=float(v["rms_norm_eps"]),
        rope_interleave=bool(v["rope_interleave"]),
        attention_bias=bool(v["attention_bias"]),
        tie_word_embeddings=bool(v["tie_word_embeddings"]),
        bos_token_id=v["bos_token_id"],
        eos_token_id=v["eos_token_id"],
        pad_token_id=v["pad_token_id"],
    )


def parse_rope(raw: dict, v: dict, source: str) -> RopeConfig:
    """Accept both spellings: new `rope_parameters` (with rope_theta inside) and old
    `rope_scaling` (+ top-level rope_theta, `type` instead of `rope_type`)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters/rope_scaling must be an object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})"
        )
    theta = params.get("rope_theta", raw.get("rope_theta", v["rope_theta"]))
    if not is_number(theta) or theta <= 1:
        raise ConfigError(f"{source}: field rope_theta={theta!r} must be a number > 1")
    theta = float(theta)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: rope partial_rotary_factor is not supported")
    if rope_type == "default":
        return RopeConfig("default", theta)
    omax = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
    if omax is None:
        omax = v["max_position_embeddings"]  # transformers' fallback
    if not is_int(omax) or omax <= 0:
        raise ConfigError(f"{source}: rope original_max_position_embeddings={omax!r} must be a positive integer")
    factor = params.get("factor")
    if factor is None:  # transformers derives it from the two lengths
        factor = v["max_position_embeddings"] / omax
        warnings.warn(f"{source}: YaRN rope parameters have no factor; using max_position_embeddings / "
                      f"original_max_position_embeddings = {factor:g}, as transformers does")
    if not is_number(factor) or factor < 1:
        raise ConfigError(f"{source}: rope factor={factor!r} must be a number >= 1 for YaRN")
    for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        if params.get(k) is not None and not is_number(params[k]):
            raise ConfigError(f"{source}: rope {k}={params[k]!r} must be a number or absent")
    if not isinstance(params.get("truncate", True), bool):
        raise ConfigError(f"{source}: rope truncate={params['truncate']!r} must be true or false")
    return RopeConfig(
        "yarn",
        theta,
        factor=float(factor),
        original_max_position_embeddings=int(omax),
        beta_fast=params.get("beta_fast"),
        beta_slow=params.get("beta_slow"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def parse_quant(q, source: str) -> QuantConfig | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: quantization_config must be an object")
    method = q.get("quant_method")
    if method == "fp8":
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"{source}: quantization_config.fmt {fmt!r} is not supported (only e4m3)")
        block = q.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"{source}: quantization_config.weight_block_size {block!r} must be [rows, cols]")
        return QuantConfig("fp8", block_size=(block[0], block[1]))
    if method == "compressed-tensors":
        fmt = q.get("format")
        if fmt != "pack-quantized":
            raise ConfigError(
                f"{source}: compressed-tensors format {fmt!r} is not supported (only pack-quantized)"
            )
        groups = q.get("config_groups") or {}
        if not groups:
            raise ConfigError(f"{source}: compressed-tensors quantization_config has no config_groups")
        bits = gsize = None
        for name, g in groups.items():
            w = (g or {}).get("weights") or {}
            where = f"quantization_config.config_groups.{name}.weights"
            checks = {
                "num_bits": (w.get("num_bits"), (4,)),
                "type": (w.get("type"), ("int",)),
                "symmetric": (w.get("symmetric"), (True,)),
                "strategy": (w.get("strategy"), ("group",)),
            }
            for k, (val, ok) in checks.items():
                if val not in ok:
                    raise ConfigError(f"{source}: {where}.{k}={val!r} is not supported (need {ok[0]!r})")
            if g.get("input_activations") is not None:
                raise ConfigError(f"{source}: {where}: activation quantisation is not supported")
            if not isinstance(w.get("group_size"), int) or w["group_size"] <= 0:
                raise ConfigError(f"{source}: {where}.group_size={w.get('group_size')!r} must be a positive integer")
            if gsize is not None and w["group_size"] != gsize:
                raise ConfigError(f"{source}: config_groups disagree on group_size")
            bits, gsize = w["num_bits"], w["group_size"]
        return QuantConfig("compressed-tensors", num_bits=bits, group_size=gsize,
                           ignore=tuple(q.get("ignore") or ()))
    raise ConfigError(
        f"{source}: quantization_config.quant_method {method!r} is not supported "
        "(supported: fp8, compressed-tensors)"
    )
