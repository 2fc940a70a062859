"""The planner's ModelSpec of a checkpoint, made by the model's architecture (hybrid/models/
facts.py), and the built-in Kimi K2.5 description.

    spec = load_model_spec("/models/Kimi-K2.5")   # a directory, a config.json, or "kimi-k2.5"
    spec = spec_from_config(config_dict, model_id="tiny")

The built-in values are K2.5's published config.json ("text_config"); a real checkpoint is always
read from its own file. A config dict without model_type is read as DeepSeek-V3's.
"""

from __future__ import annotations

import os

from hybrid.planner.model_spec import ModelSpec, config_hash, default_expert_format

# Kimi K2.5 text model (moonshotai/Kimi-K2.5 config.json, "text_config"): the one copy.
KIMI_K25_CONFIG = dict(
    model_type="kimi_k2", vocab_size=163840, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=64, n_routed_experts=384,
    num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
    moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
    v_head_dim=128, routed_scaling_factor=2.827, max_position_embeddings=262144, rope_theta=50000.0,
    tie_word_embeddings=False,
    rope_scaling={"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
)

# Its vision tower: every field at Kimi K2.5's value (hybrid/models/moonvit_config.py defaults).
KIMI_K25_VISION = dict(model_type="kimi_k25", text_config=KIMI_K25_CONFIG, vision_config={},
                       media_placeholder_token_id=163605)

BUILTIN_MODELS = {"kimi-k2.5": KIMI_K25_VISION, "k2.5": KIMI_K25_VISION}


def spec_from_config(cfg: dict, model_id: str, where: str = "config",
                     expert_format: str | None = None, vision: bool = True) -> ModelSpec:
    """ModelSpec of a config.json dict (a multimodal wrapper's text_config is the model).
    expert_format: how the CPU holds the experts (default: what hybrid.load does with it);
    vision: count a vision tower the config describes (False: the checkpoint holds none)."""
    from hybrid.models import config_from_dict, model_class

    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object")
    raw = cfg if "model_type" in cfg else dict(cfg, model_type="deepseek_v3")
    try:
        config = config_from_dict(raw, source=where)
    except ValueError as e:
        raise ValueError(str(e)) from None
    cls = model_class(config.model_type)
    f = cls.facts(config)
    if not f.moe_layers:
        raise ValueError(f"{where}: the model has no MoE layers")
    text = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
    quant = config.quant.method if config.quant is not None else None
    return ModelSpec(
        model_id=model_id, hidden=f.hidden, dense_intermediate=f.dense_width,
        expert_intermediate=f.expert_width, num_experts=f.num_experts, top_k=f.top_k,
        shared_experts=f.shared_width // f.expert_width if f.expert_width else 0,
        num_layers=f.num_layers, moe_layers=f.moe_layers,
        attention_params=f.attention_params_per_layer, kv_bytes=f.kv_bytes_per_token(2),
        attention_flops_per_key=f.attention_flops_per_key, vocab_size=f.vocab,
        tie_word_embeddings=f.tie_word_embeddings,
        expert_format=expert_format or default_expert_format(quant),
        vision_params=vision_params(raw, config) if vision else 0,
        config_hash=config_hash(text, cls.HASH_FIELDS), facts=f,
    )


def vision_params(raw: dict, config) -> int:
    """Weights of the vision tower a kimi_k25 config.json describes (0: none); the count
    hybrid.load checks the device memory with (hybrid/runtime/build.py)."""
    if config.model_type != "kimi_k25" or raw.get("vision_config") is None:
        return 0
    from hybrid.models.moonvit import MoonViT
    from hybrid.models.moonvit_config import VisionConfig

    return MoonViT.parameter_count(VisionConfig.from_dict(raw, config.hidden_size))


def load_model_spec(model: str | None) -> ModelSpec:
    """`model`: a checkpoint directory, a config.json path, or a built-in name ("kimi-k2.5")."""
    from hybrid.config import read_config_json

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
    cfg, where = read_config_json(path)
    mid = cfg.get("_name_or_path") or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return spec_from_config(cfg, str(mid), where=where, vision=_holds_tower(os.path.dirname(path), cfg))


def _holds_tower(directory: str, cfg: dict) -> bool:
    """Whether a checkpoint directory whose config describes a vision tower holds its weights
    (hybrid.load leaves out, with a warning, a tower the checkpoint lacks); True when no
    safetensors are there to ask (a bare config.json describes the full model)."""
    if cfg.get("vision_config") is None:
        return False
    from hybrid.loaders.safetensors_files import SafetensorsFiles
    from hybrid.models.moonvit import has_vision_tensors

    try:
        return has_vision_tensors(SafetensorsFiles(directory))  # reads the index (or one header)
    except (OSError, ValueError):
        return True
