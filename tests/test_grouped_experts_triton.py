"""The grouped expert kernel (Triton, under TRITON_INTERPRET=1 on CPU tensors) and its torch
reference, against float64 math on the stored weights.

Shapes are small (the interpreter runs every program in Python). Cases: int4, int8 and dense
(bf16 or fp32 storage) experts; bf16 and fp32 activations; sizes that are not multiples of the
kernel's blocks (H, I padded to 32 for dense, H/2 not a multiple of 64, odd T, odd slot counts);
a token that picks the same expert twice; cached experts nobody picks; batch 1 and a
prefill-sized batch (several tiles per slot).

Tolerances. The kernel multiplies the exact weights (q, then the group's scale) in fp32; with
fp32 activations the only error is fp32 summation: |y - ref| <= 2e-5 max|ref|. With bf16
activations x is bf16 in both, and the kernel rounds h = SiLU(gate) * up * w to bf16 once before
down: at most 2^-8 relative per element rounding to nearest (a GPU), 2^-7 truncating (triton's
interpreter), so |y - ref| <= 2^-7 * sum_i |down[n, i]| |h_i| (the float64 bound of that
rounding) + 2e-5 max|ref|.
"""

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU
triton = pytest.importorskip("triton")

from hybrid.experts.device_layout import CompactExpert, CompactMatrix, DeviceExperts  # noqa: E402
from hybrid.experts.gpu_cache import GpuExpertCache  # noqa: E402
from hybrid.experts.grouped_experts import (block_m_for, grouped_experts_torch,  # noqa: E402
                                            plan_tiles)
from hybrid.experts.grouped_experts_triton import grouped_experts_triton  # noqa: E402


