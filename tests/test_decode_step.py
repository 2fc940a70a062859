"""The device decode step from static buffers (hybrid/engine/step_runner.py) on the CPU with the
torch op set (HYBRID_DEVICE_OPS=torch: what a CUDA device runs):

  - its device half issues no host-syncing op (HostSyncCheck, hybrid/engine/sync_check.py)
    between the MoE hand-offs, while the eager forward does (the check sees real syncs);
  - its logits and KV rows equal the eager forward's on the same tokens, over batch-size and
    key-length buckets, with padding rows that touch no slot;
  - what it refuses, and the bucket rule.
"""

import pytest
import torch

import hybrid
from hybrid.engine.step_runner import DecodeRunner, batch_buckets, bucket_for, bucket_sizes
from hybrid.engine.sync_check import HostSyncCheck
from hybrid.experts.staging import static_rows

pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


@pytest.fixture(scope="module")
def demo_bf16():
    return hybrid.load(progress=False, device_ops="torch")


@pytest.fixture(scope="module")
def demo_fp32():
    return hybrid.load(progress=False, device_ops="torch", dtype=torch.float32)


def _prefilled(net, slots=4, max_len=160, paged=False):
    """A slot cache, or a paged one (blocks of 16) whose slot s holds blocks s*10, s*10+1, ..."""
    if paged:
        cache = net.make_cache(slots, max_len, num_blocks=10 * slots, block_size=16)
        for s in range(slots):
            cache.set_blocks(s, list(range(10 * s, 10 * s + 10)))
    else:
        cache = net.make_cache(slots, max_len)
    for s, p in enumerate(PROMPTS):
        net.forward(torch.tensor(p), torch.arange(len(p)), torch.full((len(p),), s), cache)
    return cache


def _eager(net, cache, ids, pos, slots):
    return net.forward(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), cache)


@pytest.mark.parametrize("paged", [False, True], ids=["slot", "paged"])
@pytest.mark.parametrize("rows", [1, 3])
def test_device_half_has_no_host_syncs(demo_bf16, rows, paged):
    net = demo_bf16.network
    cache = _prefilled(net, paged=paged)
    runner = DecodeRunner(net, cache, max_batch=4)
    ids, pos, slots = [20, 21, 22][:rows], [5, 2, 3][:rows], [0, 1, 2][:rows]
    key = runner.prepare(ids, pos, slots)  # host half: embedding rows, indices
    with HostSyncCheck() as check:
        runner.run(key)
    assert check.syncs == [], check.report()
    moe = len(net.moe_layers())
    # Measured on the demo model (5 layers, 4 MoE): 426 non-view aten ops per step, either cache.
    assert 50 * len(net.layers) < check.kernels < 150 * len(net.layers), check.report()
    kind = "paged" if paged else "slot"
    print(f"\nstatic decode step, {kind} cache, {rows} row(s): {check.report()}; with CUDA graphs "
          f"{2 * moe + 1} launches")

    other = _prefilled(net, paged=paged)
    with HostSyncCheck() as eager:  # the same step through forward(): the check sees its syncs
        _eager(net, other, ids, pos, slots)
    whats = {w for w, _ in eager.syncs}
    assert "Tensor.__int__()" in whats  # cache.check, SlotGroups' Q and L
    if rows > 1:
        assert "aten._unique2" in whats  # SlotGroups
    print(f"eager forward, {rows} row(s): {eager.report()}")


