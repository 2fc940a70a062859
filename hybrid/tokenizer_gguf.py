"""The tokenizer a GGUF file carries (tokenizer.ggml.*), as hybrid.tokenizer's Tokenizer, so chat
and serve run from the file alone.

GGUF "gpt2" vocabularies are byte-level BPE (facts from llama.cpp's converter and vocab loader):
  tokenizer.ggml.model       "gpt2" (other models, e.g. SentencePiece "llama", are refused)
  tokenizer.ggml.tokens      [V] strings, token bytes spelled with GPT-2's byte table
  tokenizer.ggml.token_type  [V] 1 normal, 2 unknown, 3 control (special), 4 user-defined, 5 unused, 6 byte
  tokenizer.ggml.merges      "left right" pairs in priority order
  tokenizer.ggml.pre         the pre-tokenizer's name; each name is a regex set (below)
  tokenizer.ggml.bos_token_id / eos_token_id / add_bos_token, tokenizer.chat_template
Pre-tokenizer "kimi-k2" runs on tiktoken with Kimi's own regex (ranks = ids, which is how Kimi's
tiktoken.model defines its merges); the others on the tokenizers library's BPE with the merges
as stored and the named regex split before the byte-level step.
"""

from __future__ import annotations

from hybrid.loaders.gguf_file import GGUFError, GGUFFile
from hybrid.tokenizer import KIMI_PAT_STR, Tokenizer, TokenizerError, byte_to_unicode

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

# llama.cpp's pre-tokenizer names -> the regexes of the original tokenizers (facts, in order).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_REGEXES: dict[str, tuple[str, ...] | None] = {
    "gpt-2": None,  # the byte-level step's own GPT-2 regex
    "default": None,
    "llama3": (_LLAMA3,), "llama-bpe": (_LLAMA3,),
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "deepseek-v3": (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
TIKTOKEN_PRES = {"kimi-k2": KIMI_PAT_STR}


def gguf_tokenizer(path) -> Tokenizer:
    """The Tokenizer of a GGUF file's metadata (a path, or a GGUFFile already open: its metadata
    is not parsed again); TokenizerError naming the file and key."""
    g = path if isinstance(path, GGUFFile) else GGUFFile(path)
    try:
        return tokenizer_from_fields(g)
    except GGUFError as e:
        raise TokenizerError(str(e)) from None
    finally:
        if g is not path:
            g.close()


def tokenizer_from_fields(g: GGUFFile) -> Tokenizer:
    src = f"{g.path}"
    model = g.field("tokenizer.ggml.model", str)
    if model != "gpt2":
        raise TokenizerError(f"{src}: metadata key tokenizer.ggml.model={model!r} is not supported (only "
                             "'gpt2', byte-level BPE)")
    tokens = g.field("tokenizer.ggml.tokens", list)
    types = g.field("tokenizer.ggml.token_type", list, [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(f"{src}: metadata tokenizer.ggml.token_type has {len(types)} entries, "
                             f"tokenizer.ggml.tokens {len(tokens)}")
    pre = g.field("tokenizer.ggml.pre", str, "default")
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_CONTROL}
    added = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_USER_DEFINED}

    def named(key):
        i = g.field(key, int, None)
        if i is not None and not 0 <= i < len(tokens):
            raise TokenizerError(f"{src}: metadata key {key}={i} is outside the {len(tokens)} tokens")
        return None if i is None else tokens[i]

    bos, eos = named("tokenizer.ggml.bos_token_id"), named("tokenizer.ggml.eos_token_id")
    template = g.field("tokenizer.chat_template", str, None)
    add_bos = bool(g.field("tokenizer.ggml.add_bos_token", bool, False))
    if pre in TIKTOKEN_PRES:
        impl, backend = _tiktoken(src, tokens, types, special | added, TIKTOKEN_PRES[pre]), "tiktoken"
        special = special | added  # tiktoken matches both as special text
    elif pre in PRE_REGEXES:
        merges = g.field("tokenizer.ggml.merges", list)
        impl, backend = _hf_bpe(src, tokens, merges, special, added, PRE_REGEXES[pre]), "hf"
    else:
        raise TokenizerError(f"{src}: metadata key tokenizer.ggml.pre={pre!r} names a pre-tokenizer hybrid "
                             f"does not know (known: {', '.join(sorted([*PRE_REGEXES, *TIKTOKEN_PRES]))})")
    # Ids past the last used token are padding rows of the embedding ("[PAD{id}]", type unused):
    # the vocabulary ends before them, so the engine never samples one (as with the original).
    used = max((i for i, ty in enumerate(types) if ty != TOKEN_UNUSED), default=len(tokens) - 1) + 1
    return Tokenizer(backend=backend, impl=impl, special_tokens=special, vocab_size=used,
                     bos_token=bos, eos_token=eos, add_bos=add_bos, chat_template=template,
                     extra_stop_ids=_eot_ids(g), source=src)


def _eot_ids(g: GGUFFile) -> list[int]:
    return [i for i in (g.field(k, int, None) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"))
            if i is not None]


def _tiktoken(src: str, tokens, types, special: dict[str, int], pat: str):
    import tiktoken

    inverse = {ch: b for b, ch in byte_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty != TOKEN_NORMAL:
            continue
        try:
            ranks[bytes(inverse[ch] for ch in t)] = i
        except KeyError:
            raise TokenizerError(f"{src}: token {i} {t!r} is not spelled with GPT-2's byte table") from None
    try:
        return tiktoken.Encoding(name=f"hybrid:{src}", pat_str=pat, mergeable_ranks=ranks, special_tokens=special)
    except ValueError as e:
        raise TokenizerError(f"{src}: tiktoken rejected the vocabulary: {e}") from None


def _hf_bpe(src: str, tokens, merges, special: dict[str, int], added: dict[str, int], regexes):
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    pairs = []
    for j, m in enumerate(merges):
        left, sep, right = m.partition(" ")
        if not sep:
            raise TokenizerError(f"{src}: metadata tokenizer.ggml.merges[{j}]={m!r} is not 'left right'")
        pairs.append((left, right))
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        tok = HFTokenizer(models.BPE(vocab, pairs))
    except Exception as e:  # the Rust side raises plain Exceptions
        raise TokenizerError(f"{src}: the BPE vocabulary is inconsistent: {e}") from None
    if regexes is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                        use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(special, key=special.get)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in sorted(added, key=added.get)])
    return tok


__all__ = ["gguf_tokenizer", "tokenizer_from_fields", "PRE_REGEXES"]
