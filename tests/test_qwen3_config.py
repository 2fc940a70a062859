"""Qwen3-MoE config.json parsing (both spellings, transformers' dense/MoE layer rule, clear
errors naming the file and field) and the per-head K/V cache."""

import warnings

import pytest
import torch

from hybrid.config import ConfigError
from hybrid.models.head_kv_cache import HeadKVCache
from hybrid.models.qwen3_moe_config import Qwen3MoeConfig

# Qwen3-30B-A3B's config.json as shipped.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}


def _parse(**changes):
    raw = dict(QWEN3_30B_A3B)
    for k, v in changes.items():
        if v is _DROP:
            raw.pop(k, None)
        else:
            raw[k] = v
    return Qwen3MoeConfig.from_dict(raw, source="ckpt/config.json")


_DROP = object()


def test_shipped_config_parses_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = _parse()
    assert (c.num_experts, c.n_routed_experts, c.num_experts_per_tok) == (128, 128, 8)
    assert c.head_dim == 128 and c.num_key_value_groups == 8 and c.softmax_scale == 128 ** -0.5
    assert c.rope.rope_type == "default" and c.rope.theta == 1e6
    assert c.tensor_prefix == "" and c.quant is None and c.eos_token_ids == [151645]
    assert c.moe_layers == tuple(range(48)) and c.norm_topk_prob
    assert HeadKVCache.bytes_per_token_for(c, torch.bfloat16) == 48 * 2 * 4 * 128 * 2  # 96 KB


def test_transformers5_spelling_is_the_same_config():
    raw = dict(QWEN3_30B_A3B)
    raw["num_local_experts"] = raw.pop("num_experts")
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.pop("rope_theta")}
    del raw["rope_scaling"]
    assert Qwen3MoeConfig.from_dict(raw) == _parse()


def test_defaults_follow_transformers():
    from transformers import Qwen3MoeConfig as HF

    c = _parse(head_dim=_DROP, norm_topk_prob=_DROP, rope_theta=_DROP, max_position_embeddings=_DROP,
               rms_norm_eps=_DROP, decoder_sparse_step=_DROP, mlp_only_layers=_DROP, tie_word_embeddings=_DROP)
    hf = HF(hidden_size=2048, num_attention_heads=32)
    assert c.head_dim == 2048 // 32 == getattr(hf, "head_dim", 2048 // 32)
    assert c.norm_topk_prob == hf.norm_topk_prob and c.rope.theta == hf.rope_parameters["rope_theta"]
    assert c.max_position_embeddings == hf.max_position_embeddings and c.rms_norm_eps == hf.rms_norm_eps
    assert c.tie_word_embeddings == hf.tie_word_embeddings and c.mlp_only_layers == ()


@pytest.mark.parametrize("step,dense", [(1, []), (2, []), (1, [0, 3]), (3, [2, 4])])
def test_moe_layers_follow_transformers_rule(step, dense):
    from transformers import Qwen3MoeConfig as HF
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeSparseMoeBlock

    L = 6
    c = _parse(num_hidden_layers=L, decoder_sparse_step=step, mlp_only_layers=dense)
    hf = HF(vocab_size=16, hidden_size=8, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=L,
            num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2,
            decoder_sparse_step=step, mlp_only_layers=dense)
    want = [isinstance(Qwen3MoeDecoderLayer(hf, i).mlp, Qwen3MoeSparseMoeBlock) for i in range(L)]
    assert [c.is_moe_layer(i) for i in range(L)] == want


def test_yarn_rope_scaling():
    c = _parse(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert c.rope.rope_type == "yarn" and c.rope.factor == 4.0 and c.rope.theta == 1e6
    assert c.rope.original_max_position_embeddings == 32768


def test_fp8_quantization_config():
    c = _parse(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [128, 128]})
    assert c.quant.method == "fp8" and c.quant.block_size == (128, 128)