def test_check_flags_each_kind_of_host_sync():
    x = torch.arange(6.0)
    cases = {
        "aten._local_scalar_dense": lambda: x[0].item(),
        "Tensor.tolist()": lambda: x.tolist(),
        "Tensor.__bool__()": lambda: bool(x[1] > 0),
        "aten.nonzero": lambda: torch.nonzero(x),
        "aten._unique2": lambda: torch.unique(x),
        "aten.index with a boolean mask": lambda: x[x > 2],
        "aten.repeat_interleave by a tensor, without output_size": lambda: x.repeat_interleave(torch.ones(6, dtype=torch.long)),
    }
    for what, fn in cases.items():
        with HostSyncCheck() as check:
            fn()
        assert what in [w for w, _ in check.syncs], (what, check.syncs)
    with HostSyncCheck() as check:
        y = torch.topk(x * 2 + 1, 3).indices
        torch.zeros(6).index_add_(0, y, x[:3])
        x.repeat_interleave(torch.ones(6, dtype=torch.long), output_size=6)
        with check.pause():
            x.tolist()
        # A captured step's replay runs the hand-offs' host work between segments: unwatched.
        from hybrid.engine.graphs import SegmentedGraph

        SegmentedGraph.__new__(SegmentedGraph)._host(lambda t: t.tolist(), (x,))
    assert check.syncs == [] and check.kernels >= 4


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_static_step_matches_eager_forward(demo_fp32, rows):
    net = demo_fp32.network
    ca, cb = _prefilled(net), _prefilled(net)
    runner = DecodeRunner(net, cb, max_batch=4)
    slots = [0, 1, 2, 3][:rows]
    pos = [len(PROMPTS[s]) if s < len(PROMPTS) else 0 for s in slots]
    # Several steps: the key-length bucket moves from 64 to 128 at position 64.
    for step, ids in enumerate([[20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]]):
        if step == 2:
            pos = [p + 58 for p in pos]  # jump: positions 64.. (rows in between stay zero)
        la = _eager(net, ca, ids[:rows], pos, slots)
        lb = runner.step(ids[:rows], pos, slots)
        assert lb.shape == la.shape
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4 * la.abs().max().item())
        pos = [p + 1 for p in pos]
    assert {k for k in runner._inputs} >= {(bucket_for(runner.batch_sizes, rows), 64),
                                            (bucket_for(runner.batch_sizes, rows), 128)}
    for layer in range(len(ca.kv)):  # the same rows written, padding went to the spare row only
        torch.testing.assert_close(cb.kv[layer], ca.kv[layer], rtol=1e-4, atol=1e-5)
    if rows < 4:
        assert cb.kv[0][3].abs().max() == 0  # the free slot


def test_bf16_static_step_agrees_with_eager(demo_bf16):
    net = demo_bf16.network
    ca, cb = _prefilled(net), _prefilled(net)
    runner = DecodeRunner(net, cb, max_batch=4)
    la = _eager(net, ca, [20, 21, 22], [5, 2, 3], [0, 1, 2])
    lb = runner.step([20, 21, 22], [5, 2, 3], [0, 1, 2])
    assert (la - lb).abs().max() <= 0.02 * la.abs().max()
    assert torch.equal(la.argmax(-1), lb.argmax(-1))


