"""Tokenizers: Kimi's tiktoken BPE (tiktoken.model) and Hugging Face tokenizer.json.

`load_tokenizer(path)` reads a checkpoint directory (or the tokenizer file itself) and returns a
Tokenizer with one interface for both back ends: encode/decode, the special token ids, the ids
that end a turn, an incremental decoder for streaming, and the chat template.

Kimi facts this follows (from the checkpoints' tokenization_kimi.py and tokenizer_config.json):
  - tiktoken.model: one "base64(token bytes) rank" pair per line; ranks are the token ids.
  - 256 ids right after the BPE vocabulary are reserved for special tokens; tokenizer_config.json
    "added_tokens_decoder" names some of them ([BOS], [EOS], <|im_end|>, <think>, ...); the
    unnamed ones are "<|reserved_token_{id}|>".
  - pre-tokenisation regex KIMI_PAT_STR below (Han runs kept whole, case-aware words, digits in
    groups of up to three).
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
from pathlib import Path

from hybrid.chat_template import KIMI_TEMPLATE, ChatTemplateError, render

KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
KIMI_NUM_RESERVED = 256
# tiktoken's BPE is quadratic in the length of one pre-tokenised piece, and a run of spaces or
# of non-spaces is one piece: longer runs are cut (Kimi's own tokenizer cuts them too).
MAX_RUN_CHARS = 25_000

# Tokens that end an assistant turn in common chat formats; each one present in the vocabulary
# is a stop token in addition to eos and generation_config.json's eos_token_id.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|end|>")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible table: printable latin-1 bytes map to themselves, the other 68 bytes to
    code points from 256 up, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """text with each unpaired UTF-16 surrogate (U+D800..U+DFFF, what JSON's "\\ud83d" escape gives
    when a client cuts a string inside an emoji) replaced by U+FFFD; such a str cannot be encoded
    as UTF-8. tiktoken does the same inside encode; the tokenizers back end would raise."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character each byte is written as ->
    the byte (printable Latin-1 bytes stand for themselves, the rest are shifted past 255)."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, shifted = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + shifted)] = b
            shifted += 1
    return out


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed; the message names the file and the field."""


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object at top level")
    return data


def _token_content(value, where: str) -> str | None:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a string or an object with 'content'")


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one 'base64(bytes) rank' per line."""
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise TokenizerError(f"{path}:{lineno}: expected 'base64 rank', got {line[:60]!r}")
                try:
                    token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
                except ValueError as e:
                    raise TokenizerError(f"{path}:{lineno}: bad base64 token or rank: {e}") from e
                ranks[token] = rank
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from e
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path) -> None:
    """Write ranks in the tiktoken.model format (used by tests and the demo model)."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def _cut_long_runs(text: str):
    """Split text so no run of whitespace or of non-whitespace is longer than MAX_RUN_CHARS."""
    if len(text) <= MAX_RUN_CHARS:
        yield text
        return
    start = run_start = 0
    run_space = None
    for i, ch in enumerate(text):
        space = ch.isspace()
        if space != run_space:
            run_start, run_space = i, space
        elif i - run_start >= MAX_RUN_CHARS:
            yield text[start:i]
            start = run_start = i
    yield text[start:]


class IncrementalDecoder:
    """Turn a stream of token ids into text deltas, never splitting a UTF-8 character.

    Byte-level vocabularies (tiktoken) feed each token's bytes to an incremental UTF-8 decoder.
    Others re-decode a short window of recent ids and emit only the new, complete text
    (a window ending in U+FFFD means an unfinished character: wait for the next token).
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._bytes_mode = tokenizer.backend == "tiktoken"
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted
        self._read = 0  # ids before it have been turned into emitted text

    def add(self, token_id: int) -> str:
        if self._skip and token_id in self._tok.special_ids:
            return ""
        if self._bytes_mode:
            return self._utf8.decode(self._tok.token_bytes(token_id))
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix:self._read])
        now = self._tok.decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Text still held back (an unfinished character comes out as U+FFFD)."""
        if self._bytes_mode:
            return self._utf8.decode(b"", final=True)
        before = self._tok.decode(self._ids[self._prefix:self._read])
        now = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return now[len(before):]


class Tokenizer:
    """One interface over tiktoken and tokenizers back ends. Build with load_tokenizer()."""

    def __init__(self, *, backend: str, impl, special_tokens: dict[str, int], vocab_size: int,
                 bos_token: str | None, eos_token: str | None, add_bos: bool,
                 chat_template: str | None, extra_stop_ids=(), source: str = ""):
        self.backend = backend  # "tiktoken" or "hf"
        self._impl = impl
        self.special_tokens = dict(special_tokens)  # text -> id
        self.special_ids = frozenset(self.special_tokens.values())
        self.vocab_size = vocab_size  # one past the largest id
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_id = self.token_to_id(eos_token) if eos_token else None
        self.add_bos = add_bos and self.bos_id is not None
        self.has_own_chat_template = chat_template is not None
        self.chat_template = chat_template if chat_template is not None else KIMI_TEMPLATE
        self.source = source
        stops = [self.eos_id] + list(extra_stop_ids)
        stops += [self.special_tokens.get(t) for t in END_OF_TURN_TOKENS]
        self.stop_token_ids = sorted({s for s in stops if s is not None})

    def __repr__(self):
        return (f"Tokenizer({self.backend}, vocab={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, stops={self.stop_token_ids}, source={self.source!r})")

    # ---- ids and tokens -------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if self.backend == "hf":
            return self._impl.token_to_id(token)
        try:
            return self._impl.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (tiktoken back end; special tokens give their text)."""
        self._check_ids([token_id])
        if self.backend != "tiktoken":
            return self.decode([token_id]).encode("utf-8")
        return self._impl.decode_single_token_bytes(token_id)

    def vocab_bytes(self) -> list[bytes]:
        """Every id's raw bytes, index = id (what a grammar matcher walks to mask tokens).
        Special tokens give their text; ids no token has (padding past the vocabulary) give
        b"". The tokenizers back end keeps byte-level BPE tokens in GPT-2's byte-to-unicode
        alphabet, mapped back here; other models' tokens are their UTF-8 text."""
        if self.backend == "tiktoken":
            out = []
            for i in range(self.vocab_size):
                try:
                    out.append(self._impl.decode_single_token_bytes(i))
                except KeyError:
                    out.append(b"")
            return out
        byte_of = _byte_level_alphabet()
        out = []
        for i in range(self.vocab_size):
            tok = self._impl.id_to_token(i)
            if tok is None:
                out.append(b"")
            elif i in self.special_ids or not all(c in byte_of for c in tok):
                out.append(tok.encode("utf-8"))
            else:
                out.append(bytes(byte_of[c] for c in tok))
        return out

    def _check_ids(self, ids) -> None:
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i!r} is outside the vocabulary [0, {self.vocab_size})")

    # ---- text <-> ids ---------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids for text. Special-token text (e.g. <|im_end|>) becomes its special id unless
        allow_special is False, in which case it is encoded as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        text = replace_lone_surrogates(text)
        if self.backend == "tiktoken":
            ids = []
            for piece in _cut_long_runs(text):
                ids += (self._impl.encode(piece, allowed_special="all") if allow_special
                        else self._impl.encode_ordinary(piece))
        else:
            ids = self._impl.encode(text, add_special_tokens=False).ids
            if not allow_special and any(i in self.special_ids for i in ids):
                ids = self._encode_hf_plain(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + list(ids)
        return list(ids)

    def _encode_hf_plain(self, text: str) -> list[int]:
        # tokenizers always matches added tokens in text, so cut the text at each special
        # token and encode that token's text one character at a time, where it cannot match.
        out: list[int] = []
        rest = text
        names = sorted(self.special_tokens, key=len, reverse=True)
        while rest:
            hit = min(((rest.find(n), n) for n in names if n in rest), default=None)
            if hit is None:
                out += self._impl.encode(rest, add_special_tokens=False).ids
                break
            pos, name = hit
            if pos:
                out += self._impl.encode(rest[:pos], add_special_tokens=False).ids
            # the special text itself, one character at a time, so it cannot match again
            for ch in name:
                out += self._impl.encode(ch, add_special_tokens=False).ids
            rest = rest[pos + len(name):]
        return out

    def encode_chat(self, text: str, untrusted=()) -> list[int]:
        """Ids of a rendered chat prompt in which each `untrusted` string (message text that came
        from outside: user, system, tool results) is encoded as ordinary text, so a special-token
        string inside it (e.g. a web page holding "<|im_end|><|im_system|>") stays text and cannot
        forge a turn. Strings without special-token text need nothing; the others must appear
        verbatim in `text`, in order, else ValueError names the first that does not."""
        ids: list[int] = []
        pos = 0
        for s in untrusted:
            if not s or not any(name in s for name in self.special_tokens):
                continue
            start = text.find(s, pos)
            if start < 0:
                raise ValueError(f"message text {s[:60]!r} holds special-token text and the chat "
                                 "template changed it, so it cannot be kept as plain text")
            ids += self.encode(text[pos:start])
            ids += self.encode(s, allow_special=False)
            pos = start + len(s)
        return ids + self.encode(text[pos:])

    def encode_prompt(self, text: str) -> list[int]:
        """Ids for a raw completion prompt: BOS first when the checkpoint asks for it."""
        return self.encode(text, add_bos=self.add_bos)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        if self.backend == "tiktoken":
            return self._impl.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._impl.decode(ids, skip_special_tokens=False)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------

    @property
    def default_thinking(self) -> bool:
        """The model's default mode, as its chat template says: True when a generation prompt
        rendered without a `thinking` choice leaves the answer inside <think> (Kimi K2.5 and the
        demo model: thinking), False when it closes it (instant). `hybrid chat` and
        `hybrid serve` both start in it."""
        text = self.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        return text.rstrip().endswith("<think>")

    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = True,
                            thinking: bool | None = None, tokenize: bool = False, **extra):
        """Render messages with the checkpoint's template (Kimi K2-style fallback if it has none).

        Returns the prompt text, or its ids when tokenize=True.
        """
        text = render(self.chat_template, messages, tools=tools,
                      add_generation_prompt=add_generation_prompt, thinking=thinking,
                      bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        return self.encode(text) if tokenize else text


# ---- loading ------------------------------------------------------------------------------

def _find_chat_template(directory: Path, config: dict) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    tmpl = config.get("chat_template")
    if tmpl is None:
        return None
    if isinstance(tmpl, str):
        return tmpl
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(f"{directory / 'tokenizer_config.json'}: 'chat_template' must be a "
                         "string or a list with a 'default' entry")


def _generation_stop_ids(directory: Path) -> list[int]:
    gen = _read_json(directory / "generation_config.json")
    eos = gen.get("eos_token_id")
    if eos is None:
        return []
    eos = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) for e in eos):
        raise TokenizerError(f"{directory / 'generation_config.json'}: eos_token_id must be an "
                             "integer or a list of integers")
    return eos


