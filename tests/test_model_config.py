"""config.json parsing: model types, both RoPE spellings, YaRN softmax scale, quantisation
configs, and clear errors/warnings naming fields."""

import math
import warnings

import pytest

from hybrid.config import ConfigError, ModelConfig
from hybrid.models.spec import KIMI_K25_CONFIG as KIMI_K25


def test_kimi_k2_old_spelling():
    c = ModelConfig.from_dict(KIMI_K25)
    assert c.model_type == "kimi_k2" and c.tensor_prefix == ""
    assert c.rope.rope_type == "yarn" and c.rope.factor == 64.0 and c.rope.theta == 50000.0
    assert c.rope.original_max_position_embeddings == 4096
    m = 0.1 * 1.0 * math.log(64.0) + 1.0  # mscale(factor, mscale_all_dim)
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * m * m)
    assert c.latent_width == 576 and c.qk_head_dim == 192


def test_kimi_k25_wrapper_reads_text_config():
    raw = {"model_type": "kimi_k25", "text_config": dict(KIMI_K25, model_type="deepseek_v3"),
           "vision_config": {"depth": 27}, "media_placeholder_token_id": 163605,
           "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                   "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int",
                                                                        "symmetric": True, "strategy": "group",
                                                                        "group_size": 32}}}}}
    c = ModelConfig.from_dict(raw)
    assert c.model_type == "kimi_k25" and c.tensor_prefix == "language_model."
    assert c.quant.method == "compressed-tensors" and c.quant.group_size == 32
    assert c.n_routed_experts == 384


def test_new_spelling_and_default_rope():
    raw = dict(KIMI_K25)
    del raw["rope_scaling"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    c = ModelConfig.from_dict(raw)
    assert c.rope.rope_type == "default" and c.rope.theta == 1234.0
    assert c.softmax_scale == pytest.approx(192 ** -0.5)


def test_yarn_factor_derived_when_missing():
    raw = dict(KIMI_K25, rope_scaling={"type": "yarn", "original_max_position_embeddings": 4096})
    assert ModelConfig.from_dict(raw).rope.factor == 262144 / 4096


def test_unknown_fields_warn_with_names():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ModelConfig.from_dict(dict(KIMI_K25, brand_new_knob=3))
    assert any("brand_new_knob" in str(x.message) for x in w)


@pytest.mark.parametrize("patch,msg", [
    ({"model_type": "qwen3_moe"}, "model_type 'qwen3_moe' is not supported"),
    ({"topk_method": "greedy"}, "topk_method='greedy' is not supported"),
    ({"moe_layer_freq": 2}, "moe_layer_freq=2 is not supported"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8 must equal num_attention_heads"),
    ({"topk_group": 3, "n_group": 2}, "topk_group=3 must be in 1..n_group=2"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}},
     "fmt 'e5m2' is not supported"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}},
     "format 'float-quantized' is not supported"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                              "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                                                  "strategy": "group", "group_size": 32}}}}},
     "num_bits=8 is not supported"),
])
def test_unsupported_values_name_the_field(patch, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_dict(dict(KIMI_K25, **patch))


def test_kimi_k25_without_text_config():
    with pytest.raises(ConfigError, match="needs a 'text_config' object"):
        ModelConfig.from_dict({"model_type": "kimi_k25"})


@pytest.mark.parametrize("patch,msg", [
    ({"hidden_size": True}, "hidden_size=True must be a positive integer"),
    ({"rms_norm_eps": "x"}, "field rms_norm_eps='x' must be a positive number"),
    ({"max_position_embeddings": 0}, "field max_position_embeddings=0 must be a positive integer"),
    ({"eos_token_id": 163840}, r"field eos_token_id=163840 must be a token id in 0\.\.163839"),
    ({"eos_token_id": [1, -2]}, "field eos_token_id=.* must be a token id"),
    ({"bos_token_id": 10**9}, "field bos_token_id=1000000000 must be a token id"),
    ({"routed_scaling_factor": -1}, "field routed_scaling_factor=-1 must be a positive number"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 4096}},
     "rope factor=0.5 must be a number >= 1"),
    ({"rope_theta": "big"}, "rope_theta='big' must be a number > 1"),
    # found by the fuzz corpus (tests/fuzz): each was a TypeError, or a silent flip of meaning
    ({"model_type": ["deepseek_v3"]}, r"model_type \['deepseek_v3'\] is not supported"),
    ({"n_shared_experts": {"value": 1}}, r"field n_shared_experts=\{'value': 1\} must be a non-negative integer"),
    ({"tie_word_embeddings": "false"}, "field tie_word_embeddings='false' must be true or false"),
    ({"norm_topk_prob": 1}, "field norm_topk_prob=1 must be true or false"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": "32"}},
     "rope beta_fast='32' must be a number or absent"),
])
def test_bad_values_are_refused_naming_the_field(patch, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_dict(dict(KIMI_K25, **patch), source="ckpt/config.json")


def test_odd_but_legal_values_warn():
    with pytest.warns(UserWarning, match="max_position_embeddings=1000000000000 is unusually large"):
        ModelConfig.from_dict(dict(KIMI_K25, max_position_embeddings=10**12))
    with pytest.warns(UserWarning, match="YaRN rope parameters have no factor"):
        c = ModelConfig.from_dict(dict(KIMI_K25, rope_scaling={"type": "yarn", "original_max_position_embeddings": 4096}))
    assert c.rope.factor == 64.0
