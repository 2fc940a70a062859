"""The embedded demo model (hybrid/demo_model/): files, architecture, tokenizer, chat format, and
that transformers' reference implementation loads it and writes text.

The checkpoint is made by scripts/train_demo.py. These tests check the shipped artefact, so they
need no training; each model load takes well under a second (10 M parameters).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

import hybrid

DEMO = Path(hybrid.__file__).resolve().parent / "demo_model"

# Kimi K2's special tokens, in the id order the demo tokenizer gives them (0..14).
SPECIAL = ["[BOS]", "[EOS]", "[PAD]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>",
           "<|im_system|>", "<|im_middle|>", "<|tool_calls_section_begin|>",
           "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>",
           "<|tool_call_end|>", "<think>", "</think>"]

TOOLS = [{"type": "function", "function": {
    "name": "python_help", "description": "Return the documentation of a Python name.",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                   "required": ["name"]}}}]

# A conversation touching every branch of the template: system, earlier assistant turn (its
# reasoning is dropped), a tool call with reasoning after the last user turn, a tool result.
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello.", "reasoning_content": "old reasoning"},
    {"role": "user", "content": "Docs for json?"},
    {"role": "assistant", "content": "", "reasoning_content": "Look it up.",
     "tool_calls": [{"id": "functions.python_help:0", "type": "function",
                     "function": {"name": "python_help", "arguments": '{"name": "json"}'}}]},
    {"role": "tool", "tool_call_id": "functions.python_help:0", "content": "JSON encoder"},
]

EXPECTED_CONVERSATION = (
    "<|im_system|>tool_declare<|im_middle|>" + json.dumps(TOOLS, ensure_ascii=False) + "<|im_end|>"
    "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
    "<|im_user|>user<|im_middle|>Hi<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think></think>Hello.<|im_end|>"
    "<|im_user|>user<|im_middle|>Docs for json?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think>Look it up.</think>"
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.python_help:0"
    '<|tool_call_argument_begin|>{"name": "json"}<|tool_call_end|><|tool_calls_section_end|>'
    "<|im_end|>"
    "<|im_system|>tool<|im_middle|>## Return of functions.python_help:0\nJSON encoder<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think>"
)

DEFAULT_SYSTEM = "You are a helpful assistant that answers questions about Python."


def _config() -> dict:
    return json.loads((DEMO / "config.json").read_text())


def _looks_like_text(s: str) -> tuple[bool, str]:
    """Readable English-ish text: mostly ASCII, several distinct words, no single-word loop."""
    words = re.findall(r"[A-Za-z]{2,}", s)
    if not s:
        return False, "empty"
    ascii_frac = sum(c.isascii() for c in s) / len(s)
    if ascii_frac < 0.95:
        return False, f"only {ascii_frac:.0%} ASCII"
    if len(words) < 8:
        return False, f"only {len(words)} words"
    if len(set(words)) < 5:
        return False, f"only {len(set(words))} distinct words"
    top, n = Counter(words).most_common(1)[0]
    if n > 0.4 * len(words):
        return False, f"{top!r} is {n} of {len(words)} words"
    return True, ""


# ---- files and architecture ----------------------------------------------------------------

def test_shipped_files_exist_and_are_small():
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md"]:
        assert (DEMO / name).is_file(), f"{DEMO / name} is missing"
    total = sum(f.stat().st_size for f in DEMO.iterdir() if f.is_file())
    assert total < 20e6, f"{DEMO} is {total / 1e6:.1f} MB, over the 20 MB budget"


def test_config_is_kimi_k25_architecture():
    cfg = _config()
    assert cfg["model_type"] == "deepseek_v3"
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["n_routed_experts"] >= 32
    assert 1 < cfg["num_experts_per_tok"] < cfg["n_routed_experts"]
    assert cfg["n_shared_experts"] == 1
    assert cfg["first_k_dense_replace"] == 1 and cfg["num_hidden_layers"] >= 3
    assert cfg["q_lora_rank"] and cfg["kv_lora_rank"]  # MLA with both low-rank paths
    assert cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"
    assert cfg["norm_topk_prob"] is True and cfg["routed_scaling_factor"] > 1
    assert cfg.get("rope_scaling") is None  # YaRN off
    # Dimensions INT4 group-32 packing needs (hybrid converts the experts to Kimi's format).
    assert cfg["hidden_size"] % 32 == 0 and cfg["moe_intermediate_size"] % 32 == 0
    assert cfg["vocab_size"] >= len(SPECIAL)


def test_weights_are_per_expert_bf16_with_fp32_router_bias():
    import torch
    from safetensors import safe_open

    cfg = _config()
    with safe_open(DEMO / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        for layer in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}.mlp"
            for e in range(cfg["n_routed_experts"]):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    assert f"{p}.experts.{e}.{proj}.weight" in keys, f"{p}.experts.{e}.{proj}"
            w = f.get_tensor(f"{p}.experts.0.gate_proj.weight")
            assert w.dtype == torch.bfloat16
            assert tuple(w.shape) == (cfg["moe_intermediate_size"], cfg["hidden_size"])
            bias = f.get_tensor(f"{p}.gate.e_score_correction_bias")
            assert bias.dtype == torch.float32 and bias.shape == (cfg["n_routed_experts"],)
            # Trained with aux-loss-free balancing: the bias moved away from its zero init.
            assert bias.abs().max() > 0, f"{p}.gate.e_score_correction_bias is all zero"
        assert "model.layers.0.mlp.gate_proj.weight" in keys  # layer 0 is dense
        assert "lm_head.weight" in keys


# ---- tokenizer and chat template -------------------------------------------------------------

def test_special_tokens_have_fixed_ids_and_encode_as_one_token():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    for i, s in enumerate(SPECIAL):
        assert tok.token_to_id(s) == i, s
        assert tok.encode(s).ids == [i], s
    cfg = _config()
    assert cfg["bos_token_id"] == 0 and cfg["eos_token_id"] == 1
    gen = json.loads((DEMO / "generation_config.json").read_text())
    assert SPECIAL.index("<|im_end|>") in gen["eos_token_id"]


@pytest.mark.parametrize("text", [
    "def split(self, sep=None, maxsplit=-1):\n    return [s.strip() for s in x]\n",
    "Explain the with statement.  Tabs\tand   spaces, émigré, 数字, 🙂",
    "<|im_user|>user<|im_middle|>What does len do?<|im_end|>",
    "",
])
def test_tokenizer_round_trips(text):
    from hybrid.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO)
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_chat_template_renders_kimi_format():
    from hybrid.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO)
    assert tok.apply_chat_template(CONVERSATION, tools=TOOLS) == EXPECTED_CONVERSATION
    user = [{"role": "user", "content": "What does len do?"}]
    head = (f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>"
            "<|im_user|>user<|im_middle|>What does len do?<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>")
    assert tok.apply_chat_template(user, thinking=True) == head + "<think>"
    assert tok.apply_chat_template(user, thinking=None) == head + "<think>"
    assert tok.apply_chat_template(user, thinking=False) == head + "<think></think>"
    assert tok.apply_chat_template(user, add_generation_prompt=False) == head[:-len(
        "<|im_assistant|>assistant<|im_middle|>")]


def test_transformers_tokenizer_renders_the_same_prompt():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(DEMO)
    text = hf.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False,
                                  add_generation_prompt=True)
    assert text == EXPECTED_CONVERSATION


# ---- the model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import DeepseekV3ForCausalLM

    model, info = DeepseekV3ForCausalLM.from_pretrained(DEMO, dtype=torch.float32,
                                                        output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    return model.eval()


def _greedy(model, prompt_ids, n):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=[SPECIAL.index("<|im_end|>"), SPECIAL.index("[EOS]")],
                             pad_token_id=SPECIAL.index("[PAD]"))
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("question", ["What does str.split do?", "Explain the with statement."])
def test_transformers_greedy_chat_answer_is_readable(hf_model, question):
    from hybrid.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO)
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], thinking=False)
    new = _greedy(hf_model, tok.encode(prompt), 60)
    answer = tok.decode(new, skip_special_tokens=True)
    ok, why = _looks_like_text(answer)
    assert ok, f"greedy answer to {question!r} is not readable ({why}): {answer!r}"


def test_router_has_skewed_expert_preferences(hf_model):
    """A pass over real text: in each MoE layer some experts are picked far more than others
    (random routers pick near-uniformly). This skew is what the planner's cache exploits."""
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from hybrid.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO)
    text = "\n\n".join(f.__doc__ for f in (str.split, dict.get, len, sorted, open, zip, range))
    ids = torch.tensor([tok.encode(text)[:512]])
    routers = [m for m in hf_model.modules() if isinstance(m, DeepseekV3TopkRouter)]
    counts = []
    hooks = [r.register_forward_hook(lambda m, i, o: counts.append(
        torch.bincount(o[2].reshape(-1), minlength=m.num_experts))) for r in routers]
    try:
        with torch.no_grad():
            hf_model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(counts) == len(routers) >= 2
    e, k = routers[0].num_experts, routers[0].top_k
    for layer, c in enumerate(counts, start=1):
        top = c.sort(descending=True).values.double()
        share = (top[:k].sum() / top.sum()).item()
        # Uniform routing gives k/e (0.125 for 8 of 64); demand clearly more.
        assert share > 1.5 * k / e, f"MoE layer {layer}: top-{k} experts take only {share:.1%}"


def test_hybrid_load_matches_transformers_logits(hf_model):
    """hybrid.load(None) is the demo model, and its fp32 reference path computes what
    transformers computes (same bf16 weights, both upcast to fp32)."""
    import torch

    from hybrid.tokenizer import load_tokenizer

    model = hybrid.load(None, dtype=torch.float32, progress=False)
    assert Path(model.path).resolve() == DEMO
    tok = load_tokenizer(DEMO)
    ids = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What does str.split do?"}], thinking=False))
    ours = model.logits(ids)  # [T, V] fp32
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    err = (ours.cpu() - ref).abs().max().item()
    assert err < 1e-3, f"max |hybrid - transformers| logit difference {err:.2e} (tolerance 1e-3)"
