"""Tiny GGUF files for the loader tests, written with the gguf package's own writer.

  deepseek2_gguf(tmp_path, out="f32")  -> (gguf path, safetensors checkpoint, transformers model)
      a tiny DeepSeek-V3 checkpoint (tests/checkpoints.py) with a byte-level BPE tokenizer, written
      by `hybrid convert --to gguf` (metadata and names as llama.cpp's converter writes them)
  rewrite(src, dst, ...)  copy a GGUF, changing metadata and tensors (kv_b form, expert types,
      a split set, missing keys)
  twin(gguf, ref, tmp_path)  -> a safetensors checkpoint holding exactly the GGUF's dequantised
      values (the inverse of llama.cpp's names, written here independently of hybrid's loader)
  qwen3moe_gguf(tmp_path)  -> (gguf path, safetensors checkpoint, transformers model)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import checkpoints

VOCAB = 320  # > 256 so a byte-level BPE fits


SPECIALS = ("<s>", "</s>", "<|im_end|>")
# Kimi K2.5's media tokens, placed so that <|media_pad|> is tests/checkpoints_vision.py's placeholder (5)
MEDIA_SPECIALS = SPECIALS + ("<|media_begin|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")


def add_bpe_tokenizer(path: Path, template: str | None = None, specials=SPECIALS):
    """A trained byte-level BPE tokenizer.json (specials first: <s> = 0, </s> = 1) and its
    tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello there! 123 456"] * 40
    tok.train_from_iterator(text, trainer)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>"}
    if template is not None:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


def deepseek2_gguf(tmp_path, out: str = "f32", template: str | None = None, **overrides):
    from hybrid.convert.gguf_export import convert_to_gguf

    overrides.setdefault("vocab_size", VOCAB)
    path, ref = checkpoints.build(tmp_path, variant="plain", **overrides)
    add_bpe_tokenizer(path, template)
    dst = Path(tmp_path) / f"tiny-{out}.gguf"
    convert_to_gguf(path, dst, out, progress=False)
    return dst, path, ref


def rewrite(src: Path, dst: Path, drop=(), set_fields=None, tensors=None, split_max_tensors: int = 0) -> Path:
    """Copy GGUF `src` to `dst`. drop: metadata keys left out; set_fields: {key: (value, GGUFValueType)};
    tensors(list of (name, fp32 torch-order array or raw, ggml type)) -> the list to write."""
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch, split_max_tensors=split_max_tensors)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", *drop) or key in (set_fields or {}):
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vt, sub_type=sub)
    for key, (v, vt) in (set_fields or {}).items():
        w.add_key_value(key, v, vt)
    items = [(t.name, torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)),
              t.tensor_type) for t in r.tensors]
    if tensors is not None:
        items = tensors(items)
    for name, value, ty in items:
        arr = value.numpy() if isinstance(value, torch.Tensor) else value
        if arr.dtype == np.uint8:  # raw blocks, written as they are
            w.add_tensor(name, arr, raw_dtype=ty)
        elif ty == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif ty == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), ty), raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# Byte offsets of the fp16 super-block scales (d, dmin) in one block of each type (ggml's block
# layouts); everything else in a block is bits any value of which is valid.
SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
                 "IQ4_XS": (0,), "IQ4_NL": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,),
                 "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,), "Q8_0": (0,), "Q4_0": (0,)}


def random_blocks(type_name: str, shape: tuple[int, ...], std: float, seed: int) -> np.ndarray:
    """Valid random blocks of `type_name` for a tensor of `shape` (torch order): random bits, fp16
    scales set so the dequantised values have standard deviation about `std`. -> uint8 [..., row bytes]."""
    import gguf

    ty = gguf.GGMLQuantizationType[type_name]
    bs, bb = gguf.GGML_QUANT_SIZES[ty]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // bs * bb), dtype=np.uint8)
    blocks = raw.reshape(-1, bb)

    def set_scales(value: float):
        for off in SCALE_OFFSETS[type_name]:
            blocks[:, off:off + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)

    set_scales(1.0)
    s = float(np.std(gguf.quants.dequantize(raw, ty)))
    set_scales(std / s)
    return raw


