"""The native decode-step ops (csrc/models/mla_decode.h, csrc/core/norm.h, csrc/models/router.h)
against their torch references, and the thread pool's caller jobs they run on.

Bounds:
  rms_norm: the same rounding points as the torch code (fp32 normalise, round, times the bf16
    weight, round); only the fp32 sum of squares is summed in another order, so an output may
    differ by one bf16 step (2^-7 relative) and almost all are equal.
  route: the same picks as the noaux_tc rule's torch body (random scores have no ties) and
    weights within 1e-6 relative.
  mla_decode: against the formulas in fp64 on the same bf16 inputs, within 2% of the output
    scale (bf16 rounding of q_lat, o_lat and the result), cache rows within two bf16 steps.
  the whole decode step: the torch path rounds to bf16 after every op (RoPE, the absorbed
    products, softmax) where the native one stays fp32 inside, so both are bf16 approximations
    of the fp32 model; the native one's error is bounded by twice the torch path's (+0.02).
"""

import pytest
import torch

pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")

from checkpoints import YARN, build  # noqa: E402
from hybrid.models import config_from_dir
from hybrid import native  # noqa: E402
from hybrid.experts.routers import NoAuxTC  # noqa: E402
from checkpoints import load_model  # noqa: E402

L = native.lib()
from hybrid import _native_testing as NT  # noqa: E402  test-only entry points (csrc/binding_testing.cpp)


# ---- rms_norm ---------------------------------------------------------------------------------
def _torch_rms(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@pytest.mark.parametrize("T,H", [(1, 7), (3, 64), (2, 256), (5, 7168)])
def test_rms_norm_matches_torch(T, H):
    g = torch.Generator().manual_seed(T * H)
    x = (torch.randn(T, H, generator=g) * 3).bfloat16()
    w = (1 + 0.1 * torch.randn(H, generator=g)).bfloat16()
    out = L.rms_norm(x, w, 1e-6, torch.empty_like(x))
    ref = _torch_rms(x, w, 1e-6)
    diff = (out.float() - ref.float()).abs()
    assert (diff <= ref.float().abs() * 2**-7 + 1e-30).all()
    assert (out == ref).float().mean() > 0.97


def test_rms_norm_fused_residual_adds_in_place():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 96, generator=g).bfloat16()
    a = torch.randn(3, 96, generator=g).bfloat16()
    w = torch.randn(96, generator=g).bfloat16()
    summed = h + a  # torch's bf16 add: the value h must hold afterwards, exactly
    out = L.rms_norm(h, w, 1e-5, torch.empty_like(h), a)
    assert torch.equal(h, summed)
    assert (out.float() - _torch_rms(summed, w, 1e-5).float()).abs().max() <= 2**-7 * out.float().abs().max()


def test_rms_norm_bad_input():
    x = torch.randn(2, 8).bfloat16()
    with pytest.raises(TypeError, match="x must have dtype torch.bfloat16"):
        L.rms_norm(x.float(), torch.ones(8).bfloat16(), 1e-6, torch.empty_like(x))
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        L.rms_norm(x, torch.ones(7).bfloat16(), 1e-6, torch.empty_like(x))
    with pytest.raises(ValueError, match="x must be contiguous"):
        L.rms_norm(torch.randn(8, 2).bfloat16().t(), torch.ones(8).bfloat16(), 1e-6, torch.empty_like(x))
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 8\]"):
        L.rms_norm(x, torch.ones(8).bfloat16(), 1e-6, torch.empty_like(x), torch.zeros(1, 8).bfloat16())
    with pytest.raises(ValueError, match="out must not be x"):
        L.rms_norm(x, torch.ones(8).bfloat16(), 1e-6, x)


# ---- route ------------------------------------------------------------------------------------
class _Cfg:
    def __init__(self, E, G, TG, K, norm=True, scale=2.5):
        self.n_routed_experts, self.n_group, self.topk_group, self.num_experts_per_tok = E, G, TG, K
        self.norm_topk_prob, self.routed_scaling_factor = norm, scale


