"""The paged KV cache's parts on their own: the block pool (reference counts, the prefix tree,
copy-on-write matches, LRU eviction, reservations) and PagedLatentKVCache's gather/scatter
against the slot cache holding the same rows."""

import pytest
import torch

from hybrid.engine.block_pool import BlockPool
from hybrid.models.kv_cache import LatentKVCache
from hybrid.models.paged_kv_cache import PagedLatentKVCache
from hybrid.ops.paged_kv import TorchPagedKV

B = 4


def publish(pool, tokens, writer=None):
    """Blocks for tokens' full blocks (ref 1 each), inserted along one path -> their ids."""
    parent, blocks = pool.root, []
    pool.reserve(len(tokens) // B)
    for i in range(len(tokens) // B):
        b = pool.allocate()
        parent = pool.insert(parent, tuple(tokens[i * B:(i + 1) * B]), b, writer)
        blocks.append(b)
    return blocks


def test_ref_counts_cache_and_free():
    pool = BlockPool(8, B)
    blocks = publish(pool, list(range(12)))
    assert [pool.ref[b] for b in blocks] == [1, 1, 1] and pool.available() == 5
    m = pool.match(list(range(12)) + [99], limit=12)
    assert [n.block for n in m.nodes] == blocks and m.tokens == 12
    for b in blocks:
        pool.acquire(b)  # a second sequence shares them
    assert pool.counts()["kv_blocks_shared"] == 3
    for b in blocks:
        pool.release(b)
        pool.release(b)
    c = pool.counts()
    # nobody holds them: cached (still matchable), and counted as available
    assert (c["kv_blocks_used"], c["kv_blocks_cached"], c["kv_blocks_free"]) == (0, 3, 5)
    assert pool.available() == 8
    with pytest.raises(RuntimeError, match="not in use"):
        pool.release(blocks[0])
    private = (pool.reserve(1), pool.allocate())[1]
    pool.release(private)  # not in the tree: free again
    assert pool.counts()["kv_blocks_free"] == 5


def test_match_stops_at_the_limit_and_copies_a_partial_block():
    pool = BlockPool(8, B)
    publish(pool, [1, 2, 3, 4, 5, 6, 7, 8])
    # the limit keeps the prompt's last token out of the match
    assert pool.match([1, 2, 3, 4, 5, 6, 7, 8], limit=7).tokens == 7
    m = pool.match([1, 2, 3, 4, 5, 6, 7, 8], limit=7)
    assert len(m.nodes) == 1 and m.copy_tokens == 3  # block 2 is copied, 3 of its tokens reused
    m = pool.match([1, 2, 3, 4, 5, 6, 0, 0, 0], limit=8)
    assert len(m.nodes) == 1 and m.copy_tokens == 2  # copy-on-write at the first differing block
    assert pool.match([9, 2, 3, 4], limit=3).tokens == 0


def test_a_block_being_written_is_shared_but_never_copied():
    pool = BlockPool(8, B)
    publish(pool, [1, 2, 3, 4, 5, 6, 7, 8], writer=7)
    m = pool.match([1, 2, 3, 4, 5, 6, 7, 8, 9], limit=8)
    assert len(m.nodes) == 2  # whole blocks: shared, the sharer waits for writer 7
    m = pool.match([1, 2, 3, 4, 5, 6, 0], limit=6)
    assert len(m.nodes) == 1 and m.copy_tokens == 0  # its rows are not there yet to copy


def test_lru_eviction_takes_unreferenced_leaves_oldest_first():
    pool = BlockPool(4, B)
    a = publish(pool, [1] * 8)  # a path of two blocks
    b = publish(pool, [2] * 4)
    for x in b + a[::-1]:  # released: b first (oldest), then a's leaf, then a's root block
        pool.release(x)
    pool.reserve(3)
    got = [pool.allocate() for _ in range(3)]
    assert got[0] not in a + b  # the never-used block goes first
    assert got[1] == b[0]  # then the least recently used leaf
    assert got[2] == a[1]  # a's root block has a child: its leaf goes before it
    assert pool.match([1] * 8, limit=8).tokens == 4 and pool.evictions == 2
    with pytest.raises(RuntimeError, match="nothing reserved"):
        pool.allocate()


def test_reservations_bound_what_admission_may_promise():
    pool = BlockPool(4, B)
    pool.reserve(3)
    assert pool.available() == 1
    with pytest.raises(RuntimeError, match="2 blocks asked, 1 available"):
        pool.reserve(2)
    pool.unreserve(3)
    assert pool.available() == 4


def test_drop_frees_a_never_written_path():
    pool = BlockPool(4, B)
    blocks = publish(pool, [1] * 8, writer=3)
    pool.drop(pool.node_of[blocks[0]])  # its writer failed; the child goes with it
    assert pool.node_of == {} and pool.match([1] * 9, limit=8).tokens == 0
    for b in blocks:
        pool.release(b)
    assert pool.counts()["kv_blocks_free"] == 4


class _Config:
    num_hidden_layers, kv_lora_rank, qk_rope_head_dim = 2, 6, 2
    latent_width = 8


def test_paged_cache_reads_what_a_slot_cache_holds():
    torch.manual_seed(0)
    cfg, P = _Config(), 10
    slot = LatentKVCache(cfg, 2, P, dtype=torch.float32)
    paged = PagedLatentKVCache(cfg, 2, P, num_blocks=7, block_size=B, paged=TorchPagedKV(),
                               dtype=torch.float32)
    paged.set_blocks(0, [5, 1, 3])
    paged.set_blocks(1, [0, 6])
    slots = torch.tensor([0] * 10 + [1] * 7)
    pos = torch.cat([torch.arange(10), torch.arange(7)])
    for layer in range(2):
        lat, rope = torch.randn(17, 6), torch.randn(17, 2)
        slot.write(layer, slots, pos, lat, rope)
        paged.write(layer, slots, pos, lat, rope)
        u = torch.tensor([1, 0])
        for n in (1, 4, 7):
            assert torch.equal(paged.rows(layer, u, n), slot.rows(layer, u, n))
        grid, local, commit = paged.decode_view(layer, torch.tensor([0, 1]), torch.tensor([9, 6]))
        assert torch.equal(grid[1, :7], slot.rows(layer, torch.tensor([1]), 7)[0])
        grid[0, 9] = 42.0  # what a fused kernel writes for token 0 lands in slot 0's block
        commit()
        assert torch.all(paged.kv[layer][3][1] == 42.0)
    paged.copy_block(3, 2)
    assert all(torch.equal(t[2], t[3]) for t in paged.kv)
    with pytest.raises(ValueError, match="at most 3"):
        paged.set_blocks(0, [0, 1, 2, 3])
    with pytest.raises(IndexError, match="0..6"):
        paged.set_blocks(0, [7])
    with pytest.raises(ValueError, match="num_blocks must be a positive integer"):
        PagedLatentKVCache(cfg, 2, P, num_blocks=0, block_size=B, paged=TorchPagedKV())


class _Req:
    def __init__(self, rid, prompt, max_tokens=4):
        self.id, self.prompt, self.tokens, self.max_tokens = rid, prompt, prompt, max_tokens
        self.keys = prompt  # what the KV depends on (the engine's: ids, image pixels by hash)
        self.computed = self.reused = 0
        self.slot = self.kv = None

    def computed_keys(self):
        return self.keys[:self.computed]


def test_an_abandoned_prefix_goes_to_the_holder_that_waits_for_no_one():
    from hybrid.engine.kv_slots import PagedKV

    cache = PagedLatentKVCache(_Config(), 3, 32, num_blocks=24, block_size=B, paged=TorchPagedKV(),
                               dtype=torch.float32)
    kv = PagedKV(cache, 3, prefix_reuse=True)
    base = list(range(12))  # three full blocks
    a, b, c = _Req(1, base + [50]), _Req(2, base + [60] * 5), _Req(3, base + [60] * 5 + [70] * 4)
    for r in (a, b, c):
        assert kv.admit(r)
        r.reused = r.computed
    assert (a.computed, b.computed, c.computed) == (0, 12, 16)  # c shares a's and b's blocks
    assert not kv.ready(b) and not kv.ready(c)  # both wait for a, who has written nothing
    kv.release(a, kv_valid=True)  # a goes away: its three blocks are orphaned
    assert not kv.ready(c)  # c still waits for b's block, so it must not take a's
    assert kv.ready(b) and b.computed == 0 and b.reused == 0  # b recomputes them
    assert not kv.ready(c)  # ... and c now waits for b
    kv.prepare([(b, len(b.prompt))])
    b.computed = len(b.prompt)
    kv.advance(b)
    assert kv.ready(c) and c.computed == 16  # everything it shares is written
    kv.prepare([(c, len(c.prompt) - 16)])
    c.computed = len(c.prompt)
    kv.advance(c)
    for r in (b, c):
        kv.release(r, kv_valid=True)
    counts = kv.counts()
    assert counts["kv_blocks_used"] == 0 and counts["kv_blocks_reserved"] == 0
    assert counts["kv_blocks_cached"] + counts["kv_blocks_free"] == 24
    # the finished prompts stay matchable: the whole of c's prompt but its last token
    assert kv.pool.match(c.prompt, len(c.prompt) - 1).tokens == len(c.prompt) - 1


def test_a_request_as_large_as_the_pool_skips_the_copy_it_has_no_room_for():
    from hybrid.engine.kv_slots import PagedKV

    cache = PagedLatentKVCache(_Config(), 1, 32, num_blocks=8, block_size=B, paged=TorchPagedKV(),
                               dtype=torch.float32)
    kv = PagedKV(cache, 1, prefix_reuse=True)
    first = _Req(1, list(range(10)), max_tokens=1)
    assert kv.admit(first)
    kv.prepare([(first, 10)])
    first.computed = 10
    kv.advance(first)
    kv.release(first, kv_valid=True)  # leaves two full blocks and a tail of 2 tokens
    nxt = _Req(2, list(range(10)) + [99] * 3, max_tokens=32 - 13)  # 8 blocks: the whole pool
    assert kv.admit(nxt)  # admitted (no copy of the tail: it would need a ninth block)
    assert nxt.computed == 8
    kv.prepare([(nxt, 5)])
    assert kv.counts()["kv_blocks_used"] == 4  # the two shared blocks and two of its own
