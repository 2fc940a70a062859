"""The CUDA half of the static decode step (hybrid/engine/step_runner.py, graphs.py,
hybrid/experts/staging.py PinnedStaging): captured graph segments replay the eager step's
logits, over a slot cache and a paged one with shared blocks, with 2M + 1 launches per step and
no host sync on the device side. Skipped without a
CUDA device (CI has none; bench/gpu_check.py runs the same on a GPU machine)."""

import pytest
import torch

import hybrid
from hybrid.engine.step_runner import DecodeRunner
from hybrid.engine.sync_check import HostSyncCheck

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _prefilled(net, slots=4, max_len=160):
    cache = net.make_cache(slots, max_len)
    for s, p in enumerate([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]):
        n = len(p)
        net.forward(torch.tensor(p, device="cuda"), torch.arange(n, device="cuda"),
                    torch.full((n,), s, device="cuda"), cache)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_matches_eager(dtype):
    m = hybrid.load(progress=False, device="cuda", dtype=dtype, decode_steps="eager")
    net = m.network
    ca, cb = _prefilled(net), _prefilled(net)
    runner = DecodeRunner(net, cb, max_batch=4, graphs=True)
    pos = [5, 2, 3]
    for step in range(4):  # step 0 runs eagerly and captures, the others replay
        ids = [20 + step, 21 + step, 22 + step]
        t = lambda v: torch.tensor(v, device="cuda")  # noqa: E731
        la = net.forward(t(ids), t(pos), t([0, 1, 2]), ca)
        lb = runner.step(ids, pos, [0, 1, 2])
        tol = 1e-4 if dtype == torch.float32 else 0.03
        assert (la - lb).abs().max() <= tol * la.abs().max()
        pos = [p + 1 for p in pos]
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 3
    assert runner.stats["capture_failures"] == 0
    assert runner.launches_per_step(runner.bucket(3, max(pos))) == 2 * len(net.moe_layers()) + 1


def _paged_shared(net):
    """A paged cache (blocks of 16): sequences 0 and 1 share the 16-token prompt's block 0,
    sequence 2 has its own; each decodes into private blocks."""
    cache = net.make_cache(4, 160, num_blocks=40, block_size=16)
    for s, blocks in enumerate(([0, 1, 2], [0, 3, 4], [5, 6, 7])):
        cache.set_blocks(s, blocks)
    prompt = list(range(5, 21))
    for s in (0, 2):
        net.forward(torch.tensor(prompt, device="cuda"), torch.arange(16, device="cuda"),
                    torch.full((16,), s, device="cuda"), cache)
    return cache


def test_paged_graph_replay_matches_eager():
    m = hybrid.load(progress=False, device="cuda", dtype=torch.float32, decode_steps="eager")
    net = m.network
    ca, cb = _paged_shared(net), _paged_shared(net)
    runner = DecodeRunner(net, cb, max_batch=4, graphs=True)
    pos = [16, 16, 16]
    for step in range(20):  # crosses block ends at 32; 3 rows: a padding row writes the spare block
        ids = [20 + step, 30 + step, 40 + step]
        t = lambda v: torch.tensor(v, device="cuda")  # noqa: E731
        la = net.forward(t(ids), t(pos), t([0, 1, 2]), ca)
        lb = runner.step(ids, pos, [0, 1, 2])
        assert (la - lb).abs().max() <= 1e-4 * la.abs().max()
        pos = [p + 1 for p in pos]
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 19
    assert runner.stats["capture_failures"] == 0
    key = runner.prepare([5, 6, 7], pos, [0, 1, 2])  # a captured bucket: its replay
    with HostSyncCheck() as check:
        runner.run(key)
        torch.cuda.synchronize()
    assert check.syncs == [], check.report()


def test_static_step_on_cuda_has_no_host_syncs():
    m = hybrid.load(progress=False, device="cuda", decode_steps="eager")
    net = m.network
    cache = _prefilled(net)
    runner = DecodeRunner(net, cache, max_batch=4)
    runner.step([20, 21, 22], [5, 2, 3], [0, 1, 2])
    key = runner.prepare([23, 24, 25], [6, 3, 4], [0, 1, 2])
    with HostSyncCheck() as check:
        runner.run(key)
        torch.cuda.synchronize()
    assert check.syncs == [], check.report()


def test_engine_with_graphs_decodes_like_eager():
    from hybrid.engine.engine import Engine
    from hybrid.engine.sampling import SamplingParams

    outs = []
    for steps in ("eager", "graphs"):
        m = hybrid.load(progress=False, device="cuda", dtype=torch.float32, decode_steps=steps)
        prompts = [m.tokenizer.encode(t) for t in ("The Python tutorial", "def main():")]
        with Engine(m, max_seqs=2, max_context=96, decode_runner=m.decode_runner) as eng:
            hs = [eng.submit(p, SamplingParams(temperature=0.0, ignore_eos=True), max_tokens=12) for p in prompts]
            outs.append([h.result().token_ids for h in hs])
    assert outs[0] == outs[1]
