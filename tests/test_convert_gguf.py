"""`hybrid convert --to gguf`: the GGUF read back with gguf.GGUFReader holds every tensor of the
model under llama.cpp's deepseek2 names with the right shapes, values equal to the checkpoint's
(dequantised) weights after the documented transforms, the config as metadata, and a tokenizer
that round-trips.

The reference values come from the transformers model tests/checkpoints.py builds (it holds
exactly what the checkpoint decodes to), not from hybrid's loader, so the loader path is checked
too. Tolerances: f32 exact; f16 / bf16 = the reference rounded to that type, exact; q8_0 within
half a quantisation step per block of 32 (max|x|/127/2) plus the fp16 rounding of the scale.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import checkpoints

gguf = pytest.importorskip("gguf")

VOCAB = 320  # > 256 so a byte-level BPE fits


def _add_bpe_tokenizer(path):
    """A trained byte-level BPE tokenizer.json (<s> = 0, </s> = 1) and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello there! 123 456"] * 40
    tok.train_from_iterator(text, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return tok


def _convert(path, out_type, tmp_path, **kw):
    from hybrid.convert.gguf_export import convert_to_gguf

    out = tmp_path / f"{path.name}-{out_type}.gguf"
    convert_to_gguf(path, out, out_type, progress=False, **kw)
    return gguf.GGUFReader(str(out))


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(reader) -> dict[str, torch.Tensor]:
    """name -> fp32 tensor in torch (numpy) dimension order, decoded by gguf's own dequantiser."""
    out = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32))
    return out


