"""bench/peers and bench/moe_layer.py's side of them: the LayerSpec the bench builds from the bank
and routing hybrid runs, --peers parsing, the skip path of a peer that is not installed, and, when
llama-cpp-python's libggml is importable, ggml's MoE layer (bench/peers/ggml_moe.py) against
hybrid's on a tiny layer (skipped otherwise: llama-cpp-python is a bench extra, not a test one).

Tolerances (ggml against hybrid). The weights are the same values in both (the same GGUF blocks;
INT4 repacked into Q4_0 exactly, which is checked bit for bit). What differs is the activation
rounding: ggml quantises x and h to Q8_0 (int8 per 32, fp16 scale) for Q4_0 weights and to Q8_K
(int8 per 256, fp32 scale) for K types; hybrid to int8 per 32 (quant_a8). Each engine is checked
against a float64 reference with its own rounding within TOL_OWN: fp32 summation order (both
measure ~1e-7 here) and the rare rounding flip of an h element whose fp32 value sits next to a
rounding boundary, the bound of tests/test_native_moe.py's emulated mode. Then ggml and hybrid
differ by at most what the two references differ by (2e-3 to 7e-3 on these layers: the activation
rounding the bench's check column shows), plus both TOL_OWN.

Legend: E experts, K picked per token, H hidden, I expert width, C check tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT, quants
from native_ref import moe_reference, quant_a8, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import moe_layer as ml  # noqa: E402
from bench import peers  # noqa: E402

TOL_OWN = 2e-3


@pytest.fixture
def ggml():
    """bench.peers.ggml_lib.Ggml(), or a skip saying why there is none (llama-cpp-python is a
    bench extra: CI does not install it)."""
    from bench.peers.ggml_lib import Ggml, GgmlMissing

    try:
        return Ggml()
    except GgmlMissing as exc:
        pytest.skip(str(exc))


def small_args(fmt="int4", experts=6, hidden=256, intermediate=128, topk=2, extra=()):
    return ml.parse_args(["--format", fmt, "--experts", str(experts), "--hidden", str(hidden),
                          "--intermediate", str(intermediate), "--topk", str(topk), "--runs", "3",
                          "--tokens", "10", "--threads", "1", "--bank", "3", *extra])


# ---- the spec and the peers loop (no llama.cpp needed) ---------------------------------------

@pytest.mark.parametrize("fmt", ["int4", "q4_k", "q4_0"])
def test_spec_holds_the_bank_and_routing_of_the_run(fmt):
    args = small_args(fmt, intermediate=256)
    rng = np.random.default_rng(1)
    bank = ml.make_bank(args, rng)
    spec = ml.make_spec(args, bank, rng)
    E, H, I, K, B, C = 6, 256, 256, 2, 10, ml.CHECK_TOKENS
    assert (spec.fmt, spec.down_fmt, spec.experts, spec.hidden, spec.intermediate, spec.topk,
            spec.tokens, spec.threads, spec.runs) == (fmt, fmt, E, H, I, K, B, 1, 3)
    assert spec.bank is bank and len(bank) == 3
    for gate, up, down in bank:
        if fmt == "int4":
            for (q, s), (n, k) in zip((gate, up, down), ((I, H), (I, H), (H, I))):
                assert q.dtype == np.int32 and q.shape == (n, k // 8)
                assert s.dtype == np.float32 and s.shape == (n, k // 32)
                assert not np.any(s.view(np.uint32) & 0xFFFF)  # bf16-exact scales, as shipped
        else:
            assert gate.dtype == np.uint8 and gate.shape == up.shape == (I, ml.gguf_row_bytes(fmt, H))
            assert down.shape == (H, ml.gguf_row_bytes(fmt, I))
    assert len(spec.decode_x) == len(spec.decode_ids) == 4
    prev = set()
    for x, ids in zip(spec.decode_x, spec.decode_ids):
        assert x.dtype == np.float32 and x.shape == (1, H)
        assert ids.dtype == np.int32 and ids.shape == (1, K)
        now = set(ids[0].tolist())
        assert len(now) == K and now.isdisjoint(prev) and max(now) < E  # E >= 2K: fresh experts each run
        prev = now
    for x, ids, w, n in ((spec.prefill_x, spec.prefill_ids, spec.prefill_w, B),
                         (spec.check_x, spec.check_ids, spec.check_w, C)):
        assert x.dtype == np.float32 and x.shape == (n, H)
        assert ids.dtype == np.int32 and ids.shape == (n, K) and ids.min() >= 0 and ids.max() < E
        assert all(len(set(row)) == K for row in ids.tolist())
        assert w.dtype == np.float32 and w.shape == (n, K)
        np.testing.assert_allclose(w.sum(axis=1), 1, rtol=1e-6)


def test_decode_routing_when_experts_are_few():
    args = small_args(experts=3, topk=2)
    rng = np.random.default_rng(2)
    spec = ml.make_spec(args, ml.make_bank(args, rng), rng)
    for ids in spec.decode_ids:  # cannot avoid the last run's experts: still K distinct ones
        assert len(set(ids[0].tolist())) == 2 and ids.max() < 3


def test_parse_peers():
    assert ml.parse_peers("all", peers.PEERS) == list(peers.PEERS)
    assert ml.parse_peers(" ggml ,", peers.PEERS) == ["ggml"]
    with pytest.raises(ValueError, match="unknown peer nope"):
        ml.parse_peers("ggml,nope", peers.PEERS)
    with pytest.raises(SystemExit):
        small_args(extra=("--peers", "nope"))
    assert small_args(extra=("--peers", "all")).peers == list(peers.PEERS)
    assert small_args(extra=("--formats", "all")).formats == ["int4", *ml.GGUF_FORMATS]
    with pytest.raises(SystemExit):
        small_args(extra=("--formats", "q9_z"))


def test_ggml_skips_with_a_reason_when_llama_cpp_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # find_spec("llama_cpp") -> None, as if not installed
    args = small_args()
    rng = np.random.default_rng(3)
    spec = ml.make_spec(args, ml.make_bank(args, rng), rng)
    with pytest.raises(peers.PeerSkipped, match="llama-cpp-python is not installed"):
        peers.measure("ggml", spec)
    rows, skipped = ml.run_peers(args, ["ggml"], spec, {"decode_ms": 1.0, "prefill_tok_s": 1.0},
                                 np.zeros_like(spec.check_x))
    assert rows == [] and "llama-cpp-python is not installed" in skipped["ggml"]


def test_a_peer_missing_from_the_checkout_is_skipped(monkeypatch):
    monkeypatch.setitem(peers.PEERS, "ghost", "ghost_moe")
    with pytest.raises(peers.PeerSkipped, match="not built into this checkout"):
        peers.measure("ghost", None)
    with pytest.raises(KeyError):
        peers.measure("nope", None)


# ---- ggml's layer against hybrid's (llama-cpp-python installed) ------------------------------

def q8_0_round(v: np.ndarray) -> np.ndarray:
    """ggml's Q8_0 activation rule, dequantised, float64: per 32, d = amax / 127 kept as fp16,
    q = round(v / d) (computed with the fp32 d)."""
    g = np.asarray(v, np.float32).reshape(-1, 32)
    d = np.abs(g).max(axis=1, keepdims=True) / np.float32(127)
    q = np.rint(g * np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0))
    return (q * d.astype(np.float16).astype(np.float64)).reshape(np.shape(v))


def q8_k_round(v: np.ndarray) -> np.ndarray:
    """ggml's Q8_K activation rule, dequantised, float64: per 256, the element of largest |v|
    maps to -127 (iscale = -127 / it), q = round(iscale v) clamped to 127, d = 1 / iscale (fp32)."""
    g = np.asarray(v, np.float32).reshape(-1, 256)
    m = g[np.arange(len(g)), np.abs(g).argmax(axis=1)][:, None]
    iscale = np.where(m != 0, np.float32(-127) / np.where(m != 0, m, 1), 0).astype(np.float32)
    q = np.minimum(np.rint(g * iscale), 127)
    d = np.where(iscale != 0, np.float32(1) / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
    return (q * d.astype(np.float64)).reshape(np.shape(v))


def tiny_case(fmt, intermediate):
    from hybrid import native

    N = native.lib()
    args = small_args(fmt, experts=4, intermediate=intermediate)
    rng = np.random.default_rng(4)
    bank = ml.make_bank(args, rng)
    spec = ml.make_spec(args, bank, rng)
    layer = ml.make_layer(args, N, bank)
    y = np.zeros(spec.check_x.shape, np.float32)
    moe = N.MoE(layer, "fast", 1, N.active_isa())
    moe.submit(spec.check_x, spec.check_ids, spec.check_w, None, y)
    moe.sync()
    experts = [tuple(a.astype(np.float64) for a in layer.unpack_expert(e)) for e in range(4)]
    return spec, experts, y


def ggml_output(g, spec, variant=0):
    from bench.peers import ggml_moe

    label, fmt, down_fmt, bank = list(ggml_moe.variants(g, spec))[variant]
    moe = ggml_moe.GgmlMoE(g, spec, fmt, down_fmt, bank)
    try:
        return label, moe.engine(), moe(spec.check_x, spec.check_ids, spec.check_w)
    finally:
        moe.close()


@pytest.mark.parametrize("fmt, intermediate, act, repack", [
    ("q4_0", 128, q8_0_round, "CPU_REPACK"),
    ("q4_k", 256, q8_k_round, "CPU_REPACK"),  # Q4_K rows need 256 | inputs, down's too: I = 256
    ("q8_0", 128, q8_0_round, "CPU)"),        # no x86 repack for Q8_0: the plain CPU path
    ("int4", 128, q8_0_round, "CPU_REPACK"),  # INT4 repacked into Q4_0
])
def test_ggml_layer_equals_hybrid_within_activation_rounding(ggml, fmt, intermediate, act, repack):
    spec, experts, y_hybrid = tiny_case(fmt, intermediate)
    label, engine, y_ggml = ggml_output(ggml, spec)
    assert repack in engine
    if fmt == "int4":
        assert label == "INT4 -> Q4_0, exact"
    ids, w, x = spec.check_ids, spec.check_w, spec.check_x
    ref_ggml = moe_reference(experts, x, ids, w, act=act)
    ref_hybrid = moe_reference(experts, x, ids, w, act=quant_a8)
    assert rel_err(y_ggml, ref_ggml) < TOL_OWN
    assert rel_err(y_hybrid, ref_hybrid) < TOL_OWN
    assert ml.rel_diff(y_ggml, y_hybrid) < rel_err(ref_ggml, ref_hybrid) + 2 * TOL_OWN


def test_int4_to_q4_0_is_bit_exact():
    from bench.peers import ggml_moe

    (gate, _, down), = ml.make_bank(small_args(extra=("--bank", "1")), np.random.default_rng(5))
    for q, s in (gate, down):
        rows, inexact = ggml_moe.int4_to_q4_0(q, s)
        assert inexact == 0
        ref = ggml_moe.int4_dequant(q, s)
        nib = ((q.view(np.uint32)[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).reshape(ref.shape)
        np.testing.assert_array_equal(ref, (nib.astype(np.float32) - 8) * np.repeat(s, 32, axis=1))
        np.testing.assert_array_equal(quants.dequantize(rows, QT.Q4_0).reshape(ref.shape), ref)
    s = gate[1].copy()
    s[0, 0] = np.float32(1 + 2**-12)  # not an fp16 value: the repack says so
    assert ggml_moe.int4_to_q4_0(gate[0], s)[1] == 1


def test_int4_requantised_to_q4_k_by_ggml(ggml):
    from bench.peers import ggml_moe

    spec, _, _ = tiny_case("int4", 256)
    label, fmt, down_fmt, bank = list(ggml_moe.variants(ggml, spec))[1]
    assert (fmt, down_fmt) == ("q4_k", "q4_k") and "requantised" in label
    for (g_rows, _, d_rows), (gq, _, dq) in zip(bank, spec.bank):
        for rows, (q, s) in ((g_rows, gq), (d_rows, dq)):
            w = ggml_moe.int4_dequant(q, s)
            back = quants.dequantize(rows, QT.Q4_K).reshape(w.shape)
            # Q4_K's 6-bit sub-scales and mins on 4-bit grids: well under the weights' own spread
            assert np.sqrt(np.mean((back - w) ** 2)) < 0.15 * np.sqrt(np.mean(w ** 2))
