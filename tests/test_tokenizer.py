"""Tokenizers built in the test: a Kimi-style tiktoken.model + tokenizer_config.json, and a
tokenizer.json trained with the tokenizers library; plus chat template rendering."""

import json

import pytest

from hybrid.chat_template import ChatTemplateError
from hybrid.tokenizer import (TokenizerError, load_tokenizer, read_tiktoken_ranks,
                              write_tiktoken_ranks)

TEXTS = ["Hello, World! It's 2026.", "你好，世界。汉字abc", "naïve café 🙂🚀", "  spaces\n\nnew\tlines ",
         "x" * 50]


def kimi_dir(tmp_path, merges=(b"ab", b"a1", b"12"), extra_config=None, gen_config=None):
    ranks = {bytes([i]): i for i in range(256)}
    for j, m in enumerate(merges):
        ranks[m] = 256 + j
    write_tiktoken_ranks(ranks, tmp_path / "tiktoken.model")
    n = len(ranks)
    config = {"bos_token": "[BOS]", "eos_token": {"content": "[EOS]"},
              "added_tokens_decoder": {str(n): {"content": "[BOS]"}, str(n + 1): {"content": "[EOS]"},
                                       str(n + 3): {"content": "<|im_end|>"},
                                       str(n + 10): {"content": "<think>"}}}
    config.update(extra_config or {})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if gen_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(gen_config))
    return n


def test_tiktoken_roundtrip_and_specials(tmp_path):
    n = kimi_dir(tmp_path, gen_config={"eos_token_id": [7]})
    tok = load_tokenizer(tmp_path)
    assert tok.backend == "tiktoken" and tok.vocab_size == n + 256
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)
    assert tok.special_tokens["<|reserved_token_%d|>" % (n + 2)] == n + 2  # unnamed reserved id
    assert tok.encode("a<|im_end|>b") == [97, n + 3, 98]
    assert len(tok.encode("a<|im_end|>b", allow_special=False)) == 12
    assert tok.decode([n + 10]) == "<think>"
    assert tok.stop_token_ids == [7, n + 1, n + 3]  # eos, generation_config, im_end
    assert tok.encode_prompt("a") == [97]  # add_bos_token not set
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([n + 256])


def test_kimi_pretokenizer_regex_is_used(tmp_path):
    kimi_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("ab") == [256]  # merge applies inside a word
    # "a1" exists as a merge but the regex splits letters from digits: never produced
    assert tok.encode("a1") == [97, 49]
    assert tok.encode("123") == [257 + 1, 51]  # digits grouped up to three, then BPE "12"+"3"
    # a Han run is one piece, split from following Latin letters
    assert tok.decode(tok.encode("汉字ab")) == "汉字ab"
    assert tok.encode("汉字ab")[-1] == 256


def test_very_long_runs_are_cut_and_still_round_trip(tmp_path):
    kimi_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "ab" * 30_000 + " " * 26_000 + "x"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[:3] == [256, 256, 256]


