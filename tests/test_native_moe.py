"""The fused CPU MoE operator (CpuMoE) against a float64 numpy reference of the same math, for
every ISA path this machine runs, every weight format, both activation modes, decode-sized and
prefill-sized batches, repeated ids, masked experts and fully masked tokens.

The reference uses the packed layer's own dequantised weights (unpack_expert), so weight
quantisation is not part of the error; what is left:
  precise: fp32 activations and accumulation. Error ~ a few fp32 ulps times sqrt(terms):
           TOL_PRECISE = 1e-5 of max |y| (H, I <= 7168 terms, 2^-24 ~ 6e-8 per term).
  fast, int4/int8 weights: x and h are quantised to int8 per group of 32 (error <= amax/254 per
           element, ~0.23% rms of a group's amax). Against a reference that applies the same
           rounding (quant_a8) only rare rounding flips remain (h is fp32 here, fp64 there):
           TOL_EMULATED = 2e-3. Against exact activations the two roundings compound through
           SiLU and two matmuls: TOL_FAST_INT8 = 3e-2 (measured ~0.5-1.5%).
  fast, bf16 weights with matmul_a16 (avx512_bf16, amx): x and h rounded to bf16 (2^-9
           relative): TOL_EMULATED against the bf16-rounded reference, TOL_FAST_BF16 = 1.5e-2
           against exact. Without matmul_a16 the fast bf16 path is the fp32 one.
All tolerances are relative to max |reference|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from native_ref import bf16_round, moe_reference, quant_a8, random_experts, rel_err

from hybrid import native
from hybrid.experts.cpu_moe import CpuMoE, PackedLayer

N = native.lib()
from hybrid import _native_testing as NT  # noqa: E402  test-only entry points (csrc/binding_testing.cpp)
ISAS = N.available_isas()
FORMATS = ["int4", "int8", "bf16"]
TOL_PRECISE = 1e-5
TOL_EMULATED = 2e-3
TOL_FAST_INT8 = 3e-2
TOL_FAST_BF16 = 1.5e-2
E, H, I, K = 16, 64, 96, 8


def bf16_act(v):
    return bf16_round(v)


def activation_rule(fmt, mode, isa):
    """The activation rounding the operator applies (None: exact fp32), and the tolerance of the
    result against exact activations."""
    if mode == "precise":
        return None, TOL_PRECISE
    if fmt != "bf16":
        return quant_a8, TOL_FAST_INT8
    if NT.kernel_entries(isa)["matmul_a16"]:
        return bf16_act, TOL_FAST_BF16
    return None, TOL_PRECISE


_layers: dict = {}


def layer_and_experts(fmt):
    """One packed layer per format for the module, with its dequantised experts."""
    if fmt not in _layers:
        rng = np.random.default_rng(100)
        layer = PackedLayer.from_float(*random_experts(rng, E, H, I), format=fmt)
        experts = [tuple(t.numpy().astype(np.float64) for t in layer.unpack_expert(e)) for e in range(E)]
        _layers[fmt] = (layer, experts)
    return _layers[fmt]


def routing(rng, B, masked=True):
    """ids [B, K] int32 with repeated ids and a fully masked token, weights [B, K], skip [E]."""
    ids = np.stack([rng.permutation(E)[:K] for _ in range(B)]).astype(np.int32)
    weights = rng.uniform(0.05, 1.0, (B, K)).astype(np.float32)
    skip = np.zeros(E, dtype=bool)
    if masked:
        skip[[1, 5, 9, 13]] = True
    ids[0, :] = 3  # every pick of token 0 is expert 3: each pick counts
    if B > 1:
        ids[1, :4] = ids[1, 4]  # partly repeated
    if B > 2 and masked:
        ids[2, :] = np.array([1, 5, 9, 13, 1, 5, 9, 13])  # fully masked token: y = 0
    return ids, weights, (skip if masked else None)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["fast", "precise"])
@pytest.mark.parametrize("B", [1, 3, 17, 512])
def test_moe_matches_reference(isa, fmt, mode, B):
    layer, experts = layer_and_experts(fmt)
    rng = np.random.default_rng(B * 7 + len(fmt))
    x = rng.standard_normal((B, H)).astype(np.float32)
    ids, weights, skip = routing(rng, B)
    y = CpuMoE(layer, mode=mode, isa=isa).forward(x, ids, weights, skip)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (B, H)
    act, tol = activation_rule(fmt, mode, isa)
    exact = moe_reference(experts, x, ids, weights, skip)
    assert rel_err(y, exact) <= tol, rel_err(y, exact)
    if act is not None:
        emulated = moe_reference(experts, x, ids, weights, skip, act=act)
        assert rel_err(y, emulated) <= TOL_EMULATED, rel_err(y, emulated)
    if B > 2:
        assert (y[2] == 0).all()  # fully masked token


@pytest.mark.parametrize("isa", ISAS)
def test_isa_paths_agree_with_scalar(isa):
    """Same operator, same data: every ISA close to the scalar reference path (both fast)."""
    layer, _ = layer_and_experts("int4")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((17, H)).astype(np.float32)
    ids, weights, skip = routing(rng, 17)
    ref = CpuMoE(layer, isa="scalar").forward(x, ids, weights, skip)
    y = CpuMoE(layer, isa=isa).forward(x, ids, weights, skip)
    assert rel_err(y, ref) <= TOL_EMULATED


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["fast", "precise"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_gives_nonfinite_output(isa, fmt, mode, bad):
    """NaN or Inf in a token's x comes out of every path as NaN/Inf in that token's row, never as
    plausible numbers (the fast int8 quantiser clamped it to +-127), so the engine's "the model
    produced NaN" check sees it; the other tokens' rows are what they are without it."""
    layer, _ = layer_and_experts(fmt)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, H)).astype(np.float32)
    ids, weights, _ = routing(rng, 5, masked=False)
    moe = CpuMoE(layer, mode=mode, isa=isa)
    clean = moe.forward(x, ids, weights)
    x[3, 40] = bad
    y = moe.forward(x, ids, weights)
    assert not np.isfinite(y[3]).any(), y[3]
    np.testing.assert_array_equal(np.delete(y, 3, 0), np.delete(clean, 3, 0))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["fast", "precise"])