def read_values(path: Path) -> dict[str, torch.Tensor]:
    """GGUF name -> fp32 torch-order tensor, by gguf's own reader and dequantiser (all split files)."""
    import gguf

    files = sorted(path.parent.glob(path.name.replace("-00001-of-", "-*-of-"))) if "-00001-of-" in path.name else [path]
    out = {}
    for p in files:
        for t in gguf.GGUFReader(str(p)).tensors:
            out[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    return out


def twin(gguf_path: Path, ref, cfg: dict, tmp_path: Path, name: str = "twin") -> Path:
    """A safetensors checkpoint of `ref`'s architecture whose weights are the GGUF's values."""
    v = read_values(gguf_path)
    Nh, C, Dn, Dv = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    sd = {k: t.detach().clone() for k, t in ref.state_dict().items()}
    new = {"model.embed_tokens.weight": v["token_embd.weight"], "model.norm.weight": v["output_norm.weight"]}
    if "output.weight" in v:
        new["lm_head.weight"] = v["output.weight"]
    attn = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
            "self_attn.q_a_proj.weight": "attn_q_a", "self_attn.q_a_layernorm.weight": "attn_q_a_norm",
            "self_attn.q_b_proj.weight": "attn_q_b", "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa",
            "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm", "self_attn.o_proj.weight": "attn_output",
            "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
            "mlp.gate.weight": "ffn_gate_inp", "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp",
            "mlp.shared_experts.up_proj.weight": "ffn_up_shexp",
            "mlp.shared_experts.down_proj.weight": "ffn_down_shexp"}
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}", f"blk.{i}"
        for hf, g in attn.items():
            if f"{b}.{g}.weight" in v:
                new[f"{p}.{hf}"] = v[f"{b}.{g}.weight"]
        if f"{b}.exp_probs_b.bias" in v:
            new[f"{p}.mlp.gate.e_score_correction_bias"] = v[f"{b}.exp_probs_b.bias"]
        if f"{b}.attn_kv_b.weight" in v:
            new[f"{p}.self_attn.kv_b_proj.weight"] = v[f"{b}.attn_kv_b.weight"]
        else:
            kv = torch.cat([v[f"{b}.attn_k_b.weight"].transpose(1, 2), v[f"{b}.attn_v_b.weight"]], dim=1)
            new[f"{p}.self_attn.kv_b_proj.weight"] = kv.reshape(Nh * (Dn + Dv), C)
        if f"{b}.ffn_gate_exps.weight" in v:
            new[f"{p}.mlp.experts.gate_up_proj"] = torch.cat([v[f"{b}.ffn_gate_exps.weight"],
                                                              v[f"{b}.ffn_up_exps.weight"]], dim=1)
            new[f"{p}.mlp.experts.down_proj"] = v[f"{b}.ffn_down_exps.weight"]
    missing = sorted(set(sd) - set(new))
    assert not missing, missing
    for k, t in new.items():
        assert sd[k].shape == t.shape, k
    ref.load_state_dict(new)
    path = Path(tmp_path) / name
    path.mkdir(parents=True, exist_ok=True)
    cfg_json, tensors = checkpoints.saved_by_transformers(ref, path)
    checkpoints.write_checkpoint(path, cfg_json, tensors, shards=1)
    return path


def kv_b_form(items, cfg: dict):
    """The older converter's MLA form: one attn_kv_b [Nh*(Dn+Dv), C] per layer instead of k_b / v_b."""
    Nh, C, Dn, Dv = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    by = {n: (t, ty) for n, t, ty in items}
    out = []
    for n, t, ty in items:
        if n.endswith(".attn_v_b.weight"):
            continue
        if n.endswith(".attn_k_b.weight"):
            v = by[n.replace("attn_k_b", "attn_v_b")][0]
            kv = torch.cat([t.transpose(1, 2), v], dim=1).reshape(Nh * (Dn + Dv), C)
            out.append((n.replace("attn_k_b", "attn_kv_b"), kv.contiguous(), ty))
            continue
        out.append((n, t, ty))
    return out


def qwen3moe_gguf(tmp_path, seed: int = 0):
    """A tiny Qwen3-MoE checkpoint (tests/checkpoints_qwen3.py) written as a qwen3moe GGUF (f32)."""
    import gguf
    import checkpoints_qwen3

    path, ref = checkpoints_qwen3.build(tmp_path, seed=seed, shards=1)
    c = ref.config
    sd = {k: t.detach().float() for k, t in ref.state_dict().items()}
    dst = Path(tmp_path) / "tiny-qwen3moe.gguf"
    w = gguf.GGUFWriter(str(dst), "qwen3moe")
    a = "qwen3moe"
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_uint32(f"{a}.vocab_size", c.vocab_size)
    tokens = [f"[PAD{i}]" for i in range(c.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["[ P"])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp"}
        for hf, g in names.items():
            w.add_tensor(f"{b}.{g}.weight", sd[f"{p}.{hf}.weight"].numpy())
        I = c.moe_intermediate_size
        gate_up = sd[f"{p}.mlp.experts.gate_up_proj"]
        w.add_tensor(f"{b}.ffn_gate_exps.weight", gate_up[:, :I].contiguous().numpy())
        w.add_tensor(f"{b}.ffn_up_exps.weight", gate_up[:, I:].contiguous().numpy())
        w.add_tensor(f"{b}.ffn_down_exps.weight", sd[f"{p}.mlp.experts.down_proj"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst, path, ref