def _expected(ref, cfg) -> dict[str, torch.Tensor]:
    """GGUF name -> reference value, written from the transformers model's own parameters."""
    sd = {k: v.detach().float() for k, v in ref.state_dict().items()}
    Nh, C, Dn, Dv = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    I = cfg["moe_intermediate_size"]
    exp = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.get("tie_word_embeddings"):
        exp["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}", f"blk.{i}"
        kv_b = sd[f"{p}.self_attn.kv_b_proj.weight"].view(Nh, Dn + Dv, C)
        exp.update({
            f"{b}.attn_norm.weight": sd[f"{p}.input_layernorm.weight"],
            f"{b}.ffn_norm.weight": sd[f"{p}.post_attention_layernorm.weight"],
            f"{b}.attn_q_a.weight": sd[f"{p}.self_attn.q_a_proj.weight"],
            f"{b}.attn_q_a_norm.weight": sd[f"{p}.self_attn.q_a_layernorm.weight"],
            f"{b}.attn_q_b.weight": sd[f"{p}.self_attn.q_b_proj.weight"],
            f"{b}.attn_kv_a_mqa.weight": sd[f"{p}.self_attn.kv_a_proj_with_mqa.weight"],
            f"{b}.attn_kv_a_norm.weight": sd[f"{p}.self_attn.kv_a_layernorm.weight"],
            f"{b}.attn_k_b.weight": kv_b[:, :Dn, :].transpose(1, 2),  # [Nh, C, Dn]
            f"{b}.attn_v_b.weight": kv_b[:, Dn:, :],  # [Nh, Dv, C]
            f"{b}.attn_output.weight": sd[f"{p}.self_attn.o_proj.weight"],
        })
        if i < cfg["first_k_dense_replace"]:
            for proj in ("gate", "up", "down"):
                exp[f"{b}.ffn_{proj}.weight"] = sd[f"{p}.mlp.{proj}_proj.weight"]
            continue
        gate_up = sd[f"{p}.mlp.experts.gate_up_proj"]  # [E, 2I, H]
        exp.update({
            f"{b}.ffn_gate_inp.weight": sd[f"{p}.mlp.gate.weight"],
            f"{b}.exp_probs_b.bias": sd[f"{p}.mlp.gate.e_score_correction_bias"],
            f"{b}.ffn_gate_exps.weight": gate_up[:, :I],
            f"{b}.ffn_up_exps.weight": gate_up[:, I:],
            f"{b}.ffn_down_exps.weight": sd[f"{p}.mlp.experts.down_proj"],
        })
        for proj in ("gate", "up", "down"):
            exp[f"{b}.ffn_{proj}_shexp.weight"] = sd[f"{p}.mlp.shared_experts.{proj}_proj.weight"]
    return exp


F32_ALWAYS = ("norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")


def _check_values(got, want, out_type):
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert tuple(g.shape) == tuple(w.shape), name
        kind = "f32" if name.endswith(F32_ALWAYS) else out_type
        if kind == "f32":
            assert torch.equal(g, w), name
        elif kind == "f16":
            assert torch.equal(g, w.half().float()), name
        elif kind == "bf16":
            assert torch.equal(g, w.bfloat16().float()), name
        else:  # q8_0
            blocks = w.reshape(-1, 32)
            amax = blocks.abs().amax(dim=1, keepdim=True)
            tol = amax * (0.5 / 127 + 2.0 ** -10) + 1e-12
            assert ((g.reshape(-1, 32) - blocks).abs() <= tol).all(), name


@pytest.mark.parametrize("variant", ["plain", "int4", "fp8", "kimi_k25"])
def test_values_and_shapes_f32(tmp_path, variant):
    path, ref = checkpoints.build(tmp_path, variant=variant, vocab_size=VOCAB)
    _add_bpe_tokenizer(path)
    reader = _convert(path, "f32", tmp_path)
    cfg = ref.config.to_dict()
    _check_values(_tensors(reader), _expected(ref, cfg), "f32")


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_storage_types(tmp_path, out_type):
    path, ref = checkpoints.build(tmp_path, variant="int4", vocab_size=VOCAB)
    _add_bpe_tokenizer(path)
    reader = _convert(path, out_type, tmp_path)
    want = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[out_type]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.ffn_down_exps.weight"] == want
    assert types["blk.1.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    _check_values(_tensors(reader), _expected(ref, ref.config.to_dict()), out_type)


def test_int4_experts_exact_in_f16(tmp_path):
    """A 4-bit integer times a bf16 scale fits f16's significand: the experts survive f16 exactly."""
    path, ref = checkpoints.build(tmp_path, variant="int4", vocab_size=VOCAB)
    _add_bpe_tokenizer(path)
    got = _tensors(_convert(path, "f16", tmp_path))
    gate_up = ref.model.layers[1].mlp.experts.gate_up_proj.detach().float()
    I = ref.config.moe_intermediate_size
    assert torch.equal(got["blk.1.ffn_gate_exps.weight"], gate_up[:, :I])


def test_metadata_matches_config(tmp_path):
    path, ref = checkpoints.build(tmp_path, variant="plain", vocab_size=VOCAB, rope_parameters=checkpoints.YARN)
    _add_bpe_tokenizer(path)
    r = _convert(path, "f32", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    a = "deepseek2."
    assert _field(r, "general.architecture") == "deepseek2"
    want = {
        "block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": cfg["num_attention_heads"], "attention.head_count_kv": 1,
        "expert_used_count": cfg["num_experts_per_tok"], "expert_count": cfg["n_routed_experts"],
        "expert_shared_count": cfg["n_shared_experts"], "expert_feed_forward_length": cfg["moe_intermediate_size"],
        "leading_dense_block_count": cfg["first_k_dense_replace"], "vocab_size": cfg["vocab_size"],
        "attention.q_lora_rank": cfg["q_lora_rank"], "attention.kv_lora_rank": cfg["kv_lora_rank"],
        "attention.key_length": cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"],
        "attention.value_length": cfg["kv_lora_rank"],
        "attention.key_length_mla": cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"],
        "attention.value_length_mla": cfg["v_head_dim"], "rope.dimension_count": cfg["qk_rope_head_dim"],
        "expert_gating_func": 2, "expert_weights_norm": True, "expert_group_count": cfg["n_group"],
        "expert_group_used_count": cfg["topk_group"], "rope.scaling.type": "yarn",
        "rope.scaling.original_context_length": checkpoints.YARN["original_max_position_embeddings"],
    }
    for k, v in want.items():
        assert _field(r, a + k) == v, k
    approx = {
        "expert_weights_scale": cfg["routed_scaling_factor"], "attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
        "rope.freq_base": checkpoints.YARN["rope_theta"], "rope.scaling.factor": checkpoints.YARN["factor"],
        "rope.scaling.yarn_beta_fast": checkpoints.YARN["beta_fast"],
        "rope.scaling.yarn_beta_slow": checkpoints.YARN["beta_slow"],
        "rope.scaling.yarn_log_multiplier": 0.1 * checkpoints.YARN["mscale_all_dim"],
    }
    for k, v in approx.items():
        assert math.isclose(_field(r, a + k), v, rel_tol=1e-6), k


def test_bpe_tokenizer_round_trips(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path, _ = checkpoints.build(tmp_path, variant="plain", vocab_size=VOCAB)
    orig = _add_bpe_tokenizer(path)
    r = _convert(path, "f32", tmp_path)
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    merges = _field(r, "tokenizer.ggml.merges")
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == len(types) == VOCAB
    n = orig.get_vocab_size()
    assert tokens[:2] == ["<s>", "</s>"] and types[:2] == [3, 3]
    assert all(t == 1 for t in types[2:n]) and all(t == 5 for t in types[n:])
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, VOCAB)]
    assert _field(r, "tokenizer.ggml.bos_token_id") == 0 and _field(r, "tokenizer.ggml.eos_token_id") == 1
    rebuilt = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens[:n])}, [tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.decoder = decoders.ByteLevel()
    for text in ["the quick brown fox", "hello there, lazy dog! 123", "zebra ünïcode 🦙"]:
        ids = orig.encode(text).ids
        assert rebuilt.encode(text).ids == ids
        assert rebuilt.decode(ids) == text


def test_tiktoken_tokenizer(tmp_path):
    """Kimi's tiktoken.model: tokens spelled with GPT-2's byte table, merges recovered from the
    ranks, special tokens after the BPE vocabulary as control tokens."""
    from hybrid.convert.gguf_vocab import byte_to_unicode
    from hybrid.tokenizer import write_tiktoken_ranks

    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"  ": 258, b"\xc3\xa9": 259})
    n_base = len(ranks)
    vocab = n_base + 256  # Kimi reserves 256 special ids after the BPE vocabulary
    path, _ = checkpoints.build(tmp_path, variant="plain", vocab_size=vocab)
    write_tiktoken_ranks(ranks, path / "tiktoken.model")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "[BOS]", "eos_token": "[EOS]",
        "added_tokens_decoder": {str(n_base): {"content": "[BOS]", "special": True},
                                 str(n_base + 1): {"content": "[EOS]", "special": True}}}))
    r = _convert(path, "f32", tmp_path)
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert _field(r, "tokenizer.ggml.pre") == "kimi-k2"
    assert len(tokens) == vocab
    inverse = {ch: b for b, ch in byte_to_unicode().items()}
    for token, rank in ranks.items():
        assert bytes(inverse[ch] for ch in tokens[rank]) == token
        assert types[rank] == 1
    assert _field(r, "tokenizer.ggml.merges") == ["a b", "ab c", "Ġ Ġ", "Ã ©"]
    assert tokens[n_base : n_base + 3] == ["[BOS]", "[EOS]", f"<|reserved_token_{n_base + 2}|>"]
    assert types[n_base : vocab] == [3] * 256
    assert _field(r, "tokenizer.ggml.bos_token_id") == n_base