def _added_tokens(config: dict, where: Path) -> dict[int, str]:
    added = config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise TokenizerError(f"{where}: 'added_tokens_decoder' must be an object")
    out = {}
    for key, value in added.items():
        try:
            tid = int(key)
        except ValueError as e:
            raise TokenizerError(f"{where}: added_tokens_decoder key {key!r} is not an id") from e
        out[tid] = _token_content(value, f"{where}: added_tokens_decoder[{key}]")
    return out


def _load_tiktoken(model_file: Path, directory: Path, config: dict) -> Tokenizer:
    import tiktoken

    ranks = read_tiktoken_ranks(model_file)
    n_base = len(ranks)
    if sorted(ranks.values()) != list(range(n_base)):
        raise TokenizerError(f"{model_file}: ranks must be exactly 0..{n_base - 1}")
    cfg_path = directory / "tokenizer_config.json"
    added = _added_tokens(config, cfg_path)
    special: dict[str, int] = {}
    for tid in range(n_base, n_base + KIMI_NUM_RESERVED):
        special[added.get(tid, f"<|reserved_token_{tid}|>")] = tid
    for tid, content in added.items():
        if tid < n_base:
            raise TokenizerError(f"{cfg_path}: added token {content!r} has id {tid}, inside the "
                                 f"BPE vocabulary of {model_file.name} (0..{n_base - 1})")
        special[content] = tid
    if len(set(special.values())) != len(special):
        raise TokenizerError(f"{cfg_path}: two added tokens share one id")
    try:
        enc = tiktoken.Encoding(name=f"hybrid:{model_file}", pat_str=KIMI_PAT_STR,
                                mergeable_ranks=ranks, special_tokens=special)
    except ValueError as e:
        raise TokenizerError(f"{model_file}: tiktoken rejected the vocabulary: {e}") from e
    return Tokenizer(
        backend="tiktoken", impl=enc, special_tokens=special,
        vocab_size=max(special.values()) + 1,
        bos_token=_token_content(config.get("bos_token"), f"{cfg_path}: bos_token"),
        eos_token=_token_content(config.get("eos_token"), f"{cfg_path}: eos_token"),
        add_bos=bool(config.get("add_bos_token", False)),
        chat_template=_find_chat_template(directory, config),
        extra_stop_ids=_generation_stop_ids(directory), source=str(model_file))


