"""Constrained decoding: a grammar per request, a token mask per step, applied row by row.

The library is llguidance (PyPI; Rust, computes masks on the CPU). It was chosen over xgrammar by
bench/grammar_mask.py at Kimi K2.5's 163840-token vocabulary: a mask costs 8 us per step for one
row and 0.47 ms for 32 rows together (xgrammar: 4 us, 1.7 ms), a new JSON schema compiles in 1 ms
(xgrammar: 44 ms; every agent's tool list is one); and it needs no other package, where xgrammar
requires triton and transformers. Applying the masks to the logits costs more than computing
them (0.08 ms a row at 160K on a CPU), and only the constrained rows pay it.

    compiler = GrammarCompiler(tokenizer)        # one per tokenizer; builds its token trie once
    grammar = compiler.json_schema(schema)       # GrammarError (a clear message) if unsupported
    params = SamplingParams(grammar=grammar)     # each request's row gets its own Matcher

In sampling (sampling.py): the rows whose request has a grammar get their bitmask filled
(several rows in parallel on llguidance's thread pool), disallowed tokens are set to -inf in
those rows only, and after the draw each matcher consumes its row's token. Rows without a
grammar are not touched and cost nothing. When the grammar is complete the mask allows only the
tokenizer's stop tokens, so the request ends there (with ignore_eos it goes on drawing them).

Legend: R constrained rows, V vocabulary, W = ceil(V / 32) mask words.
"""

from __future__ import annotations

import functools
import json
import threading

import numpy as np
import torch


class GrammarError(ValueError):
    """A grammar or JSON schema the library cannot build or does not support; the message is
    the library's, naming the keyword or rule."""


class _TokenizerView:
    """What llguidance.LLTokenizer reads from a tokenizer (its TokenizerWrapper protocol)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.tokens = tokenizer.vocab_bytes()
        self.eos_token_id = tokenizer.stop_token_ids[0] if tokenizer.stop_token_ids else tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.is_tokenizer_wrapper = True

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, allow_special=False)


class GrammarCompiler:
    """Builds grammars for one tokenizer. The token trie (about a second at 160K tokens) is made
    on first use and shared by every grammar."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ll = None
        self._lock = threading.Lock()

    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance

                self._ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(self.tokenizer)),
                                                  n_vocab=self.tokenizer.vocab_size,
                                                  eos_token=list(self.tokenizer.stop_token_ids))
            return self._ll

    def json_schema(self, schema: dict, lenient: bool = False) -> "Grammar":
        """JSON text valid under `schema` (a dict), compact separators. lenient: ignore keywords
        the library does not implement instead of refusing them."""
        import llguidance

        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False, "lenient": lenient})
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from None
        return self._checked(text)

    def lark(self, text: str) -> "Grammar":
        """A grammar in llguidance's Lark dialect (special tokens as <|name|>, %json {...})."""
        import llguidance

        try:
            return self._checked(llguidance.LLMatcher.grammar_from_lark(text))
        except ValueError as e:
            raise GrammarError(str(e)) from None

    def _checked(self, grammar: str) -> "Grammar":
        import llguidance

        ll = self.ll_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if is_error:
            raise GrammarError("; ".join(messages) or "invalid grammar")
        return Grammar(grammar, ll, self.tokenizer.vocab_size)


class Grammar:
    """A compiled grammar (immutable, shared); matcher() starts one request's walk through it."""

    def __init__(self, text: str, ll_tokenizer, vocab_size: int):
        self.text = text
        self._ll = ll_tokenizer
        self.vocab_size = vocab_size

    def matcher(self) -> "Matcher":
        return Matcher(self)


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, grammar: Grammar):
        import llguidance

        self.grammar = grammar
        self._m = llguidance.LLMatcher(grammar._ll, grammar.text, log_level=0)
        if self._m.is_error():
            raise GrammarError(self._m.get_error())

    def accept(self, token_id: int) -> None:
        """Advance by the sampled token; a token the mask did not allow is a bug, said so."""
        if self._m.is_stopped():
            return  # the stop token itself, or a request that runs past the end (ignore_eos)
        if not self._m.consume_token(token_id):
            raise RuntimeError(f"grammar refused token {token_id}: {self._m.get_error()}")

    def is_done(self) -> bool:
        return self._m.is_stopped() or self._m.is_accepting()

    def fill(self, row: torch.Tensor) -> None:
        """row: int32 [W], contiguous, on the CPU."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)


@functools.lru_cache(maxsize=1)
def _executor():
    import llguidance

    return llguidance.LLExecutor()


def fill_masks(matchers: list[Matcher], bitmask: torch.Tensor) -> None:
    """bitmask int32 [R, W] (CPU, contiguous) <- each matcher's allowed tokens; several rows are
    filled in parallel on llguidance's thread pool."""
    if len(matchers) == 1:
        matchers[0].fill(bitmask[0])
        return
    _executor().unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)],
                                        bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with each token whose bit is 0 in bitmask [R, W] set to -inf (in place;
    returned). The bits are unpacked where the logits are (numpy's unpackbits on the CPU, shifts
    on a device) and added as a bias of 0 / -inf: on a CPU this is 4-5x faster than masked_fill
    or torch.where over 160K columns (bench/grammar_mask.py)."""
    unpack = unpack_bits_numpy if logits.device.type == "cpu" else unpack_bits_shifts
    allowed = unpack(bitmask, logits.shape[1], logits.device)  # [R, V] uint8 / int32, 1 = allowed
    bias = allowed.to(logits.dtype).sub_(1.0)  # [R, V]: 0 allowed, -1 not
    big = torch.finfo(logits.dtype).max
    return logits.add_(bias.mul_(big).mul_(2.0))  # -1 * max * 2 overflows to -inf; 0 stays 0


def unpack_bits_numpy(bitmask: torch.Tensor, V: int, device=None) -> torch.Tensor:
    """bitmask int32 [R, W] (CPU) -> [R, V] uint8, bit v of word v // 32 (little-endian)."""
    return torch.from_numpy(np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :V])


def unpack_bits_shifts(bitmask: torch.Tensor, V: int, device) -> torch.Tensor:
    """The same on `device` (the mask is copied there, 1/32 of the logits' size): [R, V] int32."""
    R = bitmask.shape[0]
    shifts = torch.arange(32, dtype=torch.int32, device=device)  # [32]
    words = bitmask.to(device, non_blocking=True)  # [R, W]
    return ((words[:, :, None] >> shifts) & 1).view(R, -1)[:, :V]  # [R, W*32] -> [R, V]


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