def test_tiktoken_file_errors(tmp_path):
    (tmp_path / "tiktoken.model").write_bytes(b"YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"tiktoken.model:2"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "..")
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing")


def test_added_token_inside_bpe_range_is_rejected(tmp_path):
    kimi_dir(tmp_path, extra_config={"added_tokens_decoder": {"5": {"content": "<x>"}}})
    with pytest.raises(TokenizerError, match=r"<x>.*has id 5"):
        load_tokenizer(tmp_path)


def test_read_write_ranks_roundtrip(tmp_path):
    ranks = {b"\x00": 0, b"\xff": 1, "é".encode(): 2}
    write_tiktoken_ranks(ranks, tmp_path / "t.model")
    assert read_tiktoken_ranks(tmp_path / "t.model") == ranks


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20,
                           trainer)
    tk.save(str(d / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": template}))
    return d


def test_hf_tokenizer_roundtrip_and_specials(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert tok.backend == "hf"
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.bos_id == tok.token_to_id("<s>") and tok.eos_id == tok.token_to_id("</s>")
    end = tok.token_to_id("<|im_end|>")
    assert end in tok.stop_token_ids and tok.eos_id in tok.stop_token_ids
    ids = tok.encode("fox<|im_end|>dog")
    assert end in ids and tok.decode(ids) == "fox<|im_end|>dog"
    plain = tok.encode("fox<|im_end|>dog", allow_special=False)
    assert end not in plain and tok.decode(plain) == "fox<|im_end|>dog"
    assert tok.encode_prompt("fox")[0] == tok.bos_id
    assert tok.decode(tok.encode_prompt("fox"), skip_special_tokens=True) == "fox"


def test_hf_incremental_decoder_never_splits_characters(hf_dir):
    tok = load_tokenizer(hf_dir)
    text = "naïve 汉字 🙂🚀 ok"
    dec = tok.incremental_decoder()
    deltas = [dec.add(t) for t in tok.encode(text)] + [dec.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_lone_surrogates_become_replacement_characters_in_both_back_ends(hf_dir, tmp_path):
    # "a\ud800b" is what a client sends when it cuts a string inside an emoji: not encodable as
    # UTF-8. Both back ends encode it as "a\ufffdb"; a real pair (an emoji) is kept.
    kimi_dir(tmp_path)
    for tok in (load_tokenizer(hf_dir), load_tokenizer(tmp_path)):
        assert tok.encode("a\ud800b") == tok.encode("a\ufffdb"), tok.backend
        assert tok.decode(tok.encode("x\udc00\U0001F642\ud83d")) == "x\ufffd\U0001F642\ufffd"
        assert tok.encode_chat("<|im_end|>a\ud800", ["a\ud800"]) == tok.encode("<|im_end|>a\ufffd")


def test_checkpoint_chat_template_wins(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.has_own_chat_template
    assert tok.apply_chat_template(msgs) == "<s>[user]hi[assistant]"
    assert tok.apply_chat_template(msgs, tokenize=True) == tok.encode("<s>[user]hi[assistant]")
    # chat_template.jinja beside the tokenizer takes precedence over tokenizer_config.json
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((hf_dir / f).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    assert load_tokenizer(tmp_path).apply_chat_template(msgs) == "Jhi"


def test_kimi_fallback_template(tmp_path):
    kimi_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert not tok.has_own_chat_template
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by "
                   "Moonshot AI.<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|>"
                   "<|im_assistant|>assistant<|im_middle|><think>")
    instant = tok.apply_chat_template([{"role": "system", "content": "S"},
                                       {"role": "user", "content": [{"type": "text", "text": "q"}]}],
                                      thinking=False)
    assert instant == ("<|im_system|>system<|im_middle|>S<|im_end|><|im_user|>user<|im_middle|>q"
                       "<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>")


def test_kimi_fallback_tools_and_tool_calls(tmp_path):
    kimi_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "need tool",
         "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    ]
    out = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=False)
    assert out == (
        '<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather",'
        '"parameters":{"type":"object"}}}]<|im_end|>'
        "<|im_system|>system<|im_middle|>S<|im_end|>"
        "<|im_user|>user<|im_middle|>weather?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>need tool</think>"
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>'
        "<|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>")
    # reasoning of turns before the last user message is dropped
    hist = tok.apply_chat_template([{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b", "reasoning_content": "r"},
                                    {"role": "user", "content": "c"}], add_generation_prompt=False)
    assert "<think></think>b" in hist and "r</think>" not in hist


@pytest.mark.parametrize("messages,match", [
    ("hi", "messages must be a list"),
    ([{"content": "x"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content"),
    ([{"role": "tool", "content": "x"}], "tool_call_id"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "input_audio"),
])
def test_bad_messages_name_the_problem(tmp_path, messages, match):
    kimi_dir(tmp_path)
    with pytest.raises(ChatTemplateError, match=match):
        load_tokenizer(tmp_path).apply_chat_template(messages)


def test_image_parts_are_kimis_placeholder(tmp_path):
    """K2.5's own template writes each image as one <|media_pad|> between media markers."""
    kimi_dir(tmp_path)
    parts = [{"type": "text", "text": "see "}, {"type": "image"}, {"type": "image_url", "image_url": {"url": "x"}}]
    text = load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": parts}])
    image = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
    assert f"<|im_middle|>see {image}{image}<|im_end|>" in text
