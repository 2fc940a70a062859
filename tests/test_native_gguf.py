"""GGUF block types run by the native kernels in their own bits (csrc/core/kernels.h, kquant.h,
pack.h): Q4_0, Q8_0 and the K types Q4_K, Q5_K, Q6_K, Q3_K, Q2_K, IQ4_XS and the lattice types
IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ1_M (codebook indices expanded in registers). The lossless repack
against the gguf package's own dequantiser, every kernel path this machine runs on decode and
prefill shapes, the fused MoE operator on layers mixing types (gate, up and down each their own),
packed-layer files, GGUFReader's tensors as from_gguf's input, and the binding's checks.

Blocks are random valid ones (random quant and sub-scale bits, random finite fp16 fields over the
whole fp16 range, subnormals included; for the operator, fp16 fields of weight size) and, for
Q4_0 / Q8_0, blocks gguf.quants.quantize makes from Gaussian weights (it has no K quantiser).

Tolerances. The weights are exact: pack + unpack equals gguf.quants.dequantize bit for bit, and
the kernels dequantise exactly (fp16 scale x small integer is exact in fp32). What is left is the
activation side. The references apply the operator's own activation rounding (quant_a8: int8 per
group of 32, fast mode; none in precise mode) in float64, so a kernel differs from them by fp32
summation order only: |out - ref| <= gamma_K * sum_k |w_k x_k|, gamma_K = 2 K 2^-24 (as
tests/test_kernels_isa.py). The fused operator: TOL_EMULATED / TOL_PRECISE of tests/test_native_moe.py
(rare int8 rounding flips of h, whose fp32 value differs from the float64 one in the last bits).

Legend: N rows, K inputs, T tokens, E experts, H hidden, I expert width.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, quants
from native_ref import moe_reference, quant_a8, rel_err

from hybrid import native
from hybrid.experts import cpu_moe
from hybrid.experts.cpu_moe import CpuMoE, PackedLayer

N = native.lib()
from hybrid import _native_testing as NT  # noqa: E402  test-only entry points (csrc/binding_testing.cpp)

ISAS = N.available_isas()
LATTICE = [QT.IQ2_XXS, QT.IQ2_XS, QT.IQ3_XXS, QT.IQ1_S, QT.IQ1_M]
TYPES = [QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q3_K, QT.Q2_K, QT.IQ4_XS, *LATTICE]
K_TYPES = TYPES[2:]
QUANTISABLE = [QT.Q4_0, QT.Q8_0]  # the types gguf.quants.quantize implements
# Byte offsets of each block's fp16 fields (d, and dmin where the type has mins): ggml's block_*.
F16_FIELDS = {QT.Q4_0: (0,), QT.Q8_0: (0,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
              QT.Q3_K: (108,), QT.Q2_K: (80, 82), QT.IQ4_XS: (0,), QT.IQ2_XXS: (0,), QT.IQ2_XS: (0,),
              QT.IQ3_XXS: (0,), QT.IQ1_S: (0,), QT.IQ1_M: ()}  # IQ1_M: d in 4 nibbles (set_iq1m_d)
EPS32 = 2.0**-24
TOL_PRECISE = 1e-5
TOL_EMULATED = 2e-3


def fmt_of(t: QT) -> str:
    return t.name.lower()


def random_f16(rng, shape) -> np.ndarray:
    """Random finite fp16 bit patterns (every exponent but Inf/NaN's, both signs) as uint16."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)
    exp = (bits >> 10) & 0x1F
    return np.where(exp == 0x1F, bits & np.uint16(0x83FF), bits).astype(np.uint16)  # Inf/NaN -> subnormal


def random_blocks(rng, t: QT, n: int, k: int, scale_bits=None) -> np.ndarray:
    """uint8 [n, row bytes] of random valid blocks of type t: random quant and sub-scale bits,
    fp16 fields from scale_bits(rng, shape) (default: any finite fp16)."""
    bs, ts = GGML_QUANT_SIZES[t]
    rows = rng.integers(0, 256, size=(n, k // bs, ts), dtype=np.uint8)
    for at in F16_FIELDS[t]:
        d = (scale_bits or random_f16)(rng, (n, k // bs))
        rows[:, :, at:at + 2] = d.view(np.uint8).reshape(n, k // bs, 2)
    if t == QT.IQ1_M:
        set_iq1m_d(rows, (scale_bits or random_f16)(rng, (n, k // bs)))
    return rows.reshape(n, k // bs * ts)


def set_iq1m_d(rows: np.ndarray, d: np.ndarray) -> None:
    """IQ1_M keeps its fp16 d in the top nibbles of its 4 uint16 scale words (bytes 48..55):
    nibble i of d in word i. rows [n, blocks, 56] uint8 is changed in place; d [n, blocks] uint16."""
    sc = rows[:, :, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
    for i in range(4):
        sc[:, :, i] |= ((d >> np.uint16(4 * i)) & np.uint16(15)) << np.uint16(12)
    rows[:, :, 48:56] = sc.view(np.uint8)


# Largest |sc_j x (u - off)| (or m_j) of a random block of each type: modest scales divide by it.
SPAN = {QT.Q4_0: 8, QT.Q8_0: 128, QT.Q4_K: 63 * 15, QT.Q5_K: 63 * 31, QT.Q6_K: 128 * 32, QT.Q3_K: 32 * 4,
        QT.Q2_K: 15 * 3, QT.IQ4_XS: 32 * 127, QT.IQ2_XXS: 31 * 43 / 8, QT.IQ2_XS: 31 * 43 / 8,
        QT.IQ3_XXS: 31 * 62 / 4, QT.IQ1_S: 15 * 9 / 8, QT.IQ1_M: 15 * 9 / 8}


def modest_f16(t: QT):
    """scale_bits for random_blocks: fp16 fields that make weights of Gaussian-weight size (up to
    ~0.1), so MoE activations stay O(1)."""
    return lambda rng, shape: (rng.uniform(0.1, 1.0, size=shape) / SPAN[t]).astype(np.float16).view(np.uint16)


def quantized_blocks(rng, t: QT, n: int, k: int) -> np.ndarray:
    """Blocks gguf's own quantiser makes from Gaussian weights, uint8 [n, row bytes]; for the
    types it cannot quantise (the K types), random blocks with scales of Gaussian-weight size."""
    if t not in QUANTISABLE:
        return random_blocks(rng, t, n, k, modest_f16(t))
    return quants.quantize((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32), t)


def bound(w, x):
    k = w.shape[1]
    return 2 * k * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)) + 1e-30


# ---- the repack ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", TYPES, ids=fmt_of)
@pytest.mark.parametrize("source", ["random", "quantized"])
def test_pack_unpack_is_gguf_dequantize(t, source):
    rng = np.random.default_rng(1)
    n, k = 48, 512
    rows = random_blocks(rng, t, n, k) if source == "random" else quantized_blocks(rng, t, n, k)
    q, s = N.pack_gguf(rows, fmt_of(t), n, k)
    got = N.unpack(fmt_of(t), q, s, n, k)
    want = quants.dequantize(rows, t)
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_q8_0_minus_128_and_subnormal_scales():
    """Q8_0's int8 may be -128 (valid bits the quantiser never writes); fp16 scales may be subnormal."""
    n, k = 16, 32
    rows = np.zeros((n, 34), np.uint8)
    rows[:, 2:] = 0x80  # -128
    rows[:, 0:2] = np.array([1], np.uint16).view(np.uint8)  # smallest subnormal, 2^-24
    q, s = N.pack_gguf(rows, "q8_0", n, k)
    np.testing.assert_array_equal(N.unpack("q8_0", q, s, n, k), np.full((n, k), -128 * 2.0**-24, np.float32))


# ---- kernels ------------------------------------------------------------------------------------

@pytest.fixture(params=ISAS)
def isa(request):
    return request.param


def k_sizes(t):
    return [256, 768, 2048] if t in K_TYPES else [32, 288, 2048]


@pytest.mark.parametrize("t,k", [(t, k) for t in TYPES for k in k_sizes(t)], ids=lambda v: fmt_of(v) if isinstance(v, QT) else str(v))
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 16, 33])
def test_matmul_a8(isa, t, k, T):
    rng = np.random.default_rng(10 * T + k)
    n = 48
    rows = random_blocks(rng, t, n, k)
    q, s = N.pack_gguf(rows, fmt_of(t), n, k)
    w = quants.dequantize(rows, t).astype(np.float64)
    x = rng.standard_normal((T, k)).astype(np.float32)
    xq, xs, xg = NT.kernel_quantize_row_a8("scalar", x)
    xd = xq.astype(np.float64) * np.repeat(xs, 32, axis=1)
    out = NT.kernel_matmul_a8(isa, fmt_of(t), q, s, n, k, xq, xs, xg, 1, 3)  # blocks 1, 2
    ws = w[16:48]
    err = np.abs(out - xd @ ws.T)
    assert (err <= bound(ws, xd)).all(), f"{isa} {t.name} K={k} T={T}: max error {err.max()}"


@pytest.mark.parametrize("t", TYPES, ids=fmt_of)
@pytest.mark.parametrize("T", [1, 2, 4, 5, 9])
def test_matmul_f32(isa, t, T):
    rng = np.random.default_rng(200 + T)
    n, k = 48, 768 if t in K_TYPES else 288
    rows = random_blocks(rng, t, n, k)
    q, s = N.pack_gguf(rows, fmt_of(t), n, k)
    w = quants.dequantize(rows, t).astype(np.float64)
    x = rng.standard_normal((T, k)).astype(np.float32)
    out = NT.kernel_matmul_f32(isa, fmt_of(t), q, s, n, k, x, 0, 3)
    err = np.abs(out - x.astype(np.float64) @ w.T)
    assert (err <= bound(w, x)).all(), f"{isa} {t.name} T={T}: max error {err.max()}"


# ---- the fused operator -------------------------------------------------------------------------

E, K = 8, 4
H, I = 64, 96     # layers of Q4_0 / Q8_0 only
HK, IK = 256, 256  # layers with K types (rows of whole super-blocks)


def gguf_experts(rng, gate_t: QT, down_t: QT, blocks=quantized_blocks, H=H, I=I, up_t: QT | None = None):
    """(gate, up [E, I, row bytes], down [E, H, row bytes]) raw blocks (up in up_t, default
    gate_t) and their float64 dequantised twins as per-expert (gate, up, down)."""
    up_t = up_t or gate_t
    gate = np.stack([blocks(rng, gate_t, I, H) for _ in range(E)])
    up = np.stack([blocks(rng, up_t, I, H) for _ in range(E)])
    down = np.stack([blocks(rng, down_t, H, I) for _ in range(E)])
    deq = [tuple(quants.dequantize(m[e], t).astype(np.float64) for m, t in ((gate, gate_t), (up, up_t), (down, down_t)))
           for e in range(E)]
    return (gate, up, down), deq


# (gate/up type, down type): each type once on each side, the pairs llama.cpp's mixes use (Q4_K_M:
# Q4_K + Q6_K down; Q2_K + Q3_K down; Q3_K + Q5_K down), and the two block-32 types together.
PAIRS = [(QT.Q4_0, QT.Q4_0), (QT.Q8_0, QT.Q8_0), (QT.Q4_0, QT.Q8_0), (QT.Q8_0, QT.Q4_0),
         (QT.Q4_K, QT.Q6_K), (QT.Q2_K, QT.Q3_K), (QT.Q3_K, QT.Q5_K), (QT.Q5_K, QT.Q2_K),
         (QT.IQ4_XS, QT.Q4_K), (QT.Q6_K, QT.IQ4_XS), (QT.Q8_0, QT.Q2_K),
         (QT.IQ2_XXS, QT.IQ3_XXS), (QT.IQ3_XXS, QT.IQ2_XXS), (QT.IQ2_XS, QT.IQ1_S), (QT.IQ1_M, QT.Q4_K),
         (QT.IQ1_S, QT.IQ2_XS), (QT.Q2_K, QT.IQ1_M)]


@pytest.mark.parametrize("gate_t,down_t", PAIRS, ids=lambda p: fmt_of(p) if isinstance(p, QT) else str(p))
@pytest.mark.parametrize("mode", ["fast", "precise"])
@pytest.mark.parametrize("B", [1, 40])
def test_moe_mixed_types(isa, gate_t, down_t, mode, B):
    rng = np.random.default_rng(B + 7 * int(gate_t) + int(down_t))
    dims = {} if gate_t in QUANTISABLE and down_t in QUANTISABLE else {"H": HK, "I": IK}
    (g, u, d), deq = gguf_experts(rng, gate_t, down_t, **dims)
    h = dims.get("H", H)
    layer = PackedLayer.from_gguf(g, u, d, gate_t, gate_t, down_t)
    assert (layer.format, layer.down_format) == (fmt_of(gate_t), fmt_of(down_t))
    for e in (0, E - 1):  # the layer holds exactly the GGUF values
        for got, want in zip(layer.unpack_expert(e), deq[e]):
            np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))
    x = rng.standard_normal((B, h)).astype(np.float32)
    ids = np.argsort(rng.random((B, E)), axis=1)[:, :K].astype(np.int32)
    w = rng.random((B, K)).astype(np.float32)
    y = CpuMoE(layer, mode=mode, isa=isa).forward(x, ids, w)
    ref = moe_reference(deq, x, ids, w, act=quant_a8 if mode == "fast" else None)
    tol = TOL_EMULATED if mode == "fast" else TOL_PRECISE
    assert rel_err(y, ref) <= tol, f"{isa} {gate_t.name}+{down_t.name} {mode} B={B}: {rel_err(y, ref)}"


# (gate, up, down) types with gate != up: the split gate_up layout (two kernel calls).
TRIPLES = [(QT.Q4_K, QT.Q5_K, QT.Q6_K), (QT.Q4_0, QT.Q8_0, QT.Q4_0), (QT.IQ4_XS, QT.Q2_K, QT.Q3_K),
           (QT.IQ2_XXS, QT.IQ2_XS, QT.IQ3_XXS)]


@pytest.mark.parametrize("types", TRIPLES, ids=lambda ts: "-".join(fmt_of(t) for t in ts))
@pytest.mark.parametrize("mode", ["fast", "precise"])
@pytest.mark.parametrize("B", [1, 40])
def test_moe_gate_up_types_differ(isa, types, mode, B):
    gate_t, up_t, down_t = types
    rng = np.random.default_rng(B + int(gate_t) + 3 * int(up_t))
    dims = {} if all(t in QUANTISABLE for t in types) else {"H": HK, "I": IK}
    (g, u, d), deq = gguf_experts(rng, gate_t, down_t, up_t=up_t, **dims)
    layer = PackedLayer.from_gguf(g, u, d, gate_t, up_t, down_t)
    assert (layer.format, layer.up_format, layer.down_format) == tuple(fmt_of(t) for t in types)
    for got, want in zip(layer.unpack_expert(E - 1), deq[E - 1]):
        np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))
    h = dims.get("H", H)
    x = rng.standard_normal((B, h)).astype(np.float32)
    ids = np.argsort(rng.random((B, E)), axis=1)[:, :K].astype(np.int32)
    w = rng.random((B, K)).astype(np.float32)
    y = CpuMoE(layer, mode=mode, isa=isa).forward(x, ids, w)
    ref = moe_reference(deq, x, ids, w, act=quant_a8 if mode == "fast" else None)
    assert rel_err(y, ref) <= (TOL_EMULATED if mode == "fast" else TOL_PRECISE)


def test_split_layer_file_and_checks(tmp_path):
    rng = np.random.default_rng(10)
    (g, u, d), _ = gguf_experts(rng, QT.Q4_K, QT.Q6_K, H=HK, I=IK, up_t=QT.Q5_K)
    layer = PackedLayer.from_gguf(g, u, d, QT.Q4_K, QT.Q5_K, QT.Q6_K)
    layer.save(tmp_path / "s.packed")
    back = PackedLayer.load(tmp_path / "s.packed")
    assert (back.format, back.up_format, back.down_format) == ("q4_k", "q5_k", "q6_k")
    assert "q4_k+q5_k+q6_k" in repr(back)
    for a, b in zip(layer.unpack_expert(2), back.unpack_expert(2)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="only when both are integer formats"):
        N.Layer.create("bf16", 1, 64, 32, "", "int4")
    split = N.Layer.create("int4", 1, 64, 32, "", "int8")
    with pytest.raises(ValueError, match="only pack_expert_gguf fills it"):
        split.pack_expert_float(0, np.zeros((32, 64), np.float32), np.zeros((32, 64), np.float32),
                                np.zeros((64, 32), np.float32))


def test_moe_random_bit_blocks_fast():
    """Random quant bits (modest scales) through the whole operator, per-expert sequences of rows."""
    rng = np.random.default_rng(5)
    (g, u, d), deq = gguf_experts(rng, QT.Q4_0, QT.Q8_0,
                                  blocks=lambda r, t, n, k: random_blocks(r, t, n, k, modest_f16(t)))
    layer = PackedLayer.from_gguf(list(g), list(u), list(d), "Q4_0", int(QT.Q4_0), QT.Q8_0)
    x = rng.standard_normal((5, H)).astype(np.float32)
    ids = np.argsort(rng.random((5, E)), axis=1)[:, :K].astype(np.int32)
    w = rng.random((5, K)).astype(np.float32)
    y = CpuMoE(layer).forward(x, ids, w)
    assert rel_err(y, moe_reference(deq, x, ids, w, act=quant_a8)) <= TOL_EMULATED


def test_saved_mixed_layer_reopens(tmp_path):
    rng = np.random.default_rng(6)
    (g, u, d), _ = gguf_experts(rng, QT.Q8_0, QT.Q4_0)
    layer = PackedLayer.from_gguf(g, u, d, QT.Q8_0, QT.Q8_0, QT.Q4_0)
    layer.save(tmp_path / "l.packed")
    back = PackedLayer.load(tmp_path / "l.packed")
    assert (back.format, back.down_format) == ("q8_0", "q4_0")
    for a, b in zip(layer.unpack_expert(3), back.unpack_expert(3)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---- the Python API and the binding's checks ----------------------------------------------------

def test_native_types_set():
    assert cpu_moe.GGUF_NATIVE_TYPES == frozenset(TYPES)
    assert all(isinstance(t, QT) for t in cpu_moe.GGUF_NATIVE_TYPES)


def _blocks(t=QT.Q4_0):
    rng = np.random.default_rng(0)
    return gguf_experts(rng, t, t)[0]


@pytest.mark.parametrize("change,err,match", [
    (lambda g, u, d: (g, u, d, QT.IQ2_S, QT.IQ2_S, QT.Q4_0), ValueError, "gate: GGUF type IQ2_S has no native"),
    (lambda g, u, d: (g, u, d, QT.Q4_K, QT.Q4_K, QT.Q4_0), ValueError, "hidden must be a positive multiple of 256"),
    (lambda g, u, d: (g, u, d, QT.Q4_0, QT.Q4_0, 999), ValueError, "down: 999 is not a GGUF tensor type"),
    (lambda g, u, d: (g, u, d[:-1], QT.Q4_0, QT.Q4_0, QT.Q4_0), ValueError, "same number"),
    (lambda g, u, d: (g, u, d, QT.Q4_0, QT.Q4_0, QT.Q8_0), ValueError,
     "expert 0: down: a row of 96 inputs in q8_0 is 3 blocks of 34 bytes = 102 bytes, got rows of 54"),
    (lambda g, u, d: (g, u[:, :, :-2], d, QT.Q4_0, QT.Q4_0, QT.Q4_0), ValueError, "expert 0: up: a row of 64"),
    (lambda g, u, d: (g.view(np.int8), u, d, QT.Q4_0, QT.Q4_0, QT.Q4_0), TypeError, "gate must have dtype uint8"),
    (lambda g, u, d: (g, u[:, :-16], d, QT.Q4_0, QT.Q4_0, QT.Q4_0), ValueError, r"up must have shape \[96, 36\]"),
])
def test_from_gguf_errors(change, err, match):
    with pytest.raises(err, match=match):
        PackedLayer.from_gguf(*change(*_blocks()))


def test_pack_gguf_errors():
    rows = random_blocks(np.random.default_rng(0), QT.Q8_0, 16, 64)
    with pytest.raises(ValueError, match="'int4' is not a GGUF block type"):
        N.pack_gguf(rows, "int4", 16, 64)
    with pytest.raises(ValueError, match="rows .N. must be a positive multiple of 16"):
        N.pack_gguf(rows[:8], "q8_0", 8, 64)
    with pytest.raises(ValueError, match="C-contiguous"):
        N.pack_gguf(np.asfortranarray(rows), "q8_0", 16, 64)
    layer = N.Layer.create("q4_0", 1, 64, 32)
    with pytest.raises(ValueError, match="packed from their blocks"):
        layer.pack_expert_float(0, np.zeros((32, 64), np.float32), np.zeros((32, 64), np.float32),
                                np.zeros((64, 32), np.float32))


def test_from_gguf_reader_tensors(tmp_path):
    """The contract gguf-load relies on: GGUFReader's tensor data (a memmap of the file, [E, rows,
    row bytes] uint8) goes to from_gguf as it is, types as the reader reports them."""
    import gguf

    rng = np.random.default_rng(8)
    (g, u, d), deq = gguf_experts(rng, QT.Q4_K, QT.Q6_K, H=HK, I=IK)
    path = tmp_path / "experts.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek2")
    for name, data, t in (("gate", g, QT.Q4_K), ("up", u, QT.Q4_K), ("down", d, QT.Q6_K)):
        w.add_tensor(f"blk.1.ffn_{name}_exps.weight", data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ts = {t.name.split(".")[2]: t for t in gguf.GGUFReader(str(path)).tensors}
    layer = PackedLayer.from_gguf(ts["ffn_gate_exps"].data, ts["ffn_up_exps"].data, ts["ffn_down_exps"].data,
                                  ts["ffn_gate_exps"].tensor_type, ts["ffn_up_exps"].tensor_type,
                                  ts["ffn_down_exps"].tensor_type)
    assert (layer.num_experts, layer.hidden, layer.intermediate) == (E, HK, IK)
    for got, want in zip(layer.unpack_expert(E - 1), deq[E - 1]):
        np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))


def test_version_1_layer_file_opens(tmp_path):
    """Packed layer files written before down_format (version 1: one format) still open."""
    rng = np.random.default_rng(9)
    layer = PackedLayer.from_float(*(rng.standard_normal(s).astype(np.float32) for s in ((2, 32, 64), (2, 32, 64), (2, 64, 32))))
    layer.save(tmp_path / "v2.packed")
    data = bytearray((tmp_path / "v2.packed").read_bytes())
    data[8:12] = (1).to_bytes(4, "little")
    data[112:120] = bytes(8)  # version 1 had nothing past total_bytes (header offset 104)
    (tmp_path / "v1.packed").write_bytes(bytes(data))
    back = PackedLayer.load(tmp_path / "v1.packed")
    assert (back.format, back.down_format) == ("int4", "int4")
    for a, b in zip(layer.unpack_expert(1), back.unpack_expert(1)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_gguf_experts_reach_the_gpu_expert_cache_dequantised():
    """The device cache reads int4/int8/bf16 bytes bit for bit; a Q4_0 layer shares INT4's byte
    layout but not its scales (fp16, not bf16), so it gets the exact dequantised values instead."""
    (g, u, d), deq = gguf_experts(np.random.default_rng(0), QT.Q4_0, QT.Q8_0)
    layer = PackedLayer.from_gguf(g, u, d, QT.Q4_0, QT.Q4_0, QT.Q8_0)
    c = layer.compact_expert(1)
    assert c.format == "dense"
    for got, want in zip((c.gate.q, c.up.q, c.down.q), deq[1]):
        np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))