def test_rope_half_split_checkpoint_reordered(tmp_path):
    """rope_interleave=false stores rope dims half-split; llama.cpp rotates adjacent pairs, so the
    rope rows of q_b and kv_a are reordered (i, i + Dr/2) -> (2i, 2i + 1)."""
    path, ref = checkpoints.build(tmp_path, variant="plain", vocab_size=VOCAB, rope_interleave=False)
    _add_bpe_tokenizer(path)
    got = _tensors(_convert(path, "f32", tmp_path))
    c = ref.config
    Dn, Dr, C = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    attn = ref.model.layers[0].self_attn
    q_b = attn.q_b_proj.weight.detach().float().view(c.num_attention_heads, Dn + Dr, -1)
    rope = q_b[:, Dn:]  # [Nh, Dr, R]
    pairs = torch.stack([rope[:, : Dr // 2], rope[:, Dr // 2 :]], dim=2).reshape(rope.shape)
    assert torch.equal(got["blk.0.attn_q_b.weight"].view_as(q_b), torch.cat([q_b[:, :Dn], pairs], 1))
    kv_a = attn.kv_a_proj_with_mqa.weight.detach().float()
    r = kv_a[C:]
    assert torch.equal(got["blk.0.attn_kv_a_mqa.weight"][:C], kv_a[:C])
    assert torch.equal(got["blk.0.attn_kv_a_mqa.weight"][C:],
                       torch.stack([r[: Dr // 2], r[Dr // 2 :]], dim=1).reshape(r.shape))


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    path, ref = checkpoints.build(tmp_path, variant="plain", vocab_size=VOCAB, tie_word_embeddings=True)
    _add_bpe_tokenizer(path)
    names = {t.name for t in _convert(path, "f32", tmp_path).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


def test_cli_errors_are_clear(tmp_path, capsys):
    from hybrid.cli import main

    path, _ = checkpoints.build(tmp_path, variant="plain", vocab_size=VOCAB)
    checkpoints.add_tokenizer(path, VOCAB)  # word-level: not expressible as llama.cpp's gpt2 BPE
    assert main(["convert", str(path), "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "WordLevel" in err
    assert main(["convert", str(path), "--to", "gguf", "--out", str(tmp_path / "nodir" / "x.gguf")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()


def test_cli_writes_file(tmp_path, capsys):
    from hybrid.cli import main

    path, _ = checkpoints.build(tmp_path, variant="int4", vocab_size=VOCAB)
    _add_bpe_tokenizer(path)
    out = tmp_path / "m.gguf"
    assert main(["convert", str(path), "--to", "gguf", "--out", str(out), "--type", "q8_0"]) == 0
    r = gguf.GGUFReader(str(out))
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert "wrote" in capsys.readouterr().err


def test_int4_experts_repacked_exactly_as_q4_0(tmp_path):
    """--expert-type q4_0: GGUF Q4_0 decodes to exactly the checkpoint's INT4 experts (gguf's own
    dequantiser reads the blocks); everything else is --type."""
    path, ref = checkpoints.build(tmp_path, variant="int4", vocab_size=VOCAB)
    _add_bpe_tokenizer(path)
    reader = _convert(path, "bf16", tmp_path, expert_type="q4_0")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.1.ffn_up_shexp.weight"] == gguf.GGMLQuantizationType.BF16
    got, want = _tensors(reader), _expected(ref, ref.config.to_dict())
    for proj in ("gate", "up", "down"):
        name = f"blk.1.ffn_{proj}_exps.weight"
        assert torch.equal(got[name], want[name]), name


def test_q4_0_refused_for_non_int4_experts(tmp_path):
    from hybrid.convert.gguf_export import ConvertError

    path, _ = checkpoints.build(tmp_path, variant="plain", vocab_size=VOCAB)
    _add_bpe_tokenizer(path)
    with pytest.raises(ConvertError, match="expert-type q4_0"):
        _convert(path, "bf16", tmp_path, expert_type="q4_0")


def test_row_slices_cover_the_tensor():
    """Large tensors are encoded in row slices; the slices are the tensor, in order, each small."""
    from hybrid.convert.gguf_export import _row_slices, encode

    x = torch.randn(10, 64)
    parts = list(_row_slices(x, max_elems=150))
    assert [p.shape[0] for p in parts] == [2, 2, 2, 2, 2]
    assert torch.equal(torch.cat(parts), x)
    assert np.array_equal(np.concatenate([encode(p, "q8_0") for p in parts]), encode(x, "q8_0"))


def test_bpe_without_merges_is_refused(tmp_path):
    """llama.cpp's gpt2 tokenizer needs tokenizer.ggml.merges, and gguf cannot write an empty array."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from hybrid.convert.gguf_export import ConvertError

    path, _ = checkpoints.build(tmp_path, variant="plain", vocab_size=VOCAB)
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    with pytest.raises(ConvertError, match="no merges"):
        _convert(path, "f32", tmp_path)
