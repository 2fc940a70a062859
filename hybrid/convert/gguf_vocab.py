"""A checkpoint's tokenizer as GGUF "gpt2" (byte-level BPE) vocabulary metadata.

llama.cpp's BPE tokenizer wants, for a vocabulary of V ids (V = config.json vocab_size, the rows
of the embedding):
  tokenizer.ggml.model       "gpt2"
  tokenizer.ggml.pre         the pre-tokenizer's name (llama.cpp implements each regex set by name)
  tokenizer.ggml.tokens      [V] strings: token bytes spelled with GPT-2's byte -> printable
                             character table; ids the tokenizer does not use are "[PAD{id}]"
  tokenizer.ggml.token_type  [V] ints: 1 normal, 3 control (special), 4 user-defined
                             (added, not special), 5 unused (padding)
  tokenizer.ggml.merges      ["left right", ...] in priority order
plus bos/eos ids, add_bos_token and the chat template.

Two sources, read through hybrid.tokenizer (the same files `hybrid.load` reads):
  tiktoken.model (Kimi K2 / K2.5): tokens are the rank table; the merges are not stored, so each
    multi-byte token's merge is recovered by running BPE on its bytes with only lower ranks
    allowed: it stops at exactly two parts, the pair that forms it. Pre-tokenizer "kimi-k2".
  tokenizer.json with a byte-level BPE model: vocab and merges as stored. The pre-tokenizer name
    is not stored anywhere (llama.cpp's converter recognises it by hashing a test encoding); a
    plain ByteLevel pre-tokenizer is "gpt-2", anything else needs --pre.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hybrid.tokenizer import byte_to_unicode  # noqa: F401  (re-exported: tests import it from here)

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


class VocabError(ValueError):
    """The tokenizer cannot be written as a GGUF gpt2 vocabulary; the message names the file."""


@dataclass
class GGUFVocab:
    pre: str
    tokens: list[str]  # [V]
    token_types: list[int]  # [V]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    special: dict[str, int] = field(default_factory=dict)


def _spell(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def _merge_of(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, ...]:
    """BPE of `token` using only merges ranked below `rank`: the two parts it is made of."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return tuple(parts)


def _tiktoken_vocab(tok, vocab_size: int) -> tuple[list[str | None], list[int], list[str]]:
    from hybrid.tokenizer import read_tiktoken_ranks

    ranks = read_tiktoken_ranks(Path(tok.source))
    table = byte_to_unicode()
    tokens: list[str | None] = [None] * vocab_size
    types = [TOKEN_UNUSED] * vocab_size
    merges: list[tuple[int, str]] = []
    for token, rank in ranks.items():
        if rank >= vocab_size:
            raise VocabError(f"{tok.source}: token id {rank} is outside config.json vocab_size {vocab_size}")
        tokens[rank], types[rank] = _spell(token, table), TOKEN_NORMAL
        if len(token) > 1:
            parts = _merge_of(ranks, token, rank)
            if len(parts) != 2:
                raise VocabError(f"{tok.source}: token {token!r} (id {rank}) is not the merge of two "
                                 "lower-ranked tokens; not a BPE rank table")
            merges.append((rank, f"{_spell(parts[0], table)} {_spell(parts[1], table)}"))
    merges.sort()
    return tokens, types, [m for _, m in merges]


def _hf_vocab(json_file: Path, vocab_size: int, pre: str | None) -> tuple[list, list[int], list[str], str]:
    try:
        data = json.loads(json_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise VocabError(f"{json_file}: cannot read: {e}") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabError(f"{json_file}: tokenizer model {model.get('type')!r} cannot be written as a GGUF "
                         "gpt2 vocabulary (only byte-level BPE)")
    decoder = data.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise VocabError(f"{json_file}: decoder {decoder.get('type')!r} is not ByteLevel; llama.cpp's gpt2 "
                         "vocabulary is byte-level BPE")
    if pre is None:
        pt = data.get("pre_tokenizer") or {}
        if pt.get("type") == "ByteLevel" and pt.get("use_regex", True):
            pre = "gpt-2"
        else:
            raise VocabError(f"{json_file}: pre-tokenizer {pt.get('type')!r} has no known llama.cpp name; "
                             "pass --pre NAME (e.g. deepseek-v3, kimi-k2, gpt-2)")
    tokens: list[str | None] = [None] * vocab_size
    types = [TOKEN_UNUSED] * vocab_size
    for text, tid in (model.get("vocab") or {}).items():
        if not 0 <= tid < vocab_size:
            raise VocabError(f"{json_file}: token {text!r} has id {tid}, outside config.json vocab_size {vocab_size}")
        tokens[tid], types[tid] = text, TOKEN_NORMAL
    for added in data.get("added_tokens") or []:
        tid = added.get("id")
        if not isinstance(tid, int) or not 0 <= tid < vocab_size:
            raise VocabError(f"{json_file}: added token {added.get('content')!r} has id {tid!r}, outside "
                             f"config.json vocab_size {vocab_size}")
        tokens[tid] = added.get("content")
        types[tid] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges, pre


def build_vocab(checkpoint: Path, vocab_size: int, pre: str | None = None) -> GGUFVocab:
    """The checkpoint's tokenizer as GGUF vocabulary fields, padded to `vocab_size` ids."""
    from hybrid.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(checkpoint)
    except TokenizerError as e:
        raise VocabError(str(e)) from None
    if tok.vocab_size > vocab_size:
        raise VocabError(f"{tok.source}: tokenizer has {tok.vocab_size} ids, more than config.json "
                         f"vocab_size {vocab_size} (the embedding rows)")
    if tok.backend == "tiktoken":
        tokens, types, merges = _tiktoken_vocab(tok, vocab_size)
        pre = pre or "kimi-k2"
    else:
        tokens, types, merges, pre = _hf_vocab(Path(tok.source), vocab_size, pre)
    for text, tid in tok.special_tokens.items():
        tokens[tid], types[tid] = text, TOKEN_CONTROL
    if not merges:  # gguf cannot write an empty array, and llama.cpp requires the key
        raise VocabError(f"{tok.source}: the BPE vocabulary has no merges; llama.cpp's gpt2 tokenizer "
                         "needs at least one")
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    return GGUFVocab(pre=pre, tokens=tokens, token_types=types, merges=merges, bos_id=tok.bos_id,
                     eos_id=tok.eos_id, add_bos=tok.add_bos,
                     chat_template=tok.chat_template if tok.has_own_chat_template else None,
                     special=dict(tok.special_tokens))


def write_vocab(writer, vocab: GGUFVocab) -> None:
    """Add the vocabulary keys to a gguf.GGUFWriter."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
