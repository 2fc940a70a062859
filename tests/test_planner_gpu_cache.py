"""GPU expert cache numerics against plain torch reference math (dense fp32 and bf16 caches, and
the packed layer's int4/int8/bf16 experts held in their own bits), on the torch reference path."""

import pytest
import torch
import torch.nn.functional as F

from hybrid.experts.device_layout import CompactExpert
from hybrid.experts.gpu_cache import GpuExpertCache

E, H, I, K, T = 12, 64, 32, 4, 9


def _experts(seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, I, H, generator=g) / H**0.5
    up = torch.randn(E, I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    return gate, up, down


def _src(gate, up, down):
    """compact_expert(e) of stacked dense experts."""
    return lambda e, device=None: CompactExpert.dense(gate[e], up[e], down[e])


def _reference(x, ids, w, gate, up, down, cached):
    """sum over (t, k) with ids[t, k] cached of w[t, k] * expert(x[t]), fp64."""
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e not in cached:
                continue
            xt = x[t].double()
            h = F.silu(gate[e].double() @ xt) * (up[e].double() @ xt)
            y[t] += w[t, k].double() * (down[e].double() @ h)
    return y


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return x, ids, w


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_forward_matches_reference(dtype, tol):
    gate, up, down = _experts()
    cached = [0, 3, 4, 7, 11]
    cache = GpuExpertCache.from_source(_src(gate, up, down), cached, E, device="cpu",
                                       dtype=dtype)
    x, ids, w = _inputs()
    y = cache.forward(x, ids, w)
    ref = _reference(x, ids, w, gate, up, down, set(cached))
    assert y.dtype == torch.float32 and y.shape == (T, H)
    # bf16: weights and activations rounded to 8 bits of mantissa, fp32 accumulation; the
    # tolerance is relative to the output scale.
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < tol
    assert cache.mask.tolist() == [e in cached for e in range(E)]


def test_cache_plus_rest_is_the_whole_layer():
    gate, up, down = _experts(2)
    cached = [1, 2, 9]
    cache = GpuExpertCache.from_source(_src(gate, up, down), cached, E, "cpu",
                                       torch.float32)
    x, ids, w = _inputs(3)
    rest = _reference(x, ids, w, gate, up, down, set(range(E)) - set(cached))
    full = _reference(x, ids, w, gate, up, down, set(range(E)))
    torch.testing.assert_close(cache.forward(x, ids, w).double() + rest, full, rtol=1e-5,
                               atol=1e-5)


def test_empty_cache_and_no_hits():
    gate, up, down = _experts()
    empty = GpuExpertCache.from_source(lambda e, device=None: None, [], E, "cpu")
    x, ids, w = _inputs()
    assert torch.count_nonzero(empty.forward(x, ids, w)) == 0
    cache = GpuExpertCache.from_source(_src(gate, up, down), [5], E, "cpu",
                                       torch.float32)
    ids = torch.zeros(T, K, dtype=torch.long)   # only expert 0 picked
    assert torch.count_nonzero(cache.forward(x, ids, w)) == 0


def test_swap_replaces_expert():
    gate, up, down = _experts(4)
    src = _src(gate, up, down)
    cache = GpuExpertCache.from_source(src, [0, 1], E, "cpu", torch.float32)
    cache.swap(1, 6, src)
    assert cache.mask.nonzero().flatten().tolist() == [0, 6]
    x, ids, w = _inputs(5)
    ref = _reference(x, ids, w, gate, up, down, {0, 6})
    torch.testing.assert_close(cache.forward(x, ids, w).double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not cached"):
        cache.swap(1, 7, src)


def test_bad_shapes_are_named():
    gate, up, down = _experts()
    cache = GpuExpertCache.from_source(_src(gate, up, down), [0], E, "cpu")
    x, ids, w = _inputs()
    with pytest.raises(ValueError, match="ids"):
        cache.forward(x, ids[:, :2], w)
    with pytest.raises(ValueError, match="expert ids must be in"):
        GpuExpertCache.from_source(_src(gate, up, down), [E], E, "cpu")
    with pytest.raises(ValueError, match="expert 0: down has shape"):
        GpuExpertCache.from_source(_src(gate, up, down[:, :, :3]), [0, 1], E, "cpu")
    narrow = _src(gate[:, :16], up[:, :16], down[:, :, :16])   # I = 16, a different expert
    with pytest.raises(ValueError, match="expert 1: a dense expert of H=64, I=16 does not fit"):
        GpuExpertCache.from_source(lambda e, device=None: (narrow if e else _src(gate, up, down))(e),
                                   [0, 1], E, "cpu")


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
def test_cache_plus_cpu_engine_with_skip_mask_equals_cpu_engine(fmt):
    # The contract with moe_layer.py: CPU operator with skip_mask=cache.mask plus
    # cache.forward gives the whole routed output, each (token, expert) pair once.
    native = pytest.importorskip("hybrid.native")
    if not native.available():
        pytest.skip("hybrid._native not built")
    from hybrid.experts.cpu_moe import CpuMoE, PackedLayer

    gate, up, down = _experts(6)
    layer = PackedLayer.from_float(gate, up, down, format=fmt)
    cache = GpuExpertCache.from_packed(layer, [0, 2, 5, 8], device="cpu", dtype=torch.float32)
    op = CpuMoE(layer, mode="precise")
    x, ids, w = _inputs(7)
    ids32 = ids.to(torch.int32).contiguous()
    whole = op.forward(x, ids32, w)
    rest = op.forward(x, ids32, w, skip_mask=cache.mask)
    torch.testing.assert_close(rest + cache.forward(x, ids, w), whole, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(rest, whole)   # the cache really took some pairs


@pytest.mark.parametrize("fmt,planner_fmt", [("int4", "int4_g32"), ("int8", "int8_g32")])
def test_cache_bytes_are_the_planners_and_the_bits_the_packed_layers(fmt, planner_fmt):
    # What the planner budgets per expert is what the cache allocates, and the cache holds the
    # packed layer's own weights bit for bit (not a rounding of them).
    native = pytest.importorskip("hybrid.native")
    if not native.available():
        pytest.skip("hybrid._native not built")
    from hybrid.experts.cpu_moe import PackedLayer
    from hybrid.planner.model_spec import expert_format_bytes

    gate, up, down = _experts(8)
    layer = PackedLayer.from_float(gate, up, down, format=fmt)
    cache = GpuExpertCache.from_packed(layer, [1, 4, 7], device="cpu")
    per = 2 * expert_format_bytes(planner_fmt, I, H) + expert_format_bytes(planner_fmt, H, I)
    assert cache.format == fmt and cache.nbytes == 3 * per
    for slot, e in enumerate([1, 4, 7]):
        for a, b in zip(cache.store.slot_weights(slot), layer.unpack_expert(e)):
            assert torch.equal(a, b)
