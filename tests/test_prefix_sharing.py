"""Shared-prefix KV across live requests, on the embedded demo model (a DeepSeek-V3 model, so the
engine gives it a paged latent cache): many requests with one long prompt prefix compute it once
and answer exactly as when run one at a time; a writer that goes away leaves its blocks to a
sharer; the next chat turn copies the last partial block; a small budget evicts; every block is
given back at the end. Greedy decoding in fp32, where batching cannot flip an argmax."""

import functools

import pytest
import torch

from hybrid.engine import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, ignore_eos=True)
BLOCK = 16


@functools.cache
def demo(dtype=torch.float32):
    import hybrid
    from hybrid.api import DEMO_DIR

    if not (DEMO_DIR / "config.json").is_file():
        pytest.skip("no embedded demo model in this tree")
    return hybrid.load(None, dtype=dtype, progress=False)


@pytest.fixture(scope="module")
def model():
    return demo()


def shared_prefix(tok, n=1000):
    ids = tok.encode(" ".join(f"rule {i}: answer briefly and use the tools." for i in range(n // 8)))
    assert len(ids) >= n
    return ids[:n]


def tasks(tok, prefix, n):
    return [prefix + tok.encode(f" task {i}: say hi to agent {i}") for i in range(n)]


def all_blocks_back(stats):
    return (stats["kv_blocks_used"] == 0 and stats["kv_blocks_reserved"] == 0
            and stats["kv_blocks_cached"] + stats["kv_blocks_free"] == stats["kv_blocks_total"])


def test_64_concurrent_requests_share_one_prefix(model):
    tok = model.tokenizer
    prompts = tasks(tok, shared_prefix(tok), 64)
    with Engine(model, max_seqs=64, max_context=1100) as eng:
        handles = [eng.submit(p, GREEDY, max_tokens=6) for p in prompts]
        together = [h.result() for h in handles]
        s = eng.stats()
    # one at a time, in a fresh engine (each reuses what the one before left, as a chat would)
    with Engine(model, max_seqs=1, max_context=1100) as eng:
        alone = [eng.generate(p, GREEDY, max_tokens=6) for p in prompts]
    # and from scratch, no reuse at all, for a few
    with Engine(model, max_seqs=1, max_context=1100, prefix_reuse=False) as eng:
        scratch = [eng.generate(p, GREEDY, max_tokens=6) for p in prompts[:3]]
    assert [c.token_ids for c in together] == alone
    assert alone[:3] == scratch
    # the prefix was computed once: every request after the first found its full blocks
    total = sum(map(len, prompts))
    shared = 1000 // BLOCK * BLOCK
    assert s["prompt_tokens_reused"] >= 63 * shared
    assert s["prompt_tokens_computed"] == total - s["prompt_tokens_reused"]
    assert s["prompt_tokens_computed"] < 1000 + 64 * (len(prompts[-1]) - shared)
    assert all(c.usage.cached_tokens >= shared for c in together[1:])
    assert all_blocks_back(s)


def test_a_writer_that_goes_away_leaves_its_blocks_to_a_sharer(model):
    tok = model.tokenizer
    first, second = tasks(tok, shared_prefix(tok), 2)
    with Engine(model, max_seqs=2, max_context=1100, prefill_chunk=32) as eng:
        a = eng.submit(first, GREEDY, max_tokens=4)
        b = eng.submit(second, GREEDY, max_tokens=4)  # shares a's blocks, which a has yet to write
        a.cancel()  # lands after at most a step or two: most of the prefix is unwritten
        done = b.result()
        s = eng.stats()
    with Engine(model, max_seqs=1, max_context=1100, prefix_reuse=False) as eng:
        assert done.token_ids == eng.generate(second, GREEDY, max_tokens=4)
    assert done.usage.cached_tokens < 1000 // BLOCK * BLOCK  # b computed what a left undone
    assert s["prompt_tokens_computed"] + s["prompt_tokens_reused"] >= len(second)
    assert all_blocks_back(s)


def test_next_turn_copies_the_partial_block(model):
    tok = model.tokenizer
    first = tok.encode("system: be brief. user: hello there, how are you today?")
    with Engine(model, max_seqs=2, max_context=256) as eng:
        out1 = eng.generate(first, GREEDY, max_tokens=5)
        second = first + out1 + tok.encode(" user: and then?")
        done = eng.complete(second, GREEDY, max_tokens=5)
        s = eng.stats()
    reused = len(first) + len(out1) - 1  # the last answer token was never fed
    assert reused % BLOCK  # so the last reused block is partial: copied, not shared
    assert done.usage.cached_tokens == reused and s["prompt_tokens_reused"] == reused
    with Engine(model, max_seqs=1, max_context=256, prefix_reuse=False) as eng:
        assert done.token_ids == eng.generate(second, GREEDY, max_tokens=5)
    assert all_blocks_back(s)


def test_a_small_budget_evicts_the_oldest_prefixes(model):
    tok = model.tokenizer
    prompts = [tok.encode(f"prompt number {i}: " + "words " * 20) for i in range(6)]
    with Engine(model, max_seqs=2, max_context=256, kv_blocks=8) as eng:
        outs = [eng.generate(p, GREEDY, max_tokens=4) for p in prompts]
        with pytest.raises(ValueError, match="needs 9 KV blocks; the cache has 8"):
            eng.submit(list(range(100)), GREEDY, max_tokens=40)
        s = eng.stats()
        assert s["kv_blocks_total"] == 8 and all_blocks_back(s)
        assert eng._kv.pool.evictions > 0
        # the newest prompt's blocks are still cached: asking again reuses them
        again = eng.complete(prompts[-1], GREEDY, max_tokens=4)
        assert again.token_ids == outs[-1] and again.usage.cached_tokens >= BLOCK
    with Engine(model, max_seqs=1, max_context=128, prefix_reuse=False) as eng:
        assert outs == [eng.generate(p, GREEDY, max_tokens=4) for p in prompts]


def test_native_decode_reads_the_paged_cache_as_the_slot_cache():
    # bf16 on the CPU: the native MLA decode kernel, through the paged cache's decode_view
    m = demo(torch.bfloat16)
    if m.network.ops.name != "native":
        pytest.skip("the native extension is not built")
    tok = m.tokenizer
    prompts = [tok.encode(f"question {i}: what does len do?") for i in range(3)]
    outs = []
    for block_size in (BLOCK, None):
        with Engine(m, max_seqs=3, max_context=128, block_size=block_size, prefix_reuse=False) as eng:
            handles = [eng.submit(p, GREEDY, max_tokens=8) for p in prompts]
            outs.append([h.result().token_ids for h in handles])
    assert outs[0] == outs[1]


def test_memory_check_counts_the_spare_block(model, monkeypatch):
    """The paged pool allocates its blocks and one spare block (padding rows of a static decode
    step write it); the engine's check before allocating counts both."""
    import types

    import psutil

    per_token = model.kv_bytes_per_token()
    blocks = 8
    with Engine(model, max_seqs=1, max_context=128, kv_blocks=blocks) as eng:
        allocated = eng.cache.nbytes
    assert allocated == (blocks + 1) * BLOCK * per_token
    for available, fits in ((allocated - 1, False), (allocated, True)):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available))
        if fits:
            Engine(model, max_seqs=1, max_context=128, kv_blocks=blocks).close()
        else:
            with pytest.raises(MemoryError, match=r"8 blocks of 16 tokens, and a spare block"):
                Engine(model, max_seqs=1, max_context=128, kv_blocks=blocks)
