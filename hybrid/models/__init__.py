"""Model architectures, found by config.json's model_type.

Each architecture is one file (deepseek_v3.py serves DeepSeek-V3/R1, Kimi K2 and the K2.5
text model; qwen3_moe.py serves Qwen3-MoE) with the same small contract:
    Class.config_class.from_dict(raw, source)   the checkpoint's config, checked
    Class.facts(config) -> ModelFacts           sizes for memory, planner and cost model
    Class(config, ctx, progress=None)           built from a hybrid.runtime.context.BuildContext
    .forward(input_ids, positions, slots, cache, logits_index=None) -> fp32 logits
    .make_cache(num_slots, max_len[, num_blocks, block_size]), .kv_paged(), .kv_bytes_per_token(),
    .kv_cache_tokens(same arguments as make_cache), .moe_layers()
The registry maps model_type -> "module:Class"; imports happen on lookup, not here.
"""

from __future__ import annotations

import importlib
from pathlib import Path

REGISTRY = {
    "deepseek_v3": "hybrid.models.deepseek_v3:DeepseekV3",
    "kimi_k2": "hybrid.models.deepseek_v3:DeepseekV3",
    "kimi_k25": "hybrid.models.deepseek_v3:DeepseekV3",
    "qwen3_moe": "hybrid.models.qwen3_moe:Qwen3Moe",
}


def model_class(model_type: str):
    from hybrid.config import ConfigError

    target = REGISTRY.get(model_type)
    if target is None:
        raise ConfigError(f"model_type {model_type!r} has no architecture (known: {', '.join(REGISTRY)})")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def config_from_dict(raw: dict, source: str = "config.json"):
    """The architecture's own config object for a config.json dict."""
    from hybrid.config import ConfigError

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in REGISTRY:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(REGISTRY)})")
    return model_class(model_type).config_class.from_dict(raw, source=source)


def config_from_dir(path: str | Path):
    from hybrid.config import read_config_json

    raw, source = read_config_json(path)
    return config_from_dict(raw, source)


def config_from_gguf(g):
    """The config of an open GGUFFile (hybrid.load parses a file's metadata once and hands the
    parsed file on: config, weights and tokenizer all read it)."""
    from hybrid.loaders.gguf_config import config_json

    return config_from_dict(*config_json(g))


def facts_of(config):
    """ModelFacts of a parsed config (hybrid/models/facts.py)."""
    return model_class(config.model_type).facts(config)