@pytest.mark.parametrize("changes,match", [
    (dict(hidden_size=_DROP), r"ckpt/config.json: missing required field\(s\) hidden_size"),
    (dict(num_experts=_DROP), r"missing required field\(s\) num_experts"),
    (dict(num_key_value_heads=0), r"field num_key_value_heads=0 must be a positive integer"),
    (dict(num_key_value_heads=5), r"field num_key_value_heads=5 must divide num_attention_heads=32"),
    (dict(vocab_size="big"), r"field vocab_size='big' must be a positive integer"),
    (dict(head_dim=7), r"field head_dim=7 must be a positive even integer"),
    (dict(num_experts_per_tok=129), r"field num_experts_per_tok=129 exceeds num_experts=128"),
    (dict(hidden_act="gelu"), r"field hidden_act='gelu' is not supported"),
    (dict(use_sliding_window=True), r"field use_sliding_window=True is not supported"),
    (dict(decoder_sparse_step=0), r"field decoder_sparse_step=0 must be a positive integer"),
    (dict(mlp_only_layers=[48]), r"field mlp_only_layers=\[48\] must be a list of layer indices in 0..47"),
    (dict(num_local_experts=64), r"fields num_experts=128 and num_local_experts=64 disagree"),
    (dict(eos_token_id="x"), r"field eos_token_id='x' must be a token id"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope type 'dynamic' is not supported"),
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), r"quant_method 'awq' is not supported"),
    (dict(model_type="qwen2_moe"), r"model_type 'qwen2_moe' is not 'qwen3_moe'"),
])
def test_errors_name_file_and_field(changes, match):
    with pytest.raises(ConfigError, match=match):
        _parse(**changes)


def test_unknown_fields_warn():
    with pytest.warns(UserWarning, match="ignoring unknown config field.*shiny_new_knob"):
        c = _parse(shiny_new_knob=1)
    assert c.extra == {"shiny_new_knob": 1}


# ---- the per-head K/V cache -------------------------------------------------------------------
def _small():
    return _parse(num_hidden_layers=2, num_key_value_heads=2, head_dim=4, num_attention_heads=4)


def test_cache_write_rows_and_sizes():
    c = _small()
    cache = HeadKVCache(c, num_slots=3, max_len=8, dtype=torch.float32)
    assert cache.nbytes == 2 * 2 * 3 * 2 * 8 * 4 * 4 and cache.bytes_per_token == 2 * 2 * 2 * 4 * 4
    slots, pos = torch.tensor([2, 2, 0]), torch.tensor([0, 1, 5])
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    cache.write(1, slots, pos, k, v)
    rk, rv = cache.rows(1, torch.tensor([0, 2]), 6)  # [U, nkv, L, D]
    assert rk.shape == (2, 2, 6, 4)
    assert torch.equal(rk[1, :, 0], k[0]) and torch.equal(rk[1, :, 1], k[1]) and torch.equal(rv[0, :, 5], v[2])
    one_k, _ = cache.rows(1, torch.tensor([2]), 2, one_slot=2)
    assert one_k.data_ptr() == cache.k[1][2].data_ptr() and torch.equal(one_k[0, :, :2], rk[1, :, :2])
    assert torch.count_nonzero(cache.k[0]) == 0  # other layers untouched
    cache.reset(2)
    assert torch.count_nonzero(cache.k[1][2]) == 0 and torch.equal(cache.v[1][0, :, 5], v[2])


def test_cache_errors():
    c = _small()
    with pytest.raises(ValueError, match="num_slots must be positive"):
        HeadKVCache(c, 0, 8)
    with pytest.raises(ValueError, match="max_len must be positive"):
        HeadKVCache(c, 1, 0)
    cache = HeadKVCache(c, 2, 8)
    with pytest.raises(IndexError, match=r"slots must be in 0..1, got 0..2"):
        cache.check(torch.tensor([0, 2]), torch.tensor([0, 0]))
    with pytest.raises(IndexError, match=r"positions must be in 0..7 \(cache max_len 8\), got 3..8"):
        cache.check(torch.tensor([0, 1]), torch.tensor([3, 8]))
    with pytest.raises(IndexError, match="slot 5 out of range"):
        cache.reset(5)
