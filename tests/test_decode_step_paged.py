"""The static decode step over the paged latent KV cache (hybrid/models/paged_kv_cache.py), on the
CPU with the torch op set (what a CUDA device runs), fp32, on a tiny DeepSeek-V3 checkpoint:

  - its logits equal the eager paged forward's and the static step's over a slot cache within
    1e-4, for rows of different lengths, two sequences sharing prefix blocks, padding rows, as
    the key-length bucket and the batch bucket change and the block tables grow;
  - it writes each token's row into its own block and padding rows into the spare block only;
  - the Engine with its default paged cache (block_size 16) and a decode runner gives the same
    greedy tokens as without one, for parallel requests sharing a prompt.
The host-sync count of the paged step is in test_decode_step.py (test_device_half_has_no_host_syncs).
"""

import pytest
import torch
from checkpoints import build

import hybrid
from hybrid.engine.step_runner import DecodeRunner

pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")

BS, P = 16, 160  # block size, max_len
SHARED = 48  # tokens of sequence 0's prompt that sequence 1's starts with: 3 whole blocks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = build(tmp_path_factory.mktemp("paged"), shards=1)
    return hybrid.load(path, device_ops="torch", dtype=torch.float32, progress=False, max_len=P).network


class Paged:
    """A paged cache and the block lists the engine would keep (blocks handed out in order)."""

    def __init__(self, net, slots=4, blocks=24):
        self.cache = net.make_cache(slots, P, num_blocks=blocks, block_size=BS)
        self.blocks: dict[int, list[int]] = {}
        self.next = 0

    def grow(self, slot: int, upto: int) -> None:
        """Blocks for positions 0..upto-1 of slot (new ones private)."""
        b = self.blocks.setdefault(slot, [])
        while len(b) * BS < upto:
            b.append(self.next)
            self.next += 1
        self.cache.set_blocks(slot, b)

    def share(self, slot: int, src: int, n_blocks: int) -> None:
        self.blocks[slot] = list(self.blocks[src][:n_blocks])
        self.cache.set_blocks(slot, self.blocks[slot])


def _forward(net, cache, ids, pos, slots):
    return net.forward(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), cache)


def _prompts():
    g = torch.Generator().manual_seed(1)
    p0 = torch.randint(2, 90, (60,), generator=g).tolist()
    p1 = p0[:SHARED] + torch.randint(2, 90, (6,), generator=g).tolist()
    p2 = torch.randint(2, 90, (7,), generator=g).tolist()
    return [p0, p1, p2]


