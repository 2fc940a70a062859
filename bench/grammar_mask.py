"""Token-mask cost per decode step of the two grammar libraries, at a 160K vocabulary.

    python bench/grammar_mask.py                    # 163840 tokens (Kimi K2.5's vocabulary size)
    python bench/grammar_mask.py --vocab 32768 --steps 60 --rows 1 8
    python bench/grammar_mask.py --tokenizer /models/Kimi-K2.5      # a real checkpoint's vocabulary

Constrained decoding computes, before each sampled token, the set of tokens the grammar allows
(a bitmask over the vocabulary) and then advances the grammar by the token drawn. Both
candidates (xgrammar, llguidance) do this on the CPU; this measures, for each:

  - compile: building the grammar for a schema (once per request);
  - mask/step: filling one bitmask row, median and p99 over a real trajectory: a valid JSON
    document for the schema, tokenized, fed token by token (the mask is computed before each);
  - 1 row and R rows per step (R matchers on different documents; llguidance fills them with
    its thread pool, xgrammar with its BatchGrammarMatcher);
  - the tool-call grammar the server uses for tool_choice "auto" (free text, then an optional
    call), over plain answer text: the case where most of the vocabulary is allowed.

No 160K checkpoint is at hand offline, so the vocabulary is built: the 256 byte tokens, then the
most frequent pre-tokenized pieces (Kimi's split pattern) of this Python's standard library
sources, then two- and three-character Han pieces (Kimi's vocabulary is about a fifth CJK), up to
--vocab - 256, then 256 special tokens as Kimi has; written as a tiktoken.model and loaded with
hybrid.tokenizer like a real checkpoint. Timings are this machine's, under whatever else runs on
it; the two libraries run interleaved on the same trajectories.

Measured 2026-12-03, shared 2-core dev box (AMD Zen 4, load 5 from other work), 163840 tokens,
100 steps of the schema above (median / p99 per step for all rows together):

  library     grammar            rows  trie s  compile ms  median ms  p99 ms
  llguidance  json schema           1    0.68        1.0      0.008    0.20
  llguidance  json schema          32    0.68        1.0      0.470    8.2
  llguidance  tools auto, text      1                         0.006    0.27
  llguidance  tools auto, text     32                         0.195    6.8
  xgrammar    json schema           1    0.15       43.9      0.004    0.17
  xgrammar    json schema          32    0.15       43.9      1.703    5.5
  apply mask (hybrid.engine.grammar.apply_masks, fp32 logits)
                                    1                         0.083    0.56
                                   32                        13.5     17.0

The whole sampler (temperature 1; a later run, load 8-10, so noisier), median ms per step:
  rows constrained   0/1: 1.19   1/1: 1.56   0/32: 64.5   16/32: 141   32/32: 180
(at 160K on a CPU the sampler's own softmax / cumsum / argmax dominate; the constrained rows
add the mask, its unpack and a copy of the logits; on a GPU the unpack runs there.)

llguidance: 3.6x cheaper at 32 rows (its thread pool), 44x cheaper to compile a new schema (each
agent's tool list is one), twice as slow at one row (8 us: nothing next to a decode step); and
it needs no other package, where xgrammar requires triton and transformers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

SCHEMA = {  # a tool's parameters, as agents send them
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 50},
        "language": {"type": "string", "enum": ["python", "rust", "go", "typescript"]},
        "filters": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "value": {"type": "string"}},
            "required": ["field", "value"], "additionalProperties": False}},
        "exact": {"type": "boolean"},
    },
    "required": ["query", "max_results", "language"],
    "additionalProperties": False,
}


def build_vocab(size: int, directory: Path):
    import regex

    from hybrid.tokenizer import KIMI_NUM_RESERVED, KIMI_PAT_STR, load_tokenizer, write_tiktoken_ranks

    pieces: Counter = Counter()
    pat = regex.compile(KIMI_PAT_STR)
    read = 0
    for f in sorted(Path(sys.base_prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}").rglob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        pieces.update(m.group(0) for m in pat.finditer(text))
        read += len(text)
        if read > 12_000_000:
            break
    want = size - 256 - KIMI_NUM_RESERVED
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    rnd = random.Random(0)
    n_han = want // 5
    ranks = {bytes([b]): b for b in range(256)}
    for p, _ in pieces.most_common():
        if len(ranks) >= 256 + want - n_han:
            break
        b = p.encode("utf-8")
        if len(b) > 1 and b not in ranks:
            ranks[b] = len(ranks)
    while len(ranks) < 256 + want:
        b = "".join(rnd.choice(han) for _ in range(rnd.choice((1, 2, 2, 3)))).encode("utf-8")
        if b not in ranks:
            ranks[b] = len(ranks)
    write_tiktoken_ranks(ranks, directory / "tiktoken.model")
    n = len(ranks)
    names = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
             "<|im_middle|>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
             "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
             "<think>", "</think>"]
    added = {str(n + i): {"content": name, "special": True} for i, name in enumerate(names)}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": added, "bos_token": "[BOS]", "eos_token": "[EOS]"}))
    return load_tokenizer(directory)


def documents(n: int, rnd: random.Random) -> list[str]:
    words = "find the tests that cover constrained decoding of tool calls in the serve package".split()
    out = []
    for _ in range(n):
        doc = {"query": " ".join(rnd.choice(words) for _ in range(rnd.randint(4, 12))),
               "max_results": rnd.randint(1, 50), "language": rnd.choice(["python", "rust", "go"]),
               "filters": [{"field": rnd.choice(words), "value": rnd.choice(words) + " " + rnd.choice(words)}
                           for _ in range(rnd.randint(0, 3))]}
        if rnd.random() < 0.5:
            doc["exact"] = rnd.random() < 0.5
        out.append(json.dumps(doc, separators=(",", ":")))
    return out


ANSWER = ("The function returns a list of the matching entries, sorted by their key. When the "
          "argument is omitted it defaults to None, and every entry is returned. 这是一个例子。 ")


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer):
        from hybrid.engine.grammar import GrammarCompiler

        t0 = time.perf_counter()
        self.compiler = GrammarCompiler(tokenizer)
        self.compiler.ll_tokenizer()
        self.setup_s = time.perf_counter() - t0

    def compile_json(self, schema):
        return self.compiler.json_schema(schema)

    def compile_tools_auto(self, tools):
        from hybrid.toolcalls import output_grammar

        return self.compiler.lark(output_grammar(self.compiler.tokenizer.special_tokens, tools=tools))

    def matchers(self, grammar, n):
        return [grammar.matcher() for _ in range(n)]

    def fill(self, matchers, bitmask):
        from hybrid.engine.grammar import fill_masks

        fill_masks(matchers, bitmask)

    def accept(self, matchers, tokens):
        for m, t in zip(matchers, tokens):
            m.accept(t)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer):
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        info = xgr.TokenizerInfo(tokenizer.vocab_bytes(), vocab_type=xgr.VocabType.RAW,
                                 vocab_size=tokenizer.vocab_size, stop_token_ids=tokenizer.stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.setup_s = time.perf_counter() - t0
        self.batch = None

    def compile_json(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True,
                                                  separators=(",", ":"))

    def compile_tools_auto(self, tools):
        return None  # structural tags differ per library; only the JSON case is compared

    def matchers(self, grammar, n):
        return [self.xgr.GrammarMatcher(grammar) for _ in range(n)]

    def fill(self, matchers, bitmask):
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
            return
        if self.batch is None:
            self.batch = self.xgr.BatchGrammarMatcher()
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matchers, tokens):
        for m, t in zip(matchers, tokens):
            assert m.accept_token(t), "xgrammar refused a token of a valid document"


def run(lib, grammar, token_lists, vocab, steps):
    """Feed R trajectories together; -> per-step mask times (s) for the whole batch."""
    R = len(token_lists)
    matchers = lib.matchers(grammar, R)
    bitmask = torch.full((R, (vocab + 31) // 32), -1, dtype=torch.int32)
    times = []
    for step in range(min(steps, min(len(t) for t in token_lists))):
        t0 = time.perf_counter()
        lib.fill(matchers, bitmask)
        times.append(time.perf_counter() - t0)
        tokens = [t[step] for t in token_lists]
        for r, tok in enumerate(tokens):  # the document's token is allowed
            assert (int(bitmask[r, tok // 32]) >> (tok % 32)) & 1, (lib.name, step, tok)
        lib.accept(matchers, tokens)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=163840, help="size of the built vocabulary")
    ap.add_argument("--tokenizer", default=None,
                    help="a checkpoint directory or tokenizer file to use instead of a built vocabulary")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--libs", nargs="+", default=["llguidance", "xgrammar"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.tokenizer:
        from hybrid.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    else:
        with tempfile.TemporaryDirectory() as d:
            tok = build_vocab(args.vocab, Path(d))
    print(f"vocabulary: {tok.vocab_size} tokens ({tok.source}), ready in {time.perf_counter() - t0:.1f} s")
    libs = [{"llguidance": LLGuidance, "xgrammar": XGrammar}[n](tok) for n in args.libs]
    rnd = random.Random(1)
    docs = documents(max(args.rows), rnd)
    traj = [tok.encode(d) + [tok.special_tokens["<|im_end|>"]] for d in docs]
    answer = tok.encode(ANSWER * 4)
    tools = [{"type": "function", "function": {"name": "search", "parameters": SCHEMA}}]
    rows = []
    for lib in libs:
        t0 = time.perf_counter()
        g = lib.compile_json(SCHEMA)
        compile_ms = (time.perf_counter() - t0) * 1e3
        for R in args.rows:
            run(lib, g, traj[:R], tok.vocab_size, 5)  # warm
            ts = run(lib, g, traj[:R], tok.vocab_size, args.steps)
            rows.append((lib.name, "json schema", R, lib.setup_s, compile_ms, ts))
        ga = lib.compile_tools_auto(tools)
        if ga is not None:
            for R in args.rows:
                ts = run(lib, ga, [answer] * R, tok.vocab_size, args.steps)
                rows.append((lib.name, "tools auto, text", R, lib.setup_s, 0.0, ts))
    # Applying a mask to the logits (the engine's per-row unpack), for comparison
    from hybrid.engine.grammar import apply_masks

    for R in args.rows:
        logits = torch.randn(R, tok.vocab_size)
        bm = torch.randint(-2**31, 2**31 - 1, (R, (tok.vocab_size + 31) // 32), dtype=torch.int32)
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            apply_masks(logits, bm)
            ts.append(time.perf_counter() - t0)
        rows.append(("apply (torch)", "bitmask -> -inf", R, 0.0, 0.0, ts))
    # The whole sampler (hybrid.engine.sampling.sample, temperature 1) for R rows: none, half
    # or all constrained. Each row's logits favour its document's next token by far, so the
    # constrained rows walk their documents as a model would.
    from hybrid.engine.sampling import RowState, SamplingParams, make_generator, sample

    grammar = libs[0].compile_json(SCHEMA) if libs and libs[0].name == "llguidance" else None
    n_steps = min(args.steps, min(len(t) for t in traj))
    for R in args.rows if grammar is not None else ():
        for n_c in sorted({0, R // 2, R}):
            rows_ = [RowState(SamplingParams(temperature=1.0, seed=b, grammar=grammar if b < n_c else None),
                              make_generator(b), [], []) for b in range(R)]
            base = torch.randn(R, tok.vocab_size)
            ts = []
            for step in range(n_steps):
                logits = base.clone()
                for b in range(R):
                    logits[b, traj[b][step]] += 100.0
                t0 = time.perf_counter()
                sample(logits, rows_)
                ts.append(time.perf_counter() - t0)
            rows.append(("sample()", f"{n_c}/{R} constrained", R, 0.0, 0.0, ts))
    print(f"\n{'library':<14} {'grammar':<18} {'rows':>4} {'tokenizer s':>11} {'compile ms':>10} "
          f"{'median ms/step':>14} {'p99 ms/step':>11} {'us/row':>7}")
    for name, what, R, setup, comp, ts in rows:
        ts = sorted(ts)
        med, p99 = statistics.median(ts) * 1e3, ts[min(len(ts) - 1, int(len(ts) * 0.99))] * 1e3
        print(f"{name:<14} {what:<18} {R:>4} {setup:>11.2f} {comp:>10.1f} {med:>14.3f} {p99:>11.3f} "
              f"{med * 1e3 / R:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