def _matrix(fmt, n, k, g, dtype):
    if fmt == "dense":
        return CompactMatrix((torch.randn(n, k, generator=g) / k**0.5).to(dtype), None)
    lim = 8 if fmt == "int4" else 127
    q = torch.randint(-lim, lim if fmt == "int8" else 8, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // 32, generator=g) + 0.5) / (lim * k**0.5)
    return CompactMatrix(q, scale.to(torch.bfloat16))


def _experts(fmt, E, H, I, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return [CompactExpert(fmt, _matrix(fmt, I, H, g, dtype), _matrix(fmt, I, H, g, dtype),
                          _matrix(fmt, H, I, g, dtype)) for _ in range(E)]


def _reference(x, ids, w, experts, cached):
    """(y, bound): float64 sum over cached pairs of w * down(SiLU(gate x) * up x), and
    sum w * |down| |h| (what one rounding of h moves y by, relative)."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    bound = torch.zeros_like(y)
    deq = {e: [m.double() for m in experts[e].dequantised()] for e in cached}
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e not in deq:
                continue
            gate, up, down = deq[e]
            xt = x[t].double()
            h = F.silu(gate @ xt) * (up @ xt) * float(w[t, k])
            y[t] += down @ h
            bound[t] += down.abs() @ h.abs()
    return y, bound


def _inputs(T, K, E, H, seed, act, repeat=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(act)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if repeat:  # token 0 picks its first expert twice
        ids[0, 1] = ids[0, 0]
    w = torch.rand(T, K, generator=g)
    return x, ids, w


def _check(y, ref, bound, act):
    err = (y.double() - ref).abs()
    scale = ref.abs().max().item()
    allowed = 2e-5 * scale + (2.0**-7 * bound if act == torch.bfloat16 else 0.0)
    assert bool((err <= allowed).all()), f"max err {err.max().item():.3e}, output scale {scale:.3e}"


CASES = [  # fmt, E, H, I, cached, T, K
    ("int4", 7, 96, 64, [0, 2, 3, 6], 5, 3),      # H/2 = 48: 16-row-pair down steps
    ("int8", 5, 64, 32, [1, 4, 0], 1, 2),         # batch 1
    ("dense", 6, 72, 40, [5, 1, 2], 3, 2),        # H, I padded to 96, 64
]


@pytest.mark.parametrize("fmt,E,H,I,cached,T,K", CASES)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("run", [grouped_experts_triton, grouped_experts_torch],
                         ids=["triton", "torch"])
def test_kernel_matches_float64(run, act, fmt, E, H, I, cached, T, K):
    experts = _experts(fmt, E, H, I, seed=E + H, dtype=act)
    store = DeviceExperts(fmt, len(cached), H, I, "cpu", act)
    for s, e in enumerate(cached):
        store.write(s, experts[e], f"expert {e}")
    slot_of = torch.full((E,), -1, dtype=torch.long)
    slot_of[cached] = torch.arange(len(cached))
    x, ids, w = _inputs(T, K, E, H, seed=T, act=act, repeat=True)
    y = torch.zeros(T, H)
    run(x, plan_tiles(slot_of, ids, w, len(cached), block_m_for(T)), store, y)
    ref, bound = _reference(x, ids, w, experts, set(cached))
    _check(y, ref, bound, act)


def test_prefill_batch_and_unpicked_experts():
    # T = 80 > 64 pairs per tile: slots run over several tiles; expert 4 is cached, never picked.
    E, H, I, T, K = 5, 64, 32, 80, 2
    experts = _experts("int4", E, H, I, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.randint(0, 4, (T, K), generator=g)
    w = torch.rand(T, K, generator=g)
    cache = GpuExpertCache.from_source(lambda e, device=None: experts[e], [4, 1, 0], E, "cpu",
                                       backend="triton")
    y = cache.forward(x, ids, w)
    ref, bound = _reference(x, ids, w, experts, {4, 1, 0})
    _check(y, ref, bound, torch.bfloat16)
    y_torch = GpuExpertCache.from_source(lambda e, device=None: experts[e], [4, 1, 0], E, "cpu",
                                         backend="torch").forward(x, ids, w)
    _check(y_torch, ref, bound, torch.bfloat16)


def test_no_hits_and_accumulate_into_out():
    E, H, I = 4, 32, 32
    experts = _experts("int8", E, H, I, seed=5)
    cache = GpuExpertCache.from_source(lambda e, device=None: experts[e], [3], E, "cpu", backend="triton")
    x, _, w = _inputs(3, 2, E, H, seed=6, act=torch.bfloat16)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    assert torch.count_nonzero(cache.forward(x, ids, w)) == 0
    ids[1, 0] = 3
    out = torch.ones(3, H)
    cache.submit(x, ids, w, out=out, accumulate=True)
    assert cache.sync() is out
    ref, bound = _reference(x, ids, w, experts, {3})
    _check(out - 1, ref, bound + 1, torch.bfloat16)


def test_plan_shapes_do_not_depend_on_routing():
    # Every hit pair in exactly one tile; sizes fixed by T, K, C and BM (a CUDA graph can hold it).
    E, C, T, K, BM = 10, 4, 7, 3, 16
    slot_of = torch.full((E,), -1, dtype=torch.long)
    slot_of[[2, 5, 7, 9]] = torch.arange(C)
    shapes = set()
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, E, (T, K), generator=g)
        plan = plan_tiles(slot_of, ids, torch.rand(T, K, generator=g), C, BM)
        shapes.add((plan.token.shape, plan.tile_slot.shape))
        seen = []
        for s, a, b in zip(plan.tile_slot.tolist(), plan.tile_start.tolist(), plan.tile_end.tolist()):
            assert (s < 0) == (b <= a) and b - a <= BM
            seen += [(int(plan.token[p]), s) for p in range(a, b)]
        want = [(t, int(slot_of[ids[t, k]])) for t in range(T) for k in range(K) if slot_of[ids[t, k]] >= 0]
        assert sorted(seen) == sorted(want)
    assert len(shapes) == 1


def test_model_with_triton_caches_equals_cpu_only(tmp_path):
    # The kernel behind the MoE layer (its inputs as the layer hands them): the tiny INT4
    # checkpoint with every third expert cached, the caches switched to the Triton backend.
    # fp32 activations and precise CPU experts: both sides exact on the same INT4 weights, so
    # the bound of tests/test_online_replacement.py, 1e-4.
    pytest.importorskip("hybrid._native", reason="C++ extension not built (pip install -e .)")
    import json

    import yaml

    import hybrid
    from checkpoints import build
    from hybrid.models.spec import spec_from_config

    path, _ = build(tmp_path, variant="int4")
    spec = spec_from_config(json.loads((path / "config.json").read_text()), model_id="tiny")
    prof = {"format": "hybrid-profile/1",
            "model": {"id": "tiny", "config_hash": spec.config_hash, "experts": spec.num_experts},
            "budget": {"device_weights": {"bytes": 0}, "kv_cache": {"bytes": 0},
                       "activations": {"bytes": 0}, "cuda_reserve": {"bytes": 0},
                       "experts": {"bytes_per_expert": 1, "format": "int4_g32"}},
            "cached": {layer: ",".join(str(e) for e in range(0, 64, 3)) for layer in spec.moe_layers}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(prof))
    kw = dict(device="cpu", dtype=torch.float32, progress=False, experts_backend="cpu")
    base = hybrid.load(path, **kw)
    cached = hybrid.load(path, profile=tmp_path / "p.yaml", **kw)
    for moe in cached.moe_layers().values():
        c = moe.device_experts()
        assert c.format == "int4" and c.backend == "torch"   # a CPU device: the reference
        moe.set_device_experts(GpuExpertCache(c.experts, c.num_experts, c.store, backend="triton"))
    ids = torch.tensor([5, 17, 40, 2, 77, 9])
    pos = torch.arange(6)
    want = base.forward(ids, pos, torch.zeros_like(pos), base.make_cache(1, 16))
    got = cached.forward(ids, pos, torch.zeros_like(pos), cached.make_cache(1, 16))
    assert float((got - want).abs().max()) <= 1e-4