def test_k25_sized_expert(isa, mode):
    """Two experts at Kimi K2.5 size (H = 7168, I = 2048), INT4, B = 3, K = 8 (repeated ids)."""
    layer, experts = k25_layer()
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 7168)).astype(np.float32)
    ids = rng.integers(0, 2, (3, 8)).astype(np.int64)
    weights = rng.uniform(0.05, 1, (3, 8)).astype(np.float32)
    y = CpuMoE(layer, mode=mode, isa=isa).forward(torch.from_numpy(x), torch.from_numpy(ids),
                                                  torch.from_numpy(weights))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    act, tol = activation_rule("int4", mode, isa)
    assert rel_err(y.numpy(), moe_reference(experts, x, ids, weights)) <= tol
    if act is not None:
        assert rel_err(y.numpy(), moe_reference(experts, x, ids, weights, act=act)) <= TOL_EMULATED


_k25: list = []


def k25_layer():
    if not _k25:
        rng = np.random.default_rng(9)
        gate, up, down = random_experts(rng, 2, 7168, 2048)
        layer = PackedLayer.from_float(gate, up, down, format="int4")
        del gate, up, down
        _k25.append((layer, [tuple(t.numpy().astype(np.float64) for t in layer.unpack_expert(e)) for e in range(2)]))
    return _k25[0]


def test_torch_bf16_inputs_and_int64_ids():
    layer, experts = layer_and_experts("int8")
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.standard_normal((5, H)).astype(np.float32)).to(torch.bfloat16)
    ids, weights, skip = routing(rng, 5)
    moe = CpuMoE(layer, mode="precise")
    y = moe.forward(x, torch.from_numpy(ids).long(), torch.from_numpy(weights), torch.from_numpy(skip))
    assert isinstance(y, torch.Tensor) and y.shape == (5, H) and y.dtype == torch.float32
    ref = moe_reference(experts, x.float().numpy(), ids, weights, skip)
    assert rel_err(y.numpy(), ref) <= TOL_PRECISE
    y2 = moe.forward(x.float().numpy(), ids.astype(np.int64), weights, skip.astype(np.uint8))
    np.testing.assert_array_equal(y2, y.numpy())  # bf16 x == its fp32 value; uint8 mask == bool


def test_no_mask_all_masked_and_empty_batch():
    layer, experts = layer_and_experts("bf16")
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, H)).astype(np.float32)
    ids, weights, _ = routing(rng, 4, masked=False)
    moe = CpuMoE(layer, mode="precise")
    y = moe.forward(x, ids, weights)
    assert rel_err(y, moe_reference(experts, x, ids, weights)) <= TOL_PRECISE
    assert (moe.forward(x, ids, weights, np.ones(E, bool)) == 0).all()
    empty = moe.forward(np.zeros((0, H), np.float32), np.zeros((0, K), np.int32), np.zeros((0, K), np.float32))
    assert empty.shape == (0, H)


def test_results_do_not_depend_on_thread_count():
    """Each y element has one writer and a fixed summation order: threads=1 and the whole pool
    give identical bits."""
    layer, _ = layer_and_experts("int4")
    rng = np.random.default_rng(13)
    x = rng.standard_normal((17, H)).astype(np.float32)
    ids, weights, skip = routing(rng, 17)
    a = CpuMoE(layer, threads=1).forward(x, ids, weights, skip)
    b = CpuMoE(layer).forward(x, ids, weights, skip)
    np.testing.assert_array_equal(a, b)


def test_mmapped_layer_gives_same_result(tmp_path):
    layer, _ = layer_and_experts("int4")
    layer.save(tmp_path / "l.packed")
    mapped = PackedLayer.load(tmp_path / "l.packed")
    rng = np.random.default_rng(14)
    x = rng.standard_normal((3, H)).astype(np.float32)
    ids, weights, skip = routing(rng, 3)
    np.testing.assert_array_equal(CpuMoE(mapped).forward(x, ids, weights, skip),
                                  CpuMoE(layer).forward(x, ids, weights, skip))


@pytest.mark.parametrize("I_narrow", [32, 64, 96])
@pytest.mark.parametrize("threads", [2, 5])
def test_more_threads_than_units(I_narrow, threads):
    """Experts narrower than the thread count (I/32 units < threads): the gate_up phase deals
    (expert, unit) items out by cost. Same numbers as the reference, nothing left out."""
    rng = np.random.default_rng(15)
    layer = PackedLayer.from_float(*random_experts(rng, E, H, I_narrow), format="int4")
    experts = [tuple(t.numpy().astype(np.float64) for t in layer.unpack_expert(e)) for e in range(E)]
    x = rng.standard_normal((70, H)).astype(np.float32)
    ids, weights, skip = routing(rng, 70)
    ids[3:40, :] = 7  # skewed: one expert gets many tokens
    before = native.num_threads()
    try:
        native.set_num_threads(threads)
        for mode in ("fast", "precise"):
            y = CpuMoE(layer, mode=mode).forward(x, ids, weights, skip)
            act, tol = activation_rule("int4", mode, native.isa()["active"])
            ref = moe_reference(experts, x, ids, weights, skip, act=act)
            assert rel_err(y, ref) <= (TOL_EMULATED if act else TOL_PRECISE)
    finally:
        native.set_num_threads(before)