def _load_hf(json_file: Path, directory: Path, config: dict) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        impl = HFTokenizer.from_file(str(json_file))
    except Exception as e:  # the Rust side raises a plain Exception with the parse error
        raise TokenizerError(f"{json_file}: cannot load: {e}") from e
    cfg_path = directory / "tokenizer_config.json"
    special: dict[str, int] = {}
    for tid, added in impl.get_added_tokens_decoder().items():
        if added.special:
            special[added.content] = tid
    for tid, content in _added_tokens(config, cfg_path).items():
        special.setdefault(content, tid)
    vocab_size = max([impl.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in special.values()])
    return Tokenizer(
        backend="hf", impl=impl, special_tokens=special, vocab_size=vocab_size,
        bos_token=_token_content(config.get("bos_token"), f"{cfg_path}: bos_token"),
        eos_token=_token_content(config.get("eos_token"), f"{cfg_path}: eos_token"),
        add_bos=bool(config.get("add_bos_token", False)),
        chat_template=_find_chat_template(directory, config),
        extra_stop_ids=_generation_stop_ids(directory), source=str(json_file))


def load_tokenizer(path) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory, or a tiktoken.model / tokenizer.json file.

    A directory with both uses tiktoken.model (Kimi ships both; its tiktoken file is the
    reference). tokenizer_config.json and generation_config.json beside the file are read
    when present.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        directory = p
        for name in ("tiktoken.model", "tokenizer.json"):
            if (p / name).exists():
                p = p / name
                break
        else:
            raise TokenizerError(f"{directory}: no tokenizer found (expected tiktoken.model or "
                                 "tokenizer.json)")
    elif p.exists():
        directory = p.parent
    else:
        raise TokenizerError(f"{p}: no such file or directory")
    config = _read_json(directory / "tokenizer_config.json")
    if p.suffix == ".json":
        tok = _load_hf(p, directory, config)
    else:
        tok = _load_tiktoken(p, directory, config)
    if tok.bos_token and tok.bos_id is None:
        raise TokenizerError(f"{directory / 'tokenizer_config.json'}: bos_token "
                             f"{tok.bos_token!r} is not in the vocabulary")
    if tok.eos_token and tok.eos_id is None:
        raise TokenizerError(f"{directory / 'tokenizer_config.json'}: eos_token "
                             f"{tok.eos_token!r} is not in the vocabulary")
    return tok


__all__ = ["Tokenizer", "IncrementalDecoder", "TokenizerError", "ChatTemplateError",
           "load_tokenizer", "read_tiktoken_ranks", "replace_lone_surrogates", "write_tiktoken_ranks", "KIMI_PAT_STR"]
