"""Tiny Qwen3-MoE checkpoints for tests, built with transformers' Qwen3MoeForCausalLM.

`build(tmp_path, case="e64_gqa4", seed=0, **overrides)` makes a seeded random model (weights
scaled so activations stay O(1) and router logits spread out), saves it as shipped: safetensors
with one tensor per expert (`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`),
tensors in bf16 (the fp32 reference holds the same values), a config.json in Qwen's own spelling (num_experts, rope_theta, rope_scaling: null,
max_window_layers, ...; spelling="transformers" keeps what transformers 5 writes instead:
num_local_experts, rope_parameters), and by default a tokenizer: a byte-level BPE
tokenizer.json with Qwen's special tokens, a tokenizer_config.json with a Qwen-style Jinja
chat_template (<|im_start|>role\\n...<|im_end|>) and eos <|im_end|>, and a generation_config.json
stopping at <|im_end|> and <|endoftext|>.

variant="fp8" re-stores every projection (attention, dense MLP, experts; not the router, the
embeddings or lm_head) as block FP8 e4m3 + weight_scale_inv, as Qwen3-*-FP8 ships. The returned
transformers model holds exactly the weights the checkpoint decodes to, so it is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoints import fp8_quant_config, logits_hooking, randomise, saved_by_transformers, store_fp8, write_checkpoint

# Tokenizer: the 256 byte tokens (GPT-2 byte-to-unicode alphabet, as Qwen's BPE uses), then
# Qwen's added tokens in Qwen's order. The model's vocabulary is exactly this long.
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
ADDED = ("<tool_call>", "</tool_call>", "<think>", "</think>")  # added, not special (as Qwen3)
VOCAB = 256 + len(SPECIAL) + len(ADDED)
ENDOFTEXT, IM_START, IM_END = 256, 257, 258

TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
    num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=ENDOFTEXT, eos_token_id=IM_END,
)

# Named shapes: GQA ratio 4 and 8, 128 experts, a dense layer, tied / untied, sparse step.
CASES = {
    "e64_gqa4": {},
    "e128_gqa8_tied": dict(num_experts=128, num_key_value_heads=1, tie_word_embeddings=True),
    "dense_layer_no_norm": dict(mlp_only_layers=[1], norm_topk_prob=False, num_experts_per_tok=4),
    "sparse_step2_bias": dict(decoder_sparse_step=2, num_hidden_layers=4, attention_bias=True,
                              num_key_value_heads=4, rope_theta=1e6),
}

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def hf_config(case: str = "e64_gqa4", **overrides):
    from transformers import Qwen3MoeConfig

    kw = dict(TINY)
    kw.update(CASES[case])
    kw.update(overrides)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")} \
        if "rope_parameters" not in kw else kw["rope_parameters"]
    cfg = Qwen3MoeConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def _shipped_spelling(cfg_json: dict) -> dict:
    """transformers 5's saved config.json -> the spelling Qwen's checkpoints ship."""
    out = {k: v for k, v in cfg_json.items() if k not in ("num_local_experts", "rope_parameters")}
    out["architectures"] = ["Qwen3MoeForCausalLM"]
    out["num_experts"] = cfg_json["num_local_experts"]
    rp = dict(cfg_json["rope_parameters"])
    out["rope_theta"] = rp.pop("rope_theta")
    rtype = rp.pop("rope_type", "default")
    out["rope_scaling"] = None if rtype == "default" else dict(rp, rope_type=rtype)
    out["max_window_layers"] = cfg_json["num_hidden_layers"]
    out["sliding_window"] = None
    out["torch_dtype"] = "bfloat16"
    return out


def build(tmp_path, case: str = "e64_gqa4", seed: int = 0, variant: str = "plain", shards: int = 2,
          spelling: str = "shipped", tokenizer: bool = True, fp8_block=(16, 16), **overrides):
    """-> (checkpoint dir, transformers reference model in fp32 eval mode)."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(hf_config(case, **overrides)).eval()
    randomise(model, seed, bias_std=0.1)
    with torch.no_grad():  # bf16 values, as Qwen ships: the CPU engine's bf16 experts hold them exactly
        for prm in model.parameters():
            prm.copy_(prm.bfloat16().float())
    path = Path(tmp_path) / f"qwen3-{case}-{variant}-{seed}"
    path.mkdir(parents=True, exist_ok=True)
    cfg_json, tensors = saved_by_transformers(model, path)
    tensors = {k: t.bfloat16() for k, t in tensors.items()}  # exact (rounded above)
    if not any(".mlp.experts.0.gate_proj.weight" in n for n in tensors):
        raise AssertionError("transformers no longer saves one tensor per expert; fix this builder")

    if variant == "fp8":
        store_fp8(model, tensors, fp8_block, lambda n: n.endswith("proj.weight"))
        cfg_json["quantization_config"] = fp8_quant_config(fp8_block)
    elif variant != "plain":
        raise ValueError(f"unknown variant {variant!r}")

    if spelling == "shipped":
        cfg_json = _shipped_spelling(cfg_json)
    write_checkpoint(path, cfg_json, tensors, shards)
    if tokenizer:
        add_tokenizer(path)
    return path, model


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def add_tokenizer(path: Path) -> None:
    """Byte-level BPE (no merges: one token per byte, so any text round-trips) + Qwen's added
    tokens, a Qwen-style tokenizer_config.json and generation_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_tokens = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB or tok.token_to_id("<|im_end|>") != IM_END:
        raise AssertionError("tokenizer layout drifted from VOCAB / IM_END")
    tok.save(str(Path(path) / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": t in SPECIAL, "normalized": False,
                                         "lstrip": False, "rstrip": False, "single_word": False}
             for t in (*SPECIAL, *ADDED)}
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 512, "tokenizer_class": "Qwen2Tokenizer",
        "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
    }, indent=1))
    (Path(path) / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT], "pad_token_id": ENDOFTEXT,
        "do_sample": False,
    }, indent=1))


def _byte_of(ch: str) -> int:
    """GPT-2's bytes_to_unicode, inverted: printable Latin-1 bytes map to themselves, the other
    bytes to 256 + their rank among them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def reference_logits(model, ids: torch.Tensor, tie_eps: float = 1e-3):
    """transformers logits [T, Vocab] for one sequence, and near_tie [T] bool: positions where,
    in any MoE layer, the K-th and (K+1)-th router logits are within tie_eps (softmax keeps the
    order, so this is the same choice in probabilities). There the runtimes may legitimately
    route differently."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    ties = torch.zeros(ids.shape[-1], dtype=torch.bool)

    def hook(router, args, _out):
        x = args[0].reshape(-1, router.hidden_dim).float()
        top = (x @ router.weight.float().T).sort(-1, descending=True)[0]
        ties.logical_or_(top[:, router.top_k - 1] - top[:, router.top_k] < tie_eps)

    return logits_hooking(model, ids, Qwen3MoeTopKRouter, hook), ties
