"""Constrained decoding in the sampler: the bitmask unpack against a per-bit reference, rows with
a grammar drawing only allowed tokens, rows without one unaffected by their batch neighbours,
the token bytes a grammar walks, and the Kimi output grammars (tool calls, JSON answers)."""

import json

import jsonschema
import pytest
import torch

from hybrid.engine.grammar import (GrammarCompiler, GrammarError, apply_masks, new_bitmask, unpack_bits_numpy,
                                   unpack_bits_shifts)
from hybrid.engine.sampling import RowState, SamplingParams, make_generator, sample
from hybrid.tokenizer import load_tokenizer
from hybrid.toolcalls import output_grammar

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "kind": {"enum": ["a", "b", "c"]},
    "n": {"type": "integer", "minimum": 0, "maximum": 999},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}},
    "required": ["name", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    from hybrid.api import DEMO_DIR

    return load_tokenizer(DEMO_DIR)


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok)


def test_apply_masks_matches_a_per_bit_reference():
    g = torch.Generator().manual_seed(0)
    for R, V in ((1, 32), (3, 100), (5, 4096 + 7)):
        logits = torch.randn(R, V, generator=g)
        words = torch.randint(-2**31, 2**31 - 1, (R, (V + 31) // 32), dtype=torch.int32, generator=g)
        want = logits.clone()
        for r in range(R):
            for v in range(V):
                if not (int(words[r, v // 32]) >> (v % 32)) & 1:
                    want[r, v] = float("-inf")
        assert torch.equal(apply_masks(logits.clone(), words), want)
        # the device form (shifts), run here on the CPU, unpacks the same bits
        assert torch.equal(unpack_bits_shifts(words, V, "cpu").to(torch.uint8), unpack_bits_numpy(words, V))


def test_vocab_bytes_spell_every_encoding(tok):
    vb = tok.vocab_bytes()
    assert len(vb) == tok.vocab_size
    for text in ("Hello wörld, 中文 {\"a\": [1, 2.5e-3]}\n\t x", "def f(*args):\n    return ∑"):
        assert b"".join(vb[i] for i in tok.encode(text, allow_special=False)) == text.encode()
    assert vb[tok.special_tokens["<|im_end|>"]] == b"<|im_end|>"


def test_vocab_bytes_of_a_tiktoken_vocabulary(tmp_path):
    from test_serve_support import write_tokenizer

    write_tokenizer(tmp_path)
    t = load_tokenizer(tmp_path)
    vb = t.vocab_bytes()
    assert vb[:256] == [bytes([i]) for i in range(256)] and vb[t.special_tokens["</think>"]] == b"</think>"


def _walk(tok, grammar, seed, steps=300, temperature=1.0, prefix=()):
    """Sample from random logits under the grammar (after it took `prefix`) until a stop
    token; -> the text sampled."""
    params = SamplingParams(temperature=temperature, grammar=grammar)
    row = RowState(params=params, generator=make_generator(seed), prompt_ids=[], output_ids=[])
    for t in prefix:
        row.matcher.accept(t)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        t = sample(torch.randn(1, tok.vocab_size, generator=g) * 3, [row])[0].token_id
        if t in tok.stop_token_ids:
            return tok.decode(out)
        out.append(t)
    raise AssertionError(f"no stop after {steps} tokens: {tok.decode(out)!r}")


def test_constrained_rows_draw_only_what_the_schema_allows(tok, compiler):
    grammar = compiler.json_schema(SCHEMA)
    for seed in range(8):
        jsonschema.validate(json.loads(_walk(tok, grammar, seed)), SCHEMA)


def test_rows_without_a_grammar_draw_as_if_alone(tok, compiler):
    grammar = compiler.json_schema(SCHEMA)
    V = tok.vocab_size
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))

    def rows(constrained):
        return [RowState(params=SamplingParams(temperature=1.0, seed=b,
                                               grammar=grammar if b in constrained else None),
                         generator=make_generator(b), prompt_ids=[], output_ids=[]) for b in range(4)]

    alone = [s.token_id for s in sample(logits, rows(()))]
    mixed = [s.token_id for s in sample(logits, rows((1, 3)))]
    assert [mixed[0], mixed[2]] == [alone[0], alone[2]]
    assert all(tok.decode([mixed[b]]).startswith("{") for b in (1, 3))


def test_unsupported_schema_features_are_a_clear_error(compiler):
    with pytest.raises(GrammarError, match="weird-format"):
        compiler.json_schema({"type": "string", "format": "weird-format"})
    with pytest.raises(GrammarError, match="nope"):
        compiler.json_schema({"$ref": "#/definitions/nope"})
    with pytest.raises(GrammarError):
        compiler.lark("start: undefined_rule")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
    "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}]


def _calls(text):
    from hybrid.toolcalls import parse_output

    return parse_output(text, parse_tools=True).tool_calls


def test_required_tool_calls_name_an_offered_tool_with_valid_arguments(tok, compiler):
    from hybrid.toolcalls import CALL_BEGIN, SECTION_BEGIN

    grammar = compiler.lark(output_grammar(tok.special_tokens, tools=TOOLS, tool_choice="required"))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(6):
        text = SECTION_BEGIN + CALL_BEGIN + "functions." + _walk(tok, grammar, seed)
        calls = _calls(text)
        assert calls, text
        for c in calls:
            assert c.name in schemas, text
            jsonschema.validate(json.loads(c.arguments), schemas[c.name])


def test_auto_tool_calls_can_only_name_offered_tools(tok, compiler):
    grammar = compiler.lark(output_grammar(tok.special_tokens, tools=TOOLS, tool_choice="auto"))
    # The answer is free text; a tool-call section, once opened, holds only offered tools.
    m = grammar.matcher()
    for t in tok.encode("Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions."):
        m.accept(t)
    bm = new_bitmask(1, tok.vocab_size)
    m.fill(bm[0])
    allowed = {tok.decode([i]) for i in range(tok.vocab_size) if (int(bm[0, i // 32]) >> (i % 32)) & 1}
    assert allowed and all("get_weather".startswith(a) or "add".startswith(a) for a in allowed), allowed
    with pytest.raises(RuntimeError, match="refused"):
        for t in tok.encode("python_help"):
            m.accept(t)


def test_reasoning_then_a_json_answer(tok, compiler):
    from hybrid.toolcalls import parse_output

    grammar = compiler.lark(output_grammar(tok.special_tokens, in_reasoning=True, answer_schema=SCHEMA))
    for seed in range(3):
        reasoning = "I think {not json" * seed + "</think>"
        text = reasoning + _walk(tok, grammar, seed, prefix=tok.encode(reasoning))
        out = parse_output(text, start_in_reasoning=True)
        jsonschema.validate(json.loads(out.content), SCHEMA)


def test_answer_after_holds_the_stop_tokens_until_an_answer_began():
    stop, end = 0, 1
    # The stop token is by far the likeliest; token `end` (</think>) next.
    logits = torch.tensor([[9.0, 4.0, 0, 0, 0, 0, 0, 0]])
    params = SamplingParams(temperature=0, answer_after=end, held_ids=[stop])
    row = RowState(params=params, generator=make_generator(0), prompt_ids=[], output_ids=[])
    drawn = [sample(logits, [row])[0].token_id for _ in range(3)]
    assert drawn == [end, 2, stop]  # </think>, one answer token (not </think> again), then free
    # Blank tokens (whitespace, dropped markers) after </think> do not begin the answer.
    logits = torch.tensor([[9.0, 4.0, 6.0, 0, 0, 0, 0, 0]])
    params = SamplingParams(temperature=0, answer_after=end, held_ids=[stop], blank_ids=frozenset({2}))
    row = RowState(params=params, generator=make_generator(0), prompt_ids=[], output_ids=[])
    assert [sample(logits, [row])[0].token_id for _ in range(4)] == [2, 2, 2, 2]  # no </think> yet: held
    row.answer_phase = 1
    logits[0, 3] = 5.0
    assert [sample(l, [row])[0].token_id for l in (logits, logits.index_fill(1, torch.tensor([2]), -9))] == [2, 3]
    assert sample(logits, [row])[0].token_id == stop
    free = RowState(params=SamplingParams(temperature=0), generator=make_generator(0), prompt_ids=[], output_ids=[])
    assert sample(logits, [free])[0].token_id == stop
    with pytest.raises(ValueError, match="held_ids"):
        SamplingParams(answer_after=end)


def test_answer_by_ends_the_preamble_after_its_budget():
    logits = torch.tensor([[0.0, -5.0, 9.0, 0, 0, 0, 0, 0]])  # token 2 (reasoning text) always best
    params = SamplingParams(temperature=1.0, answer_after=1, held_ids=[0], answer_by=3)
    out = []
    row = RowState(params=params, generator=make_generator(0), prompt_ids=[], output_ids=out)
    for _ in range(5):
        out.append(sample(logits, [row])[0].token_id)
    assert out[:4] == [2, 2, 2, 1] and out[4] == 2
