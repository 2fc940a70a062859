"""Expert deferral (hybrid/experts/moe_layer.py, hybrid.load(defer_experts=k)): each MoE layer's
k lowest-weight host picks are added to the next MoE layer's output. Checked against the same
math written out here layer by layer on a tiny checkpoint (torch experts, fp32), and with the
static decode step; off (k = 0) is the model unchanged."""

import pytest
import torch

import hybrid
from checkpoints import build
from hybrid.models.batch import Batch
from hybrid.ops.rope import rope_cos_sin

pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = build(tmp_path_factory.mktemp("defer"), num_hidden_layers=4)  # 3 MoE layers
    return path


def _written_out(m, ids, k):
    """The deferred model, layer by layer, from the network's own parts."""
    net, ops, eps = m.network, m.network.ops, m.config.rms_norm_eps
    T = len(ids)
    cache = net.make_cache(1, T)
    pos, slots = torch.arange(T), torch.zeros(T, dtype=torch.long)
    batch = Batch(torch.tensor(ids), pos, slots)
    cos, sin = rope_cos_sin(pos, net.inv_freq, net.rope_scale)
    h = net.embed_rows(torch.tensor(ids)).to(net.dtype)
    moe_layers = [i for i in range(len(net.layers)) if m.config.is_moe_layer(i)]
    carry = None
    for i, layer in enumerate(net.layers):
        a = layer.attn(ops.rms_norm(h, layer.input_norm, eps), cos, sin, batch, cache)
        h, x = ops.add_rms_norm(h, a, layer.post_attn_norm, eps)
        if i not in moe_layers:
            h = h + layer.mlp(x)
            continue
        moe = layer.mlp
        ids_k, w = moe.router(x)
        w, order = w.sort(dim=1, descending=True)
        ids_k = ids_k.gather(1, order)
        K, kk = ids_k.shape[1], (0 if i == moe_layers[-1] else k)
        y = moe.host_experts().forward(x, ids_k[:, :K - kk], w[:, :K - kk])
        if carry is not None:
            y = y + carry
        carry = moe.host_experts().forward(x, ids_k[:, K - kk:], w[:, K - kk:]) if kk else None
        h = h + (y.to(x.dtype) + moe.shared(x))
    return net._head(h)


def test_deferral_is_the_written_out_math(tiny):
    ids = [3, 17, 5, 44, 9, 12, 60, 2, 31, 8]
    plain = hybrid.load(tiny, progress=False, dtype=torch.float32, experts_backend="torch", device_ops="torch")
    ref0 = plain.logits(ids)
    torch.testing.assert_close(_written_out(plain, ids, 0), ref0, rtol=1e-5, atol=1e-5)
    for k in (1, 3):
        m = hybrid.load(tiny, progress=False, dtype=torch.float32, experts_backend="torch", device_ops="torch",
                        defer_experts=k)
        got = m.logits(ids)
        torch.testing.assert_close(got, _written_out(m, ids, k), rtol=1e-5, atol=1e-5)
        assert (got - ref0).abs().max() > 1e-3  # it does change the math


def test_cpu_engine_deferral_agrees_with_torch_experts(tiny):
    """The CPU engine's twin jobs: as far from the torch experts with deferral as without (the
    engine holds these float experts in bf16, which is the whole gap)."""
    ids = [3, 17, 5, 44, 9, 12]
    gap = {}
    for k in (0, 2):
        a = hybrid.load(tiny, progress=False, dtype=torch.float32, experts_backend="torch", defer_experts=k)
        b = hybrid.load(tiny, progress=False, dtype=torch.float32, experts_backend="cpu", defer_experts=k)
        la, lb = a.logits(ids), b.logits(ids)
        gap[k] = float((la - lb).abs().max() / la.abs().max())
        assert torch.equal(la.argmax(-1), lb.argmax(-1))
    assert gap[2] < 2 * gap[0] + 1e-4, gap


def test_off_is_unchanged_and_bad_values_are_refused(tiny):
    ids = [3, 17, 5, 44]
    a = hybrid.load(tiny, progress=False).logits(ids)
    b = hybrid.load(tiny, progress=False, defer_experts=0).logits(ids)
    assert torch.equal(a, b)
    for bad in (8, -1, True, 1.5):
        with pytest.raises(ValueError, match="defer_experts must be an integer in 0..7"):
            hybrid.load(tiny, progress=False, defer_experts=bad)


def test_static_decode_step_with_deferral():
    from hybrid.engine.step_runner import DecodeRunner
    from hybrid.engine.sync_check import HostSyncCheck

    m = hybrid.load(progress=False, device_ops="torch", dtype=torch.float32, defer_experts=2)
    net = m.network
    ca, cb = net.make_cache(2, 64), net.make_cache(2, 64)
    for c in (ca, cb):
        for s, p in enumerate([[5, 6, 7, 8], [9, 10]]):
            net.forward(torch.tensor(p), torch.arange(len(p)), torch.full((len(p),), s), c)
    runner = DecodeRunner(net, cb, max_batch=2)
    la = net.forward(torch.tensor([11, 12]), torch.tensor([4, 2]), torch.tensor([0, 1]), ca)
    key = runner.prepare([11, 12], [4, 2], [0, 1])
    with HostSyncCheck() as check:
        lb = runner.run(key)
    assert check.syncs == [], check.report()
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4 * la.abs().max().item())


def test_cpu_engine_with_caller_share_and_deferral_does_not_stall():
    """On a CPU device the engine's caller computes a share of each job in sync(); the twin's
    job must not wait for its caller (it stalled the next layer's job: the pool runs jobs in
    order). 37 tokens of prefill through the demo model hung before the twin ran without one."""
    m = hybrid.load(progress=False, dtype=torch.float32, defer_experts=1)
    ref = hybrid.load(progress=False, dtype=torch.float32)
    ids = list(range(3, 40))
    a, b = m.logits(ids), ref.logits(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