@pytest.mark.parametrize("E,G,TG,K,norm,bias", [(64, 1, 1, 8, True, True), (64, 8, 3, 6, True, True),
                                                (384, 8, 4, 8, True, True), (16, 4, 2, 3, False, False)])
def test_route_matches_torch(E, G, TG, K, norm, bias):
    g = torch.Generator().manual_seed(E + G + K)
    T, H = 5, 96
    x = torch.randn(T, H, generator=g).bfloat16()
    gate = torch.randn(E, H, generator=g) / H**0.5
    b = torch.randn(E, generator=g) * 0.1 if bias else None
    cfg = _Cfg(E, G, TG, K, norm)
    ids = torch.empty(T, K, dtype=torch.int32)
    w = torch.empty(T, K)
    L.route(x, gate, b, G, TG, K, norm, cfg.routed_scaling_factor, ids, w)
    rule = NoAuxTC(E, K, G, TG, norm, cfg.routed_scaling_factor)
    rid, rw, _ = rule.torch_body(x, {"weight": gate, "bias": b})
    for t in range(T):
        mine = dict(zip(ids[t].tolist(), w[t].tolist()))
        ref = dict(zip(rid[t].tolist(), rw[t].tolist()))
        assert mine.keys() == ref.keys(), t
        for e in ref:
            assert mine[e] == pytest.approx(ref[e], rel=1e-5)


def test_route_bad_config():
    x = torch.randn(2, 8).bfloat16()
    gate = torch.randn(12, 8)
    ids, w = torch.empty(2, 2, dtype=torch.int32), torch.empty(2, 2)
    with pytest.raises(ValueError, match="n_group 5 must divide the 12 experts"):
        L.route(x, gate, None, 5, 1, 2, True, 1.0, ids, w)
    with pytest.raises(ValueError, match="num_experts_per_tok 7"):
        L.route(x, gate, None, 4, 2, 7, True, 1.0, torch.empty(2, 7, dtype=torch.int32), torch.empty(2, 7))
    with pytest.raises(ValueError, match=r"ids must have shape \[2, 2\]"):
        L.route(x, gate, None, 1, 1, 2, True, 1.0, torch.empty(2, 3, dtype=torch.int32), w)
    with pytest.raises(TypeError, match="gate must have dtype torch.float32"):
        L.route(x, gate.bfloat16(), None, 1, 1, 2, True, 1.0, ids, w)


# ---- the whole decode step: native ops (HYBRID_DEVICE_OPS=native) vs torch ops -------------------
def _decode(net, cfg, lens=(9, 4, 1), steps=5):
    from hybrid.models.kv_cache import LatentKVCache

    g = torch.Generator().manual_seed(7)
    cache = LatentKVCache(cfg, len(lens), 64, dtype=torch.bfloat16)
    for s, n in enumerate(lens):  # prefill (T > 1 per slot: the torch path in both runs)
        ids = torch.randint(2, cfg.vocab_size, (n,), generator=g)
        net.forward(ids, torch.arange(n), torch.full((n,), s), cache)
    pos = list(lens)
    outs = []
    for _ in range(steps):  # one token per slot: the native path when on
        ids = torch.randint(2, cfg.vocab_size, (len(lens),), generator=g)
        outs.append(net.forward(ids, torch.tensor(pos), torch.arange(len(lens)), cache))
        pos = [p + 1 for p in pos]
    return torch.stack(outs), cache


