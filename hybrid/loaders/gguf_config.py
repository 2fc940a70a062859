"""A GGUF's metadata as the config.json its architecture would ship, so the model's own config
class parses and checks it (hybrid/models: config_class.from_dict) exactly as for safetensors.

Keys are the ones llama.cpp's convert_hf_to_gguf.py writes ({arch} = general.architecture):
  deepseek2 (DeepSeek-V2/V3/R1, Kimi K2/K2.5) -> model_type deepseek_v3
    block_count, context_length, embedding_length, feed_forward_length, attention.head_count,
    attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count (qk_rope_head_dim),
    attention.q_lora_rank (absent: q_proj form), attention.kv_lora_rank, leading_dense_block_count,
    expert_count, expert_used_count, expert_shared_count, expert_feed_forward_length,
    expert_weights_scale, expert_weights_norm (written only when true), expert_gating_func
    (2 = sigmoid), expert_group_count / expert_group_used_count (absent: 1 / 1).
    The MLA head dims come in two forms: the split k_b / v_b converter writes key_length = C + Dr,
    value_length = C, key_length_mla = Dn + Dr, value_length_mla = Dv; the older kv_b converter
    writes key_length = Dn + Dr, value_length = Dv and no *_mla keys.
  qwen3moe -> model_type qwen3_moe
    block_count, context_length, embedding_length, feed_forward_length, attention.head_count,
    attention.head_count_kv, attention.key_length (head_dim), rope.freq_base,
    attention.layer_norm_rms_epsilon, expert_count, expert_used_count, expert_feed_forward_length;
    llama.cpp always renormalises Qwen3-MoE's top-k weights (norm_topk_prob true).
  YaRN (either): rope.scaling.type "yarn", rope.scaling.factor, rope.scaling.original_context_length,
    rope.scaling.yarn_beta_fast / yarn_beta_slow, rope.scaling.yarn_log_multiplier
    (= 0.1 * mscale_all_dim; llama.cpp assumes mscale == mscale_all_dim), yarn_attn_factor.
    llama.cpp's loader ignores the betas; we pass them on.
The vocabulary size is the embedding's rows; bos/eos come from tokenizer.ggml.*; a file without
`output.weight` ties the LM head to the embedding. RoPE pairs are adjacent in deepseek2 files
(rope_interleave true, as DeepSeek's own weights).
"""

from __future__ import annotations

from hybrid.loaders.gguf_file import GGUFError, GGUFFile

ARCH_MODEL_TYPES = {"deepseek2": "deepseek_v3", "qwen3moe": "qwen3_moe"}
GATING_SOFTMAX, GATING_SIGMOID = 1, 2


def architecture(g: GGUFFile) -> str:
    arch = g.field("general.architecture", str)
    if arch not in ARCH_MODEL_TYPES:
        raise GGUFError(f"{g.path}: metadata key general.architecture={arch!r} is not supported "
                        f"(supported: {', '.join(ARCH_MODEL_TYPES)})")
    return arch


def config_json(g: GGUFFile) -> tuple[dict, str]:
    """(config_dict(g), the source named in config errors)."""
    return config_dict(g), f"{g.path} (GGUF metadata)"


def config_dict(g: GGUFFile) -> dict:
    """The config.json (as a dict) the GGUF's metadata describes; GGUFError names a missing key."""
    arch = architecture(g)
    return (_deepseek2 if arch == "deepseek2" else _qwen3moe)(g, arch)


def _reader(g: GGUFFile, arch: str):
    num = (int, float)

    def req(key, kind=int):
        return g.field(f"{arch}.{key}", kind)

    def opt(key, default=None, kind=None):
        return g.field(f"{arch}.{key}", kind or (num if isinstance(default, float) else int), default)

    return req, opt


def _common(g: GGUFFile, arch: str) -> dict:
    req, opt = _reader(g, arch)
    vocab = g.info("token_embd.weight").shape[0]
    out = {
        "vocab_size": vocab,
        "hidden_size": req("embedding_length"),
        "num_hidden_layers": req("block_count"),
        "num_attention_heads": req("attention.head_count"),
        "max_position_embeddings": req("context_length"),
        "rms_norm_eps": float(req("attention.layer_norm_rms_epsilon", (int, float))),
        "tie_word_embeddings": "output.weight" not in g,
        "bos_token_id": g.field("tokenizer.ggml.bos_token_id", int, None),
        "eos_token_id": g.field("tokenizer.ggml.eos_token_id", int, None),
        "pad_token_id": g.field("tokenizer.ggml.padding_token_id", int, None),  # llama.cpp's converter writes it
    }
    out["rope_parameters"] = _rope(g, arch)
    return out