def _prefill(net, slot_cache, pagers):
    """Slot cache: every prompt in full. Paged caches: sequence 1 shares sequence 0's first
    SHARED tokens' blocks and computes only its own tail."""
    prompts = _prompts()
    for s, p in enumerate(prompts):
        _forward(net, slot_cache, p, list(range(len(p))), [s] * len(p))
    for pg in pagers:
        pg.grow(0, len(prompts[0]))
        _forward(net, pg.cache, prompts[0], list(range(60)), [0] * 60)
        pg.share(1, 0, SHARED // BS)
        pg.grow(1, len(prompts[1]))
        _forward(net, pg.cache, prompts[1][SHARED:], list(range(SHARED, 54)), [1] * 6)
        pg.grow(2, len(prompts[2]))
        _forward(net, pg.cache, prompts[2], list(range(7)), [2] * 7)
    return [len(p) for p in prompts]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_paged_static_step_equals_eager_and_slot_static(tiny):
    net = tiny
    slot_cache = net.make_cache(4, P)
    eager, static = Paged(net), Paged(net)
    lengths = _prefill(net, slot_cache, [eager, static])
    shared_before = [t[eager.blocks[0][:3]].clone() for t in static.cache.kv]
    run_paged = DecodeRunner(net, static.cache, max_batch=4)
    run_slot = DecodeRunner(net, slot_cache, max_batch=4)
    g = torch.Generator().manual_seed(2)
    pos = list(lengths)
    # 3 rows (bucket 4: one padding row), then 2 rows (bucket 2) and 1; sequence 0 crosses
    # position 64 (a new block, key bucket 64 -> 128), sequence 2 crosses 16 (a new block).
    plan = [[0, 1, 2]] * 6 + [[2, 0]] * 2 + [[1]] + [[0, 1, 2]] * 2
    for slots in plan:
        ids = torch.randint(2, 90, (len(slots),), generator=g).tolist()
        p = [pos[s] for s in slots]
        for pg in (eager, static):
            for s, q in zip(slots, p):
                pg.grow(s, q + 1)
        la = _forward(net, eager.cache, ids, p, slots)
        lb = run_paged.step(ids, p, slots)
        lc = run_slot.step(ids, p, slots)
        assert lb.shape == la.shape == lc.shape
        _close(lb, la)
        _close(lb, lc)
        for s in slots:
            pos[s] += 1
    assert set(run_paged._inputs) >= {(4, 64), (4, 128), (2, 128), (1, 64)}
    assert static.blocks == eager.blocks and len(static.blocks[0]) == 5  # grown past position 64
    used = sorted({b for bl in static.blocks.values() for b in bl})
    spare = static.cache.spare_block
    for layer, (a, b) in enumerate(zip(eager.cache.kv, static.cache.kv)):
        # the same rows in every block a sequence owns; shared prefix blocks were never written
        torch.testing.assert_close(b[used], a[used], rtol=1e-4, atol=1e-5)
        assert torch.equal(b[eager.blocks[0][:3]], shared_before[layer])
        # blocks nobody was handed stay empty: padding rows wrote the spare block only
        free = [i for i in range(static.cache.num_blocks) if i not in used]
        assert b[free].abs().max() == 0 and b[spare].abs().max() > 0
        assert a[spare].abs().max() == 0  # the eager forward never touches it


def test_paged_tables_and_rows_the_host_half_reads(tiny):
    pg = Paged(tiny, slots=2, blocks=6)
    c = pg.cache
    c.set_blocks(0, [4, 1])
    c.set_blocks(1, [2])
    reads = c.decode_reads([0, 1, 0], 40)  # 40 keys: 3 blocks per row, past a row's own: spare
    assert reads.dtype == torch.int32 and reads.tolist() == [[4, 1, 6], [2, 6, 6], [4, 1, 6]]
    assert c.decode_rows([0, 1], [17, 3]).tolist() == [1 * BS + 1, 2 * BS + 3]
    assert c.spare_row == 6 * BS and c.kv[0].shape[0] == 7
    assert torch.equal(c.table.cpu(), c.host_table.long())  # the device table follows the host one
    c.reset(0)
    assert c.host_table[0].tolist() == [6] * c.blocks_per_slot


def test_model_gives_a_runner_for_the_paged_cache(recwarn):
    static = hybrid.load(progress=False, device_ops="torch", dtype=torch.float32, decode_steps="static")
    runner = static.decode_runner(static.make_cache(2, 64, num_blocks=8, block_size=16), 2)
    assert isinstance(runner, DecodeRunner) and not runner.graphs
    assert not [w for w in recwarn if "static decode" in str(w.message)]


@pytest.mark.parametrize("block_size", [16, None])
def test_engine_paged_with_runner_decodes_like_without(block_size):
    """Several requests at once sharing a prompt (3 whole blocks), each crossing block ends while
    it decodes: the same greedy tokens with the decode runner as with forward() steps; block_size
    None is the slot cache (hybrid serve --kv-block-size 0)."""
    from hybrid.engine.engine import Engine
    from hybrid.engine.sampling import SamplingParams

    outs, runners = [], []
    for steps in ("eager", "static"):
        m = hybrid.load(progress=False, device_ops="torch", dtype=torch.float32, decode_steps=steps)
        tok = m.tokenizer
        prefix = tok.encode(" ".join(f"rule {i}: be brief." for i in range(12)))[:48]
        prompts = [prefix + tok.encode(f" task {i}: greet agent {i}") for i in range(4)]
        params = SamplingParams(temperature=0.0, ignore_eos=True)
        with Engine(m, max_seqs=4, max_context=128, decode_runner=m.decode_runner,
                    block_size=block_size) as eng:
            handles = [eng.submit(p, params, max_tokens=20) for p in prompts]
            outs.append([h.result().token_ids for h in handles])
            stats, runners = eng.stats(), runners + [eng._runner]
    assert outs[0] == outs[1]
    assert runners[0] is None and runners[1].stats["steps"] >= 19
    assert {b for b, _ in runners[1]._inputs} >= {4}  # the four decoded together
    if block_size:
        assert stats["prompt_tokens_reused"] >= 3 * 48  # the prefix blocks were shared