@pytest.mark.parametrize("variant,overrides", [
    ("plain", {}),
    ("plain", {"q_lora_rank": None, "rope_interleave": False}),
    ("plain", {"n_group": 4, "topk_group": 2, "rope_parameters": YARN}),
])
def test_decode_step_native_matches_torch(tmp_path, variant, overrides):
    # Both bf16 paths against the fp32 model: a bf16 rounding difference can flip one of the
    # top-8 of 64 experts for a token, which moves its logits by far more than rounding, and
    # either path may be the one that flips (5 seeds: mean errors 0.028-0.107 torch, 0.029-0.093
    # native). So the bound is relative to the torch path's own error, not to the torch path.
    path, _ = build(tmp_path, variant=variant, **overrides)
    cfg = config_from_dir(path)
    _, net = load_model(path, "cpu", torch.bfloat16, experts_backend="cpu", device_ops="native")
    _, torch_net = load_model(path, "cpu", torch.bfloat16, experts_backend="cpu", device_ops="torch")
    assert net.ops.name == "native" and torch_net.ops.name == "torch"
    _, ref_net = load_model(path, "cpu", torch.float32, experts_backend="cpu", mode="precise")
    ref, _ = _decode(ref_net, cfg)
    off, cache_off = _decode(torch_net, cfg)
    on, cache_on = _decode(net, cfg)
    err_on, err_off = (on - ref).abs().amax(-1), (off - ref).abs().amax(-1)  # [steps, slots]
    print(f"mean max|diff| to fp32: native {err_on.mean():.4f}, torch {err_off.mean():.4f}")
    assert err_on.mean() <= 2 * err_off.mean() + 0.02
    assert (on.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
    for a, b in zip(cache_on.kv, cache_off.kv):
        assert (a.float() - b.float()).abs().max() <= 0.1 * b.float().abs().max()


def _rope(x, cos, sin, interleave):
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("pos,nh", [(0, 4), (10, 4), (40, 9), (300, 64)])
def test_mla_decode_matches_fp64(interleave, pos, nh):
    # One token against the formulas of mla_decode.h in fp64 on the same bf16 inputs: the native
    # result is bf16-rounded (out, the cache row) from fp32 math, so within a few bf16 steps.
    g = torch.Generator().manual_seed(pos + nh)
    D, R, V, C, S, Lmax, slot, scale = 16, 16, 24, 64, 2, 512, 1, 0.3
    cache = torch.randn(S, Lmax, C + R, generator=g).bfloat16()
    q = torch.randn(1, nh * (D + R), generator=g).bfloat16()
    kv = torch.randn(1, C + R, generator=g).bfloat16()
    normw = (1 + 0.1 * torch.randn(C, generator=g)).bfloat16()
    wkvb = (torch.randn(nh * (D + V), C, generator=g) / C**0.5).bfloat16()
    ang = torch.rand(1, R // 2, generator=g) * 6
    cs, sn = ang.cos(), ang.sin()
    out = torch.empty(1, nh * V).bfloat16()
    mine = cache.clone()
    L.mla_decode(q, kv, normw, cs, sn, mine, torch.tensor([slot]), torch.tensor([pos]), wkvb, out, nh, D, V, 1e-6,
                 scale, interleave)
    kvd, c64, s64 = kv.double()[0], cs.double()[0], sn.double()[0]
    lat = kvd[:C] * torch.rsqrt(kvd[:C].pow(2).mean() + 1e-6) * normw.double()
    rows = cache.double()[slot].clone()
    rows[pos] = torch.cat([lat, _rope(kvd[C:], c64, s64, interleave)])
    assert torch.equal(mine[slot, :pos], cache[slot, :pos]) and torch.equal(mine[0], cache[0])
    assert (mine[slot, pos].double() - rows[pos]).abs().max() <= 2**-7 * rows[pos].abs().max() * 2
    w = wkvb.double().view(nh, D + V, C)
    qd = q.double().view(nh, D + R)
    qq = torch.cat([torch.einsum("nd,ndc->nc", qd[:, :D], w[:, :D]), _rope(qd[:, D:], c64, s64, interleave)], -1)
    p = ((qq @ rows[: pos + 1].T) * scale).softmax(-1)
    ref = torch.einsum("nc,nvc->nv", p @ rows[: pos + 1, :C], w[:, D:]).reshape(1, -1)
    assert (out.double() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_mla_decode_bad_input(tmp_path):
    path, _ = build(tmp_path)
    cfg = config_from_dir(path)
    _, net = load_model(path, "cpu", torch.bfloat16, experts_backend="cpu", progress=False)
    attn = net.layers[0].attn.core  # hybrid/ops/mla_attention.py
    from hybrid.models.kv_cache import LatentKVCache

    cache = LatentKVCache(cfg, 2, 16, dtype=torch.bfloat16)
    nh, D, R, V, C = attn.s.heads, attn.s.nope, attn.s.rope, attn.s.value, attn.s.latent
    q = torch.randn(1, nh * (D + R)).bfloat16()
    kv = torch.randn(1, C + R).bfloat16()
    cs, sn = torch.ones(1, R // 2), torch.zeros(1, R // 2)
    out = torch.empty(1, nh * V).bfloat16()

    def call(slots=torch.tensor([0]), positions=torch.tensor([3]), q=q, n=1):
        r = (lambda t: t.repeat(n, 1))
        L.mla_decode(r(q), r(kv), attn.kv_norm, r(cs), r(sn), cache.kv[0], slots, positions,
                     attn.kv_b.weight, r(out), nh, D, V, 1e-6, attn.s.scale, True)

    call()
    with pytest.raises(ValueError, match=r"slots\[0\] = 2 is out of range \[0, 2\)"):
        call(slots=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"positions\[0\] = 16 is out of range \[0, 16\)"):
        call(positions=torch.tensor([16]))
    with pytest.raises(ValueError, match="both write slot 0 position 3"):
        call(slots=torch.tensor([0, 0]), positions=torch.tensor([3, 3]), n=2)
    with pytest.raises(ValueError, match=r"q must have shape"):
        call(q=q[:, :-2].contiguous())
    with pytest.raises(TypeError, match="positions must have dtype torch.int64"):
        call(positions=torch.tensor([3], dtype=torch.int32))


# ---- thread pool caller jobs --------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_pool_caller_jobs(workers):
    before = L.num_threads()
    L.set_num_threads(workers)
    try:
        for team in range(1, workers + 2):
            j = NT.pool_test_job(3, team=team, caller=True)
            j.wait()
            assert j.team == team and j.phase_counts == [team] * 3
        # An error in the caller's share (the last tid) and in a worker's come back from wait().
        with pytest.raises(RuntimeError, match=f"thread {workers}"):
            NT.pool_test_job(2, fail_phase=0, fail_tid=workers, team=workers + 1, caller=True).wait()
        with pytest.raises(RuntimeError, match="phase 1, thread 0"):
            NT.pool_test_job(2, fail_phase=1, fail_tid=0, team=workers + 1, caller=True).wait()
        # Interleaved with plain jobs: all complete, none waits on another forever.
        jobs = [NT.pool_test_job(2, team=0, caller=bool(i % 2)) for i in range(6)]
        for j in jobs:
            j.wait()
    finally:
        L.set_num_threads(before)


def test_moe_caller_equals_plain():
    from hybrid.experts.cpu_moe import CpuMoE, PackedLayer

    g = torch.Generator().manual_seed(3)
    E, H, I = 8, 64, 64
    layer = PackedLayer.from_float(list(torch.randn(E, I, H, generator=g)), list(torch.randn(E, I, H, generator=g)),
                                   list(torch.randn(E, H, I, generator=g)), format="int8")
    x = torch.randn(5, H, generator=g)
    ids = torch.randint(0, E, (5, 3), generator=g)
    w = torch.rand(5, 3, generator=g)
    ref = CpuMoE(layer, threads=1)(x, ids, w)
    for threads in (1, 2, 3):
        assert torch.equal(CpuMoE(layer, threads=threads, caller=True)(x, ids, w), ref)


def test_sync_threads_cap():
    """set_sync_threads caps the caller + workers of synchronous native calls (a 1-thread run on
    a CPU device must not use the pool's worker); <= 0 lifts the cap (pool size + 1)."""
    try:
        L.set_sync_threads(1)
        assert L.sync_threads() == 1
        L.set_sync_threads(0)
        assert L.sync_threads() == L.num_threads() + 1
        L.set_sync_threads(1000)
        assert L.sync_threads() == L.num_threads() + 1
    finally:
        L.set_sync_threads(0)
