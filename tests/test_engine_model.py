"""A tiny real transformer that follows the engine's model contract, and a tiny Kimi-style
tokenizer; the engine tests import both. The tests here check the stand-in itself: its cached,
ragged, chunked forward must equal a from-scratch forward of each whole sequence.

Contract (hybrid/models): forward(input_ids [T], positions [T], slots [T], cache,
logits_index [n] | None) -> logits [n, V]; each token's K/V goes to cache[slot, position] and
each token attends to positions <= its own in its own slot.

Legend: T tokens in the batch, S slots, P max positions, H hidden, D head width, V vocabulary.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from hybrid.tokenizer import load_tokenizer, write_tiktoken_ranks

N_BASE = 256 + 6  # byte tokens + the merges below
MERGES = [b"he", b"ll", b"hel", b"hell", b"hello", b"lo"]
SPECIALS = {N_BASE: "[BOS]", N_BASE + 1: "[EOS]", N_BASE + 2: "<|im_end|>",
            N_BASE + 3: "<|im_user|>", N_BASE + 4: "<|im_assistant|>", N_BASE + 5: "<|im_system|>",
            N_BASE + 6: "<|im_middle|>", N_BASE + 7: "<think>", N_BASE + 8: "</think>"}
VOCAB = N_BASE + 256  # Kimi reserves 256 special ids after the BPE vocabulary


def write_tiny_tokenizer(directory) -> None:
    ranks = {bytes([i]): i for i in range(256)}
    for j, m in enumerate(MERGES):
        ranks[m] = 256 + j
    write_tiktoken_ranks(ranks, directory / "tiktoken.model")
    config = {"bos_token": "[BOS]", "eos_token": "[EOS]", "add_bos_token": True,
              "added_tokens_decoder": {str(k): {"content": v, "special": True}
                                       for k, v in SPECIALS.items()}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return load_tokenizer(d)


@pytest.fixture
def one_thread():
    """The tiny model's ops are microseconds; torch's thread pool costs more than it gives
    (and on a busy shared machine, far more). Restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyCache:
    """K and V per layer: [L, S, P, H]; the same role as LatentKVCache for TinyLM."""

    def __init__(self, layers: int, num_slots: int, max_len: int, hidden: int, dtype=torch.float64):
        self.num_slots, self.max_len = num_slots, max_len
        self.k = torch.zeros(layers, num_slots, max_len, hidden, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.resets = []  # slots reset so far (tests check freed slots are reset)

    def reset(self, slot: int) -> None:
        self.k[:, slot].zero_()
        self.v[:, slot].zero_()
        self.resets.append(slot)


class TinyLM(torch.nn.Module):
    """Pre-norm transformer: learned positions, multi-head attention over the slot cache, MLP.
    float64 so that batch composition cannot flip a greedy argmax through rounding."""

    def __init__(self, vocab=VOCAB, hidden=32, layers=2, heads=4, max_pos=256, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *s, scale=1.0: torch.nn.Parameter(  # noqa: E731
            torch.randn(*s, generator=g, dtype=torch.float64) * scale)
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=max_pos)
        self.hidden, self.layers, self.heads = hidden, layers, heads
        self.embed = r(vocab, hidden)
        self.pos = r(max_pos, hidden, scale=0.5)
        s = 1 / math.sqrt(hidden)
        self.qkv = torch.nn.ParameterList([r(hidden, 3 * hidden, scale=s) for _ in range(layers)])
        self.o = torch.nn.ParameterList([r(hidden, hidden, scale=s) for _ in range(layers)])
        self.up = torch.nn.ParameterList([r(hidden, 2 * hidden, scale=s) for _ in range(layers)])
        self.down = torch.nn.ParameterList([r(2 * hidden, hidden, scale=s) for _ in range(layers)])
        self.head = r(hidden, vocab, scale=3 * s)  # peaked enough that sampling is not uniform

    def make_cache(self, num_slots: int, max_len: int) -> TinyCache:
        return TinyCache(self.layers, num_slots, max_len, self.hidden)

    def online_stats(self):
        return None  # no expert placement here

    def layerwise_chunks(self):
        return None  # no layerwise prefill here

    @staticmethod
    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, input_ids, positions, slots, cache, logits_index=None):
        T, H, NH = input_ids.shape[0], self.hidden, self.heads
        D = H // NH
        x = self.embed[input_ids] + self.pos[positions]  # [T, H]
        P = cache.max_len
        visible = torch.arange(P)[None, :] <= positions[:, None]  # [T, P]
        for layer in range(self.layers):
            q, k, v = (self._norm(x) @ self.qkv[layer]).split(H, dim=-1)  # [T, H] each
            cache.k[layer, slots, positions] = k
            cache.v[layer, slots, positions] = v
            K = cache.k[layer, slots].view(T, P, NH, D)  # [T, P, NH, D]
            Vv = cache.v[layer, slots].view(T, P, NH, D)
            scores = (K * q.view(T, 1, NH, D)).sum(-1) / math.sqrt(D)  # [T, P, NH]
            scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
            att = (torch.softmax(scores, 1)[..., None] * Vv).sum(1).reshape(T, H)  # [T, H]
            x = x + att @ self.o[layer]
            x = x + torch.nn.functional.silu(self._norm(x) @ self.up[layer]) @ self.down[layer]
        logits = self._norm(x) @ self.head  # [T, V]
        return logits if logits_index is None else logits[logits_index]


def full_logits(model: TinyLM, ids: list[int]) -> torch.Tensor:
    """Last-position logits from a fresh cache and the whole sequence at once: no reuse."""
    T = len(ids)
    cache = model.make_cache(1, T)
    with torch.no_grad():
        return model(torch.tensor(ids), torch.arange(T), torch.zeros(T, dtype=torch.long), cache)[-1]


def reference_greedy(model: TinyLM, prompt: list[int], n: int, stop_ids=()) -> list[int]:
    out = []
    for _ in range(n):
        t = int(torch.argmax(full_logits(model, prompt + out)))
        if t in stop_ids:
            break
        out.append(t)
    return out


def test_ragged_chunked_forward_equals_full_forward(one_thread):
    model = TinyLM()
    cache = model.make_cache(3, 64)
    a, b = list(range(5, 20)), list(range(100, 107))
    with torch.no_grad():
        # step 1: a's first 10 tokens in slot 2 and b's whole prompt in slot 0, one flat batch
        ids = torch.tensor(a[:10] + b)
        pos = torch.tensor(list(range(10)) + list(range(7)))
        slots = torch.tensor([2] * 10 + [0] * 7)
        out = model(ids, pos, slots, cache, logits_index=torch.tensor([16]))
        torch.testing.assert_close(out[0], full_logits(model, b), rtol=1e-12, atol=1e-12)
        # step 2: the rest of a
        out = model(torch.tensor(a[10:]), torch.arange(10, 15), torch.full((5,), 2), cache,
                    logits_index=torch.tensor([4]))
        torch.testing.assert_close(out[0], full_logits(model, a), rtol=1e-12, atol=1e-12)


def test_tiny_tokenizer_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id) == (N_BASE, N_BASE + 1)
    assert tok.stop_token_ids == [N_BASE + 1, N_BASE + 2]  # [EOS] and <|im_end|>
    assert tok.encode("hello") == [256 + 4]
