"""Model architectures, found by config.json's model_type.

Each architecture is one file (deepseek_v3.py serves DeepSeek-V3/R1, Kimi K2 and the K2.5
text model). The registry maps model_type -> "module:Class"; the class is built as
Class(config, weight_source, progress=None). Imports happen on lookup, not here.
"""

from __future__ import annotations

import importlib

REGISTRY = {
    "deepseek_v3": "hybrid.models.deepseek_v3:DeepseekV3",
    "kimi_k2": "hybrid.models.deepseek_v3:DeepseekV3",
    "kimi_k25": "hybrid.models.deepseek_v3:DeepseekV3",
}


def model_class(model_type: str):
    target = REGISTRY.get(model_type)
    if target is None:
        raise ValueError(f"model_type {model_type!r} has no architecture (known: {', '.join(REGISTRY)})")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