def _rope(g: GGUFFile, arch: str) -> dict:
    req, opt = _reader(g, arch)
    theta = float(opt("rope.freq_base", 10000.0))
    kind = g.field(f"{arch}.rope.scaling.type", str, "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if kind != "yarn":
        raise GGUFError(f"{g.path}: metadata key {arch}.rope.scaling.type={kind!r} is not supported "
                        "(supported: none, yarn)")
    p = {"rope_type": "yarn", "rope_theta": theta,
         "factor": float(req("rope.scaling.factor", (int, float))),
         "original_max_position_embeddings": req("rope.scaling.original_context_length")}
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                      ("yarn_attn_factor", "attention_factor")):
        v = opt(f"rope.scaling.{key}", 0.0)
        if f"{arch}.rope.scaling.{key}" in g.fields:
            p[name] = float(v)
    if f"{arch}.rope.scaling.yarn_log_multiplier" in g.fields:
        m = float(opt("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
        p["mscale"] = p["mscale_all_dim"] = m
    return p


def _deepseek2(g: GGUFFile, arch: str) -> dict:
    req, opt = _reader(g, arch)
    cfg = _common(g, arch)
    R = req("rope.dimension_count")
    C = req("attention.kv_lora_rank")
    if f"{arch}.attention.key_length_mla" in g.fields:  # split k_b / v_b converter
        qk, v = req("attention.key_length_mla"), req("attention.value_length_mla")
    else:  # kv_b converter: the plain lengths are the per-head ones
        qk, v = req("attention.key_length"), req("attention.value_length")
    if qk <= R:
        raise GGUFError(f"{g.path}: metadata: key length {qk} must exceed {arch}.rope.dimension_count={R}")
    if f"{arch}.expert_gating_func" not in g.fields and g.field(f"{arch}.expert_count", int, 0):
        # llama.cpp runs such a file with softmax routing (DeepSeek V2 files predate the key), and
        # its converter writes the key only when config.json names scoring_func (transformers'
        # DeepseekV3Config does not save it): refuse it here, saying so, rather than guess.
        raise GGUFError(f"{g.path}: metadata key {arch}.expert_gating_func is missing: llama.cpp reads that "
                        "as softmax routing (DeepSeek V2), which hybrid does not run; a DeepSeek-V3 / Kimi file "
                        "needs 2 (sigmoid) there (llama.cpp's converter writes it when config.json has "
                        "scoring_func)")
    gating = opt("expert_gating_func", GATING_SOFTMAX)
    n_group = opt("expert_group_count", 1)
    cfg.update({
        "model_type": "deepseek_v3",
        "intermediate_size": req("feed_forward_length"),
        "moe_intermediate_size": req("expert_feed_forward_length"),
        "n_routed_experts": req("expert_count"),
        "num_experts_per_tok": req("expert_used_count"),
        "n_shared_experts": opt("expert_shared_count", 0),
        "routed_scaling_factor": float(opt("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(g.field(f"{arch}.expert_weights_norm", bool, False)),
        "first_k_dense_replace": opt("leading_dense_block_count", 0),
        "n_group": n_group,
        "topk_group": opt("expert_group_used_count", n_group),
        "q_lora_rank": g.field(f"{arch}.attention.q_lora_rank", int, None),
        "kv_lora_rank": C,
        "qk_rope_head_dim": R,
        "qk_nope_head_dim": qk - R,
        "v_head_dim": v,
        "scoring_func": {GATING_SOFTMAX: "softmax", GATING_SIGMOID: "sigmoid"}.get(gating, f"gating {gating}"),
        "topk_method": "noaux_tc",
        "rope_interleave": True,
    })
    return cfg


def _qwen3moe(g: GGUFFile, arch: str) -> dict:
    req, opt = _reader(g, arch)
    cfg = _common(g, arch)
    nh = cfg["num_attention_heads"]
    cfg.update({
        "model_type": "qwen3_moe",
        "intermediate_size": opt("feed_forward_length", 0) or req("expert_feed_forward_length"),
        "moe_intermediate_size": req("expert_feed_forward_length"),
        "num_key_value_heads": opt("attention.head_count_kv", nh),
        "head_dim": opt("attention.key_length", cfg["hidden_size"] // nh),
        "num_experts": req("expert_count"),
        "num_experts_per_tok": req("expert_used_count"),
        "norm_topk_prob": bool(g.field(f"{arch}.expert_weights_norm", bool, True)),
        "attention_bias": "blk.0.attn_q.bias" in g,
    })
    return cfg