def test_buckets():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(300, 64) == [64, 128, 256, 300]
    assert batch_buckets(1) == [1] and batch_buckets(6) == [1, 2, 4, 8] and batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(1000) == [1, 2, 4, 8, 16, 32, 64]  # STATIC_ROWS: more rows run eager
    assert static_rows(8) and not static_rows(6) and not static_rows(128)
    assert [bucket_for([1, 2, 4, 6], n) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


def test_fits_and_refusals(demo_bf16, demo_fp32):
    net = demo_bf16.network
    cache = net.make_cache(4, 128)
    runner = DecodeRunner(net, cache, max_batch=4)
    assert runner.fits([0, 1], [3, 9])
    assert not runner.fits([0, 0], [3, 4])  # two tokens of one slot: prefill, eager
    assert not runner.fits([0, 1, 2, 3, 0], [1] * 5)
    assert not runner.fits([0], [128])
    assert runner.bucket(3, 70) == (4, 128)
    with pytest.raises(ValueError, match="max_batch 5 must be in 1..4"):
        DecodeRunner(net, cache, max_batch=5)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeRunner(net, cache, max_batch=2, graphs=True)
    native = hybrid.load(progress=False, device_ops="native")
    with pytest.raises(ValueError, match="torch op set"):
        DecodeRunner(native.network, native.network.make_cache(1, 64), max_batch=1)


def test_refuses_a_cache_without_static_writes(tmp_path):
    from checkpoints_qwen3 import build as build_qwen3

    path, _ = build_qwen3(tmp_path)
    m = hybrid.load(path, progress=False, device_ops="torch", experts_backend="torch")
    with pytest.raises(ValueError, match="HeadKVCache has no static decode write"):
        DecodeRunner(m.network, m.network.make_cache(2, 64), max_batch=2)


def test_engine_runs_decode_steps_through_the_runner():
    from hybrid.engine.engine import Engine
    from hybrid.engine.sampling import SamplingParams

    eager = hybrid.load(progress=False, device_ops="torch", dtype=torch.float32, decode_steps="eager")
    static = hybrid.load(progress=False, device_ops="torch", dtype=torch.float32, decode_steps="static")
    assert eager.decode_runner(eager.make_cache(2, 64), 2) is None
    prompts = [eager.tokenizer.encode(t) for t in ("The Python tutorial", "def main():", "Hello")]
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    outs = []
    for m in (eager, static):
        # block_size=None: a slot cache (the paged one: test_decode_step_paged.py)
        with Engine(m, max_seqs=2, max_context=96, decode_runner=m.decode_runner, block_size=None) as eng:
            handles = [eng.submit(p, params, max_tokens=12) for p in prompts]  # 3 requests, 2 slots
            outs.append([h.result().token_ids for h in handles])
            runner = eng._runner
    assert outs[0] == outs[1]
    assert runner.stats["steps"] >= 12 and runner.stats["replays"] == 0  # eager replays: no graphs
    assert {b for b, _ in runner._inputs} <= {1, 2}


def test_decode_steps_option():
    assert hybrid.load(progress=False)._decode_steps == "eager"  # CPU, native ops: auto = eager
    with pytest.raises(ValueError, match="decode_steps must be one of auto, eager, static, graphs"):
        hybrid.load(progress=False, decode_steps="fast")
    with pytest.raises(ValueError, match="needs the torch op set"):
        hybrid.load(progress=False, decode_steps="static", device_ops="native")
    with pytest.raises(ValueError, match="'graphs' needs a CUDA device"):
        hybrid.load(progress=False, decode_steps="graphs", device_ops="torch")


def test_bucket_larger_than_the_cache(demo_fp32):
    """3 slots, 3 rows: bucket 4, whose padding row needs no slot (it writes the spare row)."""
    net = demo_fp32.network
    ca, cb = _prefilled(net, slots=3), _prefilled(net, slots=3)
    runner = DecodeRunner(net, cb, max_batch=3)
    assert runner.batch_sizes == [1, 2, 4]
    la = _eager(net, ca, [20, 21, 22], [5, 2, 3], [0, 1, 2])
    lb = runner.step([20, 21, 22], [5, 2, 3], [0, 1, 2])
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4 * la.abs().max().item())
    for layer in range(len(ca.kv)):
        torch.testing.assert_close(cb.kv[layer], ca.kv[layer], rtol=1e-4, atol=1e-5)


def test_staging_buffers_are_fixed_for_batch_buckets():
    """PinnedStaging's buffer rule, on device buffers (pinned memory needs CUDA): a power-of-two
    batch up to STATIC_ROWS keeps one buffer (a captured step reads the same address every
    replay); other sizes share one growing buffer, so prefill chunks do not pile up pinned memory."""
    from hybrid.experts.staging import PinnedStaging

    st = PinnedStaging()
    a = st._buffer("x", (4, 8), torch.bfloat16, "cpu")
    assert st._buffer("x", (4, 8), torch.bfloat16, "cpu").data_ptr() == a.data_ptr()
    st._buffer("x", (100, 8), torch.bfloat16, "cpu")
    st._buffer("x", (300, 8), torch.bfloat16, "cpu")
    g = st._buffer("x", (37, 8), torch.bfloat16, "cpu")
    assert g.shape == (37, 8) and st._buffer("x", (300, 8), torch.bfloat16, "cpu").data_ptr() == g.data_ptr()
    assert st._buffer("x", (4, 8), torch.bfloat16, "cpu").data_ptr() == a.data_ptr()
    assert len(st._buffers) == 2
